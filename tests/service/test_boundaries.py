"""The gateway stays torch-free, imports neither the workers, the adaptors nor the testbed, and builds no app at
import time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = """
import sys
import service.app
assert not hasattr(service.app, "app"), "no app may be built at import time"
from common.settings import Settings
app = service.app.create_app(Settings(redis_url="redis://127.0.0.1:1/0", data_dir="/nonexistent"))
app.openapi()
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "diffusers", "transformers", "workers", "adaptors", "testbed"})
print(",".join(heavy))
"""


def test_gateway_imports_no_torch_and_no_workers() -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the gateway imported {out.stdout.strip()}"
