"""The inference workers' shared passes on /metrics: histograms and counters built from the hash they keep."""

from __future__ import annotations

import redis
from fastapi.testclient import TestClient

from common.batch_stats import record_batch


def test_batch_size_and_wait_histograms_and_image_counters(client: TestClient, raw_redis: redis.Redis) -> None:
    record_batch(raw_redis, jobs=16, images=16, wait_s=0.03, render_s=0.8)
    record_batch(raw_redis, jobs=1, images=4, wait_s=0.0, render_s=0.3)
    text = client.get("/metrics").text
    assert 'fairdiff_batch_size_bucket{le="4.0"} 1.0' in text
    assert 'fairdiff_batch_size_bucket{le="16.0"} 2.0' in text
    assert 'fairdiff_batch_size_bucket{le="+Inf"} 2.0' in text
    assert "fairdiff_batch_size_sum 20.0" in text
    assert 'fairdiff_batch_wait_seconds_bucket{le="0.001"} 1.0' in text
    assert 'fairdiff_batch_wait_seconds_bucket{le="0.05"} 2.0' in text
    assert "fairdiff_batch_jobs_total 17.0" in text
    assert "fairdiff_batch_images_total 20.0" in text
    assert "fairdiff_batch_render_seconds_total 1.1" in text
