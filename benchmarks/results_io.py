"""Every benchmark ends the same way: one JSON object on stdout and in benchmarks/results/NAME.json."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(threads: int) -> dict[str, str]:
    return {"device": f"cpu ({platform.machine()}, {threads} threads per process)", "torch": torch.__version__}


def publish(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
