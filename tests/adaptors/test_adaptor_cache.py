"""The per-worker adaptor LRU: bounded in bytes, swaps without disk reads once cached."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from adaptors.cache import AdaptorCache, EntryState
from adaptors.generation import generate
from adaptors.store import AdaptorStore
from common.adaptor_manifest import AdaptorBaseMismatch, AdaptorIntegrityError, AdaptorNotFound
from tests.adaptors.conftest import pipeline_path
from tests.adaptors.mixin import SPEC, make_lora, make_prefix, manifest_for


def _out(pipe, encoder) -> torch.Tensor:
    return generate(pipe, SPEC, encode_prompt=encoder)


def _publish(store: AdaptorStore, adaptor) -> None:
    staging = store.staging_dir(adaptor.id)
    adaptor.save(staging)
    store.publish(staging)


def test_byte_bound_evicts_least_recently_used(pipe, tmp_path: Path):
    store = AdaptorStore(tmp_path)
    for i, adaptor_id in enumerate(("a", "b", "c")):
        _publish(store, make_prefix(pipe, adaptor_id, i))
    size = store.load("a").nbytes()
    cache = AdaptorCache(pipe, store, max_bytes=2 * size)
    cache.use("a")
    cache.use("b")
    cache.use("c")
    assert cache.cached_ids() == ["b", "c"] and cache.evictions == 1 and cache.nbytes == 2 * size
    cache.use("b")  # hit: b becomes most recent, c is now the LRU
    cache.use("a")
    assert cache.cached_ids() == ["b", "a"]
    assert (cache.hits, cache.misses, cache.swaps, cache.evictions) == (1, 4, 5, 2)
    tiny = AdaptorCache(pipe, store, max_bytes=1)
    tiny.use("a")  # the active adaptor stays even when it alone is over budget
    assert tiny.cached_ids() == ["a"] and tiny.active == "a"
    tiny.use("b")
    assert tiny.cached_ids() == ["b"]


@pytest.mark.parametrize("kind", ["lora", "prefix_tokens"])
def test_switching_between_cached_adaptors_reads_no_disk(pipe, tmp_path: Path, kind: str):
    store = AdaptorStore(tmp_path)
    if kind == "lora":
        adaptors = [make_lora(str(pipeline_path()), name, seed) for name, seed in (("a", 1), ("b", 2))]
    else:
        adaptors = [make_prefix(pipe, name, seed) for name, seed in (("a", 1), ("b", 2))]
    for adaptor in adaptors:
        _publish(store, adaptor)
    base = _out(pipe, None)
    cache = AdaptorCache(pipe, store, max_bytes=1 << 30, base_model="testbed")
    first = {name: _out(pipe, cache.use(name)) for name in ("a", "b")}
    assert (first["a"] - first["b"]).abs().max() > 1e-3
    for name in ("a", "b"):
        shutil.rmtree(tmp_path / name)  # from here on, any disk read would fail
    for name in ("a", "b", "a", "b"):
        assert torch.equal(_out(pipe, cache.use(name)), first[name])
    swaps = cache.swaps
    cache.use("b")  # already active: no-op
    assert cache.swaps == swaps
    assert cache.use(None) is None
    assert torch.equal(_out(pipe, None), base)
    assert (cache.misses, cache.hits) == (2, 4)
    assert all(cache.state(name) is EntryState.ready for name in ("a", "b"))
    cache.clear()
    assert torch.equal(_out(pipe, None), base)


def test_evicting_a_lora_keeps_the_active_one(pipe, tmp_path: Path):
    store = AdaptorStore(tmp_path)
    for name, seed in (("a", 1), ("b", 2)):
        _publish(store, make_lora(str(pipeline_path()), name, seed))
    size = store.load("a").nbytes()
    base = _out(pipe, None)
    cache = AdaptorCache(pipe, store, max_bytes=size)
    expected_a = _out(pipe, cache.use("a"))
    expected_b = _out(pipe, cache.use("b"))  # evicts a while b is active
    assert (expected_b - base).abs().max() > 1e-3 and (expected_b - expected_a).abs().max() > 1e-3
    assert cache.cached_ids() == ["b"] and cache.evictions == 1
    assert torch.equal(_out(pipe, cache.use("b")), expected_b)
    assert torch.equal(_out(pipe, cache.use("a")), expected_a)  # reloaded from the store, evicting b
    cache.use(None)
    cache.clear()
    assert cache.cached_ids() == []


def test_failed_load_is_errored_and_keeps_the_active_one(pipe, tmp_path: Path):
    store = AdaptorStore(tmp_path)
    _publish(store, make_prefix(pipe, "good", 1))
    _publish(store, make_prefix(pipe, "bad", 2))
    (tmp_path / "bad" / "prefix.safetensors").write_bytes(b"tampered")
    cache = AdaptorCache(pipe, store, max_bytes=1 << 30)
    expected = _out(pipe, cache.use("good"))
    with pytest.raises(AdaptorIntegrityError):
        cache.use("bad")
    assert cache.state("bad") is EntryState.errored and cache.active == "good"
    for missing in ("nope", "../good"):
        with pytest.raises(AdaptorNotFound):
            cache.use(missing)
    assert torch.equal(_out(pipe, cache.use("good")), expected)


def test_base_model_mismatch(pipe, tmp_path: Path):
    store = AdaptorStore(tmp_path)
    adaptor = make_prefix(pipe, "other", 1)
    adaptor.manifest = manifest_for("other", "prefix_tokens", base_model="someone/else")
    _publish(store, adaptor)
    cache = AdaptorCache(pipe, store, max_bytes=1 << 30, base_model="testbed")
    with pytest.raises(AdaptorBaseMismatch, match="someone/else"):
        cache.use("other")
    assert cache.active is None and cache.cached_ids() == []
