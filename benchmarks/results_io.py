"""Every benchmark ends the same way: one JSON object on stdout and in benchmarks/results/NAME.json."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from common.adaptor_manifest import sha256_file

RESULTS = Path(__file__).resolve().parent / "results"


def environment(threads: int) -> dict[str, str]:
    """Where a result comes from: the device, torch, the code revision and the testbed weights it ran on."""
    from testbed import PIPELINE_DIR

    return {
        "device": f"cpu ({platform.machine()}, {threads} threads per process)",
        "torch": torch.__version__,
        "code_revision": code_revision(),
        "testbed_weights": weights_fingerprint(PIPELINE_DIR),
    }


def code_revision() -> str:
    """The git commit the benchmark ran at, with "+dirty" when the tree had uncommitted changes; "unknown" outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def weights_fingerprint(folder: str | Path) -> str:
    """Short sha256 over a model folder's weight files: a figure names the weights it was measured on,
    so one left over from weights since retrained is visible as such."""
    files = sorted(Path(folder).rglob("*.safetensors"))
    listing = "".join(f"{p.relative_to(folder).as_posix()} {sha256_file(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()[:12]


def publish(name: str, result: dict, *, merge: bool = False) -> dict:
    """Write and print `result`; returns what was written.

    `merge=True` keeps the keys other invocations recorded and updates only these: benchmarks whose
    runs are launched separately (and concurrently) share one file. The read-merge-write holds an
    exclusive lock and replaces the file atomically, so two runs finishing at once lose nothing and
    a reader never sees half a file.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    with open(RESULTS / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if merge and path.is_file():
            result = {**json.loads(path.read_text()), **result}
        staging = path.with_name(f".{name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(result, indent=2))
        os.replace(staging, path)
    print(json.dumps(result))
    return result
