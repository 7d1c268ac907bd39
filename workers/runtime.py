"""Per-process worker state: the base pipeline, classifier, adaptor store and cache, job store.

Built lazily, once per process, behind a lock: with `--pool=solo` the task runs in the worker's
main process, and the warm-up thread started at worker_ready and the first task may race for it.
Never per task: loading a base model is seconds to minutes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from common.jobs import JobStore
from common.redis_keys import STATS_KEY
from common.schemas import ModelInfo
from common.settings import Settings, get_settings

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    pipe: Any
    classifier: Any | None
    store: Any | None  # adaptors.store.AdaptorStore when that module is available
    cache: Any | None  # adaptors.cache.AdaptorCache
    load_s: float
    _training_classifier: Any | None = field(default=None, repr=False)
    # the reader that audits (and that `enforce` checks with); `classifier` steers. The same object where the
    # profile has one reader, None where nothing audits
    auditor: Any | None = None

    def training_classifier(self) -> Any | None:
        """The classifier trainers get: with CLIP / DINOv2 preservation features when configured (loaded once, lazily,
        so inference workers never hold them)."""
        if self.classifier is None:
            return None
        if self._training_classifier is None:
            from adaptors.image_features import with_preservation_features

            self._training_classifier = with_preservation_features(
                self.classifier, self.settings.preserve_features, device=self.pipe.device
            )
        return self._training_classifier

    def base_model_names(self) -> set[str]:
        """Names a manifest may carry for this base model (the setting, and the testbed's id)."""
        from common.adaptor_matching import base_model_names

        return base_model_names(self.settings.base_model)

    def model_info(self) -> ModelInfo:
        from adaptors.generation import default_size
        from adaptors.profiles import get_profile

        size = default_size(self.pipe)
        profile = get_profile(self.settings.base_model)
        return ModelInfo(
            base_model=self.settings.base_model,
            attributes=dict(self.classifier.attributes) if self.classifier is not None else None,
            height=size,
            width=size,
            max_tokens=int(self.pipe.tokenizer.model_max_length),
            tokenizer_json=tokenizer_json(self.pipe.tokenizer),
            default_steps=self.settings.default_steps,
            default_guidance_scale=self.settings.default_guidance_scale,
            prompt_sets={name: list(p) for name, p in profile.prompt_sets.items()} if profile else {},
            held_out_sets=dict(profile.held_out_sets) if profile else {},
        )


def tokenizer_json(tokenizer: Any) -> str | None:
    """The fast tokenizer's JSON, so the gateway can count tokens without transformers."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        return str(backend.to_str())
    logger.warning("tokenizer %s has no fast backend; the gateway cannot check prompt length", type(tokenizer))
    return None


_lock = threading.Lock()
_runtime: Runtime | None = None
_job_store: JobStore | None = None


def job_store() -> JobStore:
    """One JobStore (one Redis connection pool) per process; cheap, no model involved."""
    global _job_store
    if _job_store is None:
        settings = get_settings()
        _job_store = JobStore.from_url(settings.redis_url, settings.job_ttl_s)
    return _job_store


def get_runtime() -> Runtime:
    """The process's runtime, built on first use (seconds; minutes for a hub model on a GPU)."""
    global _runtime
    if _runtime is not None:
        return _runtime
    with _lock:
        if _runtime is None:
            _runtime = _build(get_settings())
    return _runtime


def loaded() -> bool:
    return _runtime is not None


def _build(settings: Settings) -> Runtime:
    from adaptors.generation import configure_threads, load_pipeline
    from adaptors.readers.registry import load_classifier

    t0 = time.perf_counter()
    configure_threads(settings.torch_threads)
    pipe = load_pipeline(settings.base_model, settings.device, settings.offline)
    classifier = load_classifier(settings.classifier, settings.base_model, device=pipe.device)
    from adaptors.readers.registry import load_auditor

    auditor = load_auditor(settings.classifier, settings.audit_reader, settings.base_model, classifier, device=pipe.device)
    store = cache = None
    from adaptors.cache import AdaptorCache
    from adaptors.store import AdaptorStore

    settings.adaptor_dir.mkdir(parents=True, exist_ok=True)
    store = AdaptorStore(settings.adaptor_dir)
    cache = AdaptorCache(pipe, store, settings.adaptor_cache_bytes, base_model=settings.base_model)
    load_s = time.perf_counter() - t0
    logger.info("worker runtime ready in %.2fs (steering reader: %s, audit reader: %s)", load_s,
                getattr(classifier, "name", "none"), getattr(auditor, "name", "none"))  # fmt: skip
    return Runtime(settings, pipe, classifier, store, cache, load_s, auditor=auditor)


def warm_up(runtime: Runtime) -> None:
    """One tiny generation so the first real job does not pay for lazy kernel/allocator setup."""
    from adaptors.generation import GenerationSpec, generate

    t0 = time.perf_counter()
    generate(runtime.pipe, GenerationSpec(prompt="warm up", num_images=1, steps=1), max_batch=1)
    logger.info("warm-up generation took %.2fs", time.perf_counter() - t0)


def incr_stats(client: redis.Redis, gauges: dict[str, float] | None = None, **counters: int) -> None:
    """Add to the shared counters the gateway exports at /metrics (HINCRBY: many workers, one hash).

    `gauges` are set, not added (e.g. adaptor_cache_bytes: the last reporting worker's value).
    """
    pipe = client.pipeline()
    any_ = bool(gauges)
    if gauges:
        pipe.hset(STATS_KEY, mapping=gauges)
    for name, value in counters.items():
        if value:
            pipe.hincrby(STATS_KEY, name, int(value))
            any_ = True
    if any_:
        pipe.execute()
