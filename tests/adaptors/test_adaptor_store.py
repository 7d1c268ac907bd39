"""The adaptor store: hashed, safetensors-only, atomic publish, retire."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptors.store import AdaptorStore
from common.adaptor_manifest import AdaptorIntegrityError, AdaptorManifest, AdaptorNotFound
from tests.adaptors.mixin import make_prefix


def _publish(store: AdaptorStore, pipe, adaptor_id: str, seed: int = 1):
    staging = store.staging_dir(adaptor_id)
    make_prefix(pipe, adaptor_id, seed).save(staging)
    return store.publish(staging)


def test_publish_list_load(pipe, tmp_path: Path):
    store = AdaptorStore(tmp_path / "adaptors")
    manifest = _publish(store, pipe, "fair-a")
    assert [m.id for m in store.list()] == ["fair-a"]
    assert manifest.size_bytes == (tmp_path / "adaptors" / "fair-a" / "prefix.safetensors").stat().st_size
    assert manifest.created
    loaded = store.load("fair-a")
    assert loaded.manifest.files == manifest.files
    assert torch.equal(loaded.tensors["prefix"], make_prefix(pipe, "fair-a", 1).tensors["prefix"])
    assert not any(p.name.startswith(".") for p in (tmp_path / "adaptors").iterdir())
    with pytest.raises(FileExistsError):
        _publish(store, pipe, "fair-a")


def test_tampered_file_is_refused(pipe, tmp_path: Path):
    store = AdaptorStore(tmp_path)
    _publish(store, pipe, "a")
    weights = tmp_path / "a" / "prefix.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdaptorIntegrityError, match="prefix.safetensors"):
        store.load("a")
    weights.unlink()
    with pytest.raises(AdaptorIntegrityError, match="missing"):
        store.load("a")


def test_only_safetensors(pipe, tmp_path: Path):
    store = AdaptorStore(tmp_path)
    _publish(store, pipe, "a")
    (tmp_path / "a" / "extra.bin").write_bytes(b"pickle?")
    with pytest.raises(AdaptorIntegrityError, match="extra.bin"):
        store.load("a")
    (tmp_path / "a" / "extra.bin").unlink()
    manifest = AdaptorManifest.read(tmp_path / "a")
    manifest.files["weights.pt"] = "00" * 32
    manifest.write(tmp_path / "a")
    with pytest.raises(AdaptorIntegrityError, match="weights.pt"):
        store.load("a")
    staging = store.staging_dir("b")
    make_prefix(pipe, "b", 1).save(staging)
    (staging / "model.pt").write_bytes(b"x")
    with pytest.raises(AdaptorIntegrityError, match="model.pt"):
        store.publish(staging)
    assert not (tmp_path / "b").exists()


def test_bad_ids(pipe, tmp_path: Path):
    store = AdaptorStore(tmp_path / "store")
    (tmp_path / "x").mkdir()
    make_prefix(pipe, "x", 1).save(tmp_path / "x")  # a real adaptor just outside the store
    for bad in ("../x", "..", "/x", "X"):
        with pytest.raises(AdaptorNotFound):
            store.load(bad)
        with pytest.raises(ValueError):
            store.staging_dir(bad)
    staging = tmp_path / "elsewhere"
    make_prefix(pipe, "ok", 1).save(staging)
    manifest = AdaptorManifest.read(staging)
    manifest.id = "../escape"
    manifest.write(staging)
    with pytest.raises(ValueError, match="invalid adaptor id"):
        store.publish(staging)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "store", "x"]


def test_failed_publish_leaves_nothing(pipe, tmp_path: Path, monkeypatch):
    store = AdaptorStore(tmp_path)
    staging = store.staging_dir("a")
    make_prefix(pipe, "a", 1).save(staging)

    def boom(self, target):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "rename", boom)
    with pytest.raises(OSError):
        store.publish(staging)
    monkeypatch.undo()
    assert store.list() == [] and not (tmp_path / "a").exists()
    with pytest.raises(AdaptorNotFound):
        store.load("a")
    store.discard(staging)
    assert list(tmp_path.iterdir()) == []


def test_publish_from_outside_the_root_copies_first(pipe, tmp_path: Path):
    store = AdaptorStore(tmp_path / "store")
    make_prefix(pipe, "a", 1).save(tmp_path / "job-out")
    store.publish(tmp_path / "job-out")
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["a"]
    assert store.load("a").id == "a"


def test_retire(pipe, tmp_path: Path):
    store = AdaptorStore(tmp_path)
    _publish(store, pipe, "a")
    _publish(store, pipe, "b")
    store.retire("a")
    assert [m.id for m in store.list()] == ["b"]
    assert not any(p.name.startswith(".retired") for p in tmp_path.iterdir())
    store.retire("b", keep=True)
    assert store.list() == []
    assert [p.name.startswith(".retired-b-") for p in tmp_path.iterdir()] == [True]
    with pytest.raises(AdaptorNotFound):
        store.retire("a")
    _publish(store, pipe, "a")  # the id is free again
    assert [m.id for m in store.list()] == ["a"]
