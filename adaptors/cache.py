"""Per-worker LRU of adaptors attached to the one base pipeline, bounded in bytes.

Switching to the active adaptor is a no-op, to a cached one is an `activate` (no disk read, no
base reload); only a miss reads (and verifies) the store. Each entry has an explicit state so a
failed load is visible rather than half-attached.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from adaptors.base import Adaptor
from adaptors.generation import PromptEncoder
from adaptors.gmm import GmmAdaptor, PromptMixture
from adaptors.ida import GuidanceDirections, IdaAdaptor
from adaptors.store import AdaptorStore
from common.adaptor_manifest import AdaptorBaseMismatch, AdaptorNotCalibrated

logger = logging.getLogger(__name__)

MAX_ERRORED = 32


class EntryState(str, enum.Enum):
    loading = "loading"
    ready = "ready"
    errored = "errored"


@dataclass
class CacheEntry:
    adaptor_id: str
    state: EntryState
    adaptor: Adaptor | None = None
    nbytes: int = 0
    error: str | None = None


class AdaptorCache:
    """Which adaptors are attached to `pipe`, and which one is active (None = the base model)."""

    def __init__(self, pipe, store: AdaptorStore, max_bytes: int, base_model: str | None = None) -> None:
        self.pipe = pipe
        self.store = store
        self.max_bytes = int(max_bytes)
        self.base_model = base_model
        self.entries: OrderedDict[str, CacheEntry] = OrderedDict()  # least recently used first
        self.active: str | None = None
        self.hits = 0
        self.misses = 0
        self.swaps = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values() if e.state is EntryState.ready)

    def cached_ids(self) -> list[str]:
        return [k for k, e in self.entries.items() if e.state is EntryState.ready]

    def state(self, adaptor_id: str) -> EntryState | None:
        entry = self.entries.get(adaptor_id)
        return entry.state if entry else None

    def directions(self, adaptor_id: str, prompt: str) -> GuidanceDirections | None:
        """For an IDA adaptor (cached by `use`), its calibrated directions for `prompt`; None for other kinds."""
        entry = self.entries.get(adaptor_id)
        if entry is None or not isinstance(entry.adaptor, IdaAdaptor):
            return None
        rows = entry.adaptor.directions(prompt)
        if rows is None:
            raise AdaptorNotCalibrated(f"guidance weights {adaptor_id!r} were not calibrated for the prompt {prompt!r}")
        return GuidanceDirections(rows, entry.adaptor.warmup_steps)

    def mixture(self, adaptor_id: str, prompt: str) -> tuple[PromptMixture, int]:
        """For a GMM adaptor (cached by `use`), its mixture for `prompt` and the step t* it moves latents after."""
        entry = self.entries.get(adaptor_id)
        adaptor = entry.adaptor if entry is not None else None
        if not isinstance(adaptor, GmmAdaptor):
            raise AdaptorNotCalibrated(f"adaptor {adaptor_id!r} holds no latent mixtures")
        mixture = adaptor.mixture_for(prompt)
        if mixture is None:
            raise AdaptorNotCalibrated(f"latent mixtures {adaptor_id!r} were not calibrated for the prompt {prompt!r}")
        return mixture, adaptor.at_step

    def application(self, adaptor_id: str | None, prompt: str) -> dict | None:
        """Whether the (cached) adaptor applies to `prompt` and why (a mapping's detector); None for other kinds."""
        entry = self.entries.get(adaptor_id) if adaptor_id is not None else None
        return entry.adaptor.application(prompt) if entry is not None and entry.adaptor is not None else None

    def use(self, adaptor_id: str | None) -> PromptEncoder | None:
        """Make `adaptor_id` (None = base) the one in effect; returns its prompt encoder if it has one."""
        if adaptor_id == self.active:
            return self._encoder(adaptor_id)
        start = time.perf_counter()
        if adaptor_id is None:
            self._deactivate_current()
            self.swaps += 1
            logger.info("adaptor swap -> base in %.1f ms", (time.perf_counter() - start) * 1e3)
            return None
        entry = self.entries.get(adaptor_id)
        if entry is not None and entry.state is EntryState.ready:
            self.hits += 1
            self.entries.move_to_end(adaptor_id)
            source = "cache"
        else:
            self.misses += 1
            entry = self._load(adaptor_id)
            source = "store"
        self._deactivate_current()
        assert entry.adaptor is not None
        entry.adaptor.activate(self.pipe)
        self.active = adaptor_id
        self.swaps += 1
        self._evict()
        logger.info("adaptor swap -> %s (%s) in %.1f ms", adaptor_id, source, (time.perf_counter() - start) * 1e3)
        return self._encoder(adaptor_id)

    def _encoder(self, adaptor_id: str | None) -> PromptEncoder | None:
        if adaptor_id is None:
            return None
        adaptor = self.entries[adaptor_id].adaptor
        return adaptor.prompt_encoder(self.pipe) if adaptor is not None else None

    def _deactivate_current(self) -> None:
        if self.active is not None:
            entry = self.entries.get(self.active)
            if entry is not None and entry.adaptor is not None:
                entry.adaptor.deactivate(self.pipe)
            self.active = None

    def _load(self, adaptor_id: str) -> CacheEntry:
        entry = CacheEntry(adaptor_id, EntryState.loading)
        self.entries[adaptor_id] = entry
        self.entries.move_to_end(adaptor_id)
        adaptor: Adaptor | None = None
        try:
            adaptor = self.store.load(adaptor_id)
            if self.base_model is not None and adaptor.manifest.base_model != self.base_model:
                raise AdaptorBaseMismatch(
                    f"adaptor {adaptor_id!r} was made for base model {adaptor.manifest.base_model!r}, "
                    f"this worker serves {self.base_model!r}"
                )
            adaptor.attach(self.pipe)
        except BaseException as exc:
            # the entry stays, errored and holding nothing; the next request for it retries the load
            entry.state, entry.error = EntryState.errored, f"{type(exc).__name__}: {exc}"
            if adaptor is not None:
                try:
                    adaptor.detach(self.pipe)
                except Exception:  # best effort: never hide the original error
                    logger.exception("cleaning up adaptor %s after a failed attach", adaptor_id)
            logger.warning("adaptor %s failed to load: %s", adaptor_id, entry.error)
            errored = [k for k, e in self.entries.items() if e.state is EntryState.errored]
            for stale in errored[: max(0, len(errored) - MAX_ERRORED)]:  # bad ids must not grow the table
                del self.entries[stale]
            raise
        entry.adaptor, entry.nbytes, entry.state = adaptor, adaptor.nbytes(), EntryState.ready
        return entry

    def _evict(self) -> None:
        """Detach least recently used adaptors while over budget; the active one always stays."""
        for adaptor_id in list(self.entries):
            if self.nbytes <= self.max_bytes:
                break
            if adaptor_id == self.active or self.entries[adaptor_id].state is not EntryState.ready:
                continue
            self.evict(adaptor_id)

    def evict(self, adaptor_id: str) -> bool:
        entry = self.entries.get(adaptor_id)
        if entry is None:
            return False
        if adaptor_id == self.active:
            self._deactivate_current()
        if entry.adaptor is not None:
            entry.adaptor.detach(self.pipe)
        del self.entries[adaptor_id]
        self.evictions += 1
        logger.info("evicted adaptor %s (%d bytes)", adaptor_id, entry.nbytes)
        return True

    def clear(self) -> None:
        for adaptor_id in list(self.entries):
            self.evict(adaptor_id)

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "swaps": self.swaps,
            "evictions": self.evictions,
            "bytes": self.nbytes,
            "entries": len(self.cached_ids()),
        }
