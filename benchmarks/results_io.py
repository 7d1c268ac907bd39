"""Every benchmark ends the same way: one JSON object on stdout and in benchmarks/results/NAME.json."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch

from common.adaptor_manifest import sha256_file

RESULTS = Path(__file__).resolve().parent / "results"


def environment(threads: int) -> dict[str, str]:
    return {"device": f"cpu ({platform.machine()}, {threads} threads per process)", "torch": torch.__version__}


def weights_fingerprint(folder: str | Path) -> str:
    """Short sha256 over a model folder's weight files: a figure names the weights it was measured on,
    so one left over from weights since retrained is visible as such."""
    files = sorted(Path(folder).rglob("*.safetensors"))
    listing = "".join(f"{p.relative_to(folder).as_posix()} {sha256_file(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()[:12]


def publish(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
