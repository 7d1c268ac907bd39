"""Benchmark results files: concurrent runs merging into one file lose nothing."""

import json
import multiprocessing

import pytest

from benchmarks import results_io


def _publish_one(key: str) -> None:
    results_io.publish("shared", {key: {"bias": len(key)}, "benchmark": "shared"}, merge=True)


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(results_io, "RESULTS", tmp_path)
    return tmp_path


def test_merge_keeps_earlier_keys_and_replaces_repeated_ones(results_dir, capsys):
    results_io.publish("shared", {"a": 1, "b": 1}, merge=True)
    written = results_io.publish("shared", {"b": 2, "c": 3}, merge=True)
    assert written == {"a": 1, "b": 2, "c": 3}
    assert json.loads((results_dir / "shared.json").read_text()) == written
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == written
    assert results_io.publish("shared", {"d": 4}) == {"d": 4}  # without merge: the file is this result


def test_processes_finishing_at_once_each_keep_their_key(results_dir):
    keys = [f"run_{i}" for i in range(12)]
    ctx = multiprocessing.get_context("fork")  # inherits the redirected RESULTS
    procs = [ctx.Process(target=_publish_one, args=(k,)) for k in keys]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    merged = json.loads((results_dir / "shared.json").read_text())
    assert set(keys) <= set(merged)
    assert not list(results_dir.glob("*.tmp"))


def test_the_environment_names_the_code_revision_and_the_weights():
    env = results_io.environment(1)
    assert env["code_revision"] == "unknown" or len(env["code_revision"].split("+")[0]) == 12
    assert len(env["testbed_weights"]) == 12 and env["testbed_weights"] == results_io.environment(2)["testbed_weights"]
