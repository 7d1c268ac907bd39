"""The torch-free manifest module the gateway lists adaptors with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from common.adaptor_manifest import (
    AdaptorManifest,
    AdaptorNotFound,
    adaptor_dir,
    list_manifests,
    read_manifest,
    sha256_file,
    valid_adaptor_id,
)


def _manifest(adaptor_id: str = "fair-doctor") -> AdaptorManifest:
    return AdaptorManifest(
        id=adaptor_id,
        kind="lora",
        base_model="testbed",
        attributes=["gender"],
        target={"gender": {"female": 0.5, "male": 0.5}},
        metrics={"after": {"bias": 0.1}},
        files={"pytorch_lora_weights.safetensors": "ab" * 32},
        size_bytes=1234,
        created="2026-11-23T00:00:00+00:00",
        hyperparameters={"lr": 0.01},
        prompt_set="occupations",
        sampler={"steps": 20, "guidance_scale": 5.0, "scheduler": "DDIMScheduler"},
        name="Fair doctors",
    )


def test_round_trip_and_unknown_keys_ignored(tmp_path: Path):
    m = _manifest()
    assert AdaptorManifest.from_dict(m.to_dict()) == m
    data = {**m.to_dict(), "added_in_a_later_version": 1}
    assert AdaptorManifest.from_dict(data) == m
    m.write(tmp_path)
    assert AdaptorManifest.read(tmp_path) == m
    assert json.loads((tmp_path / "manifest.json").read_text())["id"] == "fair-doctor"
    with pytest.raises(ValueError, match="kind"):
        AdaptorManifest.from_dict({"id": "x", "base_model": "testbed"})


@pytest.mark.parametrize("good", ["a", "fair-doctor", "x_1", "0abc", "a" * 64])
def test_valid_ids(good):
    assert valid_adaptor_id(good)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".staging-x", "-a", "_a", "A", "a b", "a" * 65, "..", None, 3])
def test_invalid_ids(bad, tmp_path: Path):
    assert not valid_adaptor_id(bad)
    with pytest.raises(ValueError):
        adaptor_dir(tmp_path, bad)
    with pytest.raises(AdaptorNotFound):
        read_manifest(tmp_path, bad)


def test_list_skips_dot_folders_and_mismatches(tmp_path: Path):
    for adaptor_id in ("b", "a"):
        (tmp_path / adaptor_id).mkdir()
        _manifest(adaptor_id).write(tmp_path / adaptor_id)
    (tmp_path / ".staging-c").mkdir()
    _manifest("c").write(tmp_path / ".staging-c")
    (tmp_path / "d").mkdir()
    _manifest("e").write(tmp_path / "d")  # folder and id disagree
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    (tmp_path / "no-manifest").mkdir()
    assert [m.id for m in list_manifests(tmp_path)] == ["a", "b"]
    assert list_manifests(tmp_path / "missing") == []
    assert read_manifest(tmp_path, "a").id == "a"
    with pytest.raises(AdaptorNotFound):
        read_manifest(tmp_path, "c")
    with pytest.raises(KeyError):  # AdaptorNotFound is a KeyError
        read_manifest(tmp_path, "zzz")


def test_sha256(tmp_path: Path):
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_torch_free():
    import subprocess

    code = "import sys, common.adaptor_manifest; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0
