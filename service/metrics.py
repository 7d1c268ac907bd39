"""Prometheus metrics for the gateway, in a registry per app (tests build many apps).

- requests by route template and status, with latency (ASGI middleware below);
- queue depth and live workers per queue, read from the job store at scrape time;
- job durations and images generated, observed once per job when the gateway first sees it
  finished (a Redis HSETNX on the job record makes that once across gateway replicas);
- worker-side counters (adaptor cache hits/misses, swaps, ...) that workers keep in the Redis
  hash `fairdiff:stats`, exported as gauges `fairdiff_worker_<field>`;
- the inference workers' shared passes (common/batch_stats.py): batch size and batch wait histograms,
  images and seconds rendered in passes (rate(images) / rate(seconds) is the images/s while rendering).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from typing import Any

import redis.exceptions
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.batch_stats import BATCH_STATS_KEY, SIZE_BUCKETS, WAIT_BUCKETS, histogram
from common.celery_config import INFERENCE_QUEUE, TRAINING_QUEUE
from common.jobs import JOB_KEY, JobStore
from common.redis_keys import STATS_KEY
from common.schemas import JobState

logger = logging.getLogger(__name__)

QUEUES = (INFERENCE_QUEUE, TRAINING_QUEUE)
# Always exported (0 until a worker reports), so dashboards and alerts find them from the start.
KNOWN_WORKER_STATS = (
    "adaptor_cache_hits", "adaptor_cache_misses", "adaptor_swaps", "adaptor_cache_bytes",
    # fairness, per strategy where it says so (workers/inference.py _fairness_stats)
    "images_delivered_assign", "images_delivered_adaptor", "images_delivered_guidance", "images_delivered_none",
    "requests_audited_assign", "requests_met_assigned_assign", "enforcement_rounds", "enforcement_shortfalls",
    "no_person_images", "ledger_settlements", "ledger_drift_milli_total", "ledger_drift_last",
)  # fmt: skip
_OBSERVED_FIELD = "metrics_observed"
# Label values come from a fixed set, whatever clients send: any other method is "other", any path that matches
# no route is "unmatched" (route_template), so /metrics cannot be grown by made-up requests.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _metric_name(field: str) -> str:
    return "fairdiff_worker_" + re.sub(r"[^a-zA-Z0-9_]", "_", field).strip("_").lower()


class StoreCollector(Collector):
    """Gauges read from Redis on each scrape; a Redis outage leaves them out instead of failing /metrics."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily("fairdiff_queue_depth", "Jobs waiting per queue", labels=["queue"])
        workers = GaugeMetricFamily("fairdiff_live_workers", "Workers with a fresh heartbeat per queue", labels=["queue"])
        stats: dict[str, Any] = {}
        try:
            for q in QUEUES:
                depth.add_metric([q], self.store.queue_depth(q))
                workers.add_metric([q], len(self.store.live_workers(q)))
            stats = dict(self.store.r.hgetall(STATS_KEY))
            batch = dict(self.store.r.hgetall(BATCH_STATS_KEY))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            logger.warning("metrics: redis unavailable, store gauges left out: %s", exc)
            return
        yield depth
        yield workers
        values: dict[str, float] = {f: 0.0 for f in KNOWN_WORKER_STATS}
        for field, raw in stats.items():
            try:
                values[str(field)] = float(raw)
            except (TypeError, ValueError):
                continue
        for field, value in sorted(values.items()):
            gauge = GaugeMetricFamily(_metric_name(field), f"Worker-reported {field} (from Redis {STATS_KEY})")
            gauge.add_metric([], value)
            yield gauge
        yield from _batch_metrics(batch)


def _batch_metrics(stats: dict[str, str]) -> Iterable[Any]:
    """The inference workers' shared passes, from the hash common/batch_stats.py keeps."""
    for name, buckets, doc in (("size", SIZE_BUCKETS, "Images per shared denoising pass of an inference worker"),
                               ("wait_seconds", WAIT_BUCKETS, "Time a pass waited for more requests to batch")):  # fmt: skip
        counts, total = histogram(stats, name, buckets)
        family = HistogramMetricFamily(f"fairdiff_batch_{name}", doc)
        family.add_metric([], counts, total)
        yield family
    for field, doc in (("jobs", "Requests served in shared passes"), ("images", "Images rendered in shared passes"),
                       ("render_seconds", "Seconds spent rendering shared passes")):  # fmt: skip
        yield CounterMetricFamily(f"fairdiff_batch_{field}", doc, value=float(stats.get(field, 0.0)))


class GatewayMetrics:
    """All of one app's metrics, and the registry /metrics renders."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fairdiff_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "fairdiff_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "fairdiff_job_duration_seconds",
            "Job run time (start to finish) by kind and final state",
            ["kind", "state"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 4 * 3600),
            registry=self.registry,
        )
        self.images = Counter("fairdiff_images_generated", "Images generated by succeeded jobs", registry=self.registry)
        self.registry.register(StoreCollector(store))
        self.routes: list[Any] = []  # the app's routes, set by create_app; for templates of non-API routes

    def route_template(self, scope: Scope) -> str:
        """The matched route's template; FastAPI puts API routes in the scope, others (/docs) we match here."""
        route = scope.get("route")
        if getattr(route, "path", None):
            return str(route.path)
        path = scope.get("path", "")
        for candidate in self.routes:
            regex = getattr(candidate, "path_regex", None)
            if regex is not None and regex.match(path):
                return str(candidate.path)
        return "unmatched"

    def observe_job(self, job: dict[str, Any]) -> None:
        """Count a finished job once (HSETNX claims it), whichever gateway or request sees it first."""
        state = job.get("state")
        if state is None or not JobState(state).finished or job.get(_OBSERVED_FIELD):
            return
        if not self.store.r.hsetnx(JOB_KEY.format(id=job["id"]), _OBSERVED_FIELD, "1"):
            return
        start = job.get("started") or job.get("created")
        end = job.get("finished")
        if start is not None and end is not None:
            self.job_duration.labels(job.get("kind", "unknown"), state).observe(max(0.0, end - start))
        if state == JobState.succeeded.value and job.get("kind") == "generate":
            images = (job.get("result") or {}).get("images") or []
            self.images.inc(len(images))


class MetricsMiddleware:
    """Counts every request by its route template and a known method (not the raw path or method, which would
    let any client add label values without bound)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = self.metrics.route_template(scope)
            method = scope.get("method", "")
            method = method if method in HTTP_METHODS else "other"
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
