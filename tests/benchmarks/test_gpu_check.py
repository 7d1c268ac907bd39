"""benchmarks/gpu_check.py: refuses to run without CUDA (and writes nothing), and its checks run end to end on the
testbed, on the CPU here and in fp16 on CUDA where a GPU is present."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from common.settings import TESTBED, Settings

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = {"none", "assign", "assign_enforce", "guidance"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_says_so_exits_non_zero_and_writes_nothing() -> None:
    result = ROOT / "benchmarks/results/gpu_check.json"
    before = result.stat().st_mtime_ns if result.exists() else None
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--steps", "2"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert out.returncode == gpu_check.NO_CUDA_EXIT, out.stderr
    assert "CUDA is not available" in out.stderr and "Nothing was written" in out.stderr
    assert out.stdout == ""
    assert (result.stat().st_mtime_ns if result.exists() else None) == before


def _check(device: str, batch: int) -> dict:
    return gpu_check.check_model(TESTBED, device=device, batch=batch, steps=2, classifier="auto", audit_reader="auto",
                                 settings=Settings())  # fmt: skip


def test_every_check_runs_on_the_testbed() -> None:
    report = _check("cpu", batch=2)
    assert report["ok"], report["checks"]
    assert STRATEGIES <= set(report["checks"]) and {"steer_reader", "audit_reader", "audit"} <= set(report["checks"])
    for name in STRATEGIES:
        check = report["checks"][name]
        assert check["finite"] and check["not_blank"] and check["seconds"] > 0 and check["peak_memory_mib"] is None
    # the multi-class attribute is in the target, so `assign` steers it with the CNN's classifier guidance
    assert set(report["target"]) == {"gender", "skin_tone"}
    assert report["readers"] == {"steer": "testbed-cnn", "audit": "testbed-clip"}
    assert report["checks"]["audit_reader"]["device"] == "cpu"


def test_a_failing_check_is_reported_not_raised() -> None:
    report = gpu_check.check_model("/nonexistent/sd15", device="cpu", batch=1, steps=1, classifier="auto",
                                   audit_reader="auto", settings=Settings())  # fmt: skip
    assert report["checks"]["load"]["ok"] is False and "/nonexistent/sd15" in report["checks"]["load"]["error"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_fp16_cuda_path_runs_every_strategy_and_the_readers_on_the_gpu() -> None:
    report = _check("cuda", batch=16)
    assert report["dtype"] == "torch.float16" and report["device"].startswith("cuda"), report
    assert report["ok"], report["checks"]
    assert all(report["checks"][name]["peak_memory_mib"] > 0 for name in STRATEGIES)
    assert report["checks"]["audit_reader"]["device"].startswith("cuda")
