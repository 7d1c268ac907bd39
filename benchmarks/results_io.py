"""Every benchmark ends the same way: one JSON object on stdout and in benchmarks/results/NAME.json."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(threads: int) -> dict[str, str]:
    return {"device": f"cpu ({platform.machine()}, {threads} threads per process)", "torch": torch.__version__}


def weights_fingerprint(folder: str | Path) -> str:
    """Short sha256 over a model folder's weight files: a figure names the weights it was measured on,
    so one left over from weights since retrained is visible as such."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def publish(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
