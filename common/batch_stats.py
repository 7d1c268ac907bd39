"""The inference workers' batching figures, kept in Redis so every gateway exports the same histograms.

Workers (many processes) add each shared pass to one hash; the gateway's /metrics turns it into
Prometheus histograms (batch size in images, time spent waiting for a batch) and counters (images
and seconds rendered in passes, whose ratio is the served images/s). Torch-free: the gateway and
the workers share it.
"""

from __future__ import annotations

from typing import Any

import redis

from common.redis_keys import BATCH_STATS_KEY

__all__ = ["BATCH_STATS_KEY", "histogram", "record_batch"]
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # images in one pass
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)  # seconds a pass waited for more requests


def _observe(pipe: Any, name: str, buckets: tuple[float, ...], value: float) -> None:
    for le in buckets:
        if value <= le:
            pipe.hincrby(BATCH_STATS_KEY, f"{name}_bucket:{le}", 1)
    pipe.hincrby(BATCH_STATS_KEY, f"{name}_count", 1)
    pipe.hincrbyfloat(BATCH_STATS_KEY, f"{name}_sum", float(value))


def record_batch(client: redis.Redis, jobs: int, images: int, wait_s: float, render_s: float) -> None:
    """Count one shared pass: `jobs` requests, `images` images, `wait_s` spent gathering, `render_s` denoising."""
    pipe = client.pipeline()
    _observe(pipe, "size", SIZE_BUCKETS, images)
    _observe(pipe, "wait_seconds", WAIT_BUCKETS, wait_s)
    pipe.hincrby(BATCH_STATS_KEY, "jobs", int(jobs))
    pipe.hincrby(BATCH_STATS_KEY, "images", int(images))
    pipe.hincrbyfloat(BATCH_STATS_KEY, "render_seconds", float(render_s))
    pipe.execute()


def histogram(stats: dict[str, str], name: str, buckets: tuple[float, ...]) -> tuple[list[tuple[str, float]], float]:
    """([(le, cumulative count)...] ending at +Inf, sum) of one histogram in the hash's fields."""
    out = [(str(float(le)), float(stats.get(f"{name}_bucket:{le}", 0))) for le in buckets]
    out.append(("+Inf", float(stats.get(f"{name}_count", 0))))
    return out, float(stats.get(f"{name}_sum", 0.0))
