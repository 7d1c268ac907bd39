"""Liveness, readiness and Prometheus metrics; unauthenticated so orchestrators can probe them."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from common.celery_config import INFERENCE_QUEUE
from service.api.deps import StoreDep
from service.errors import ServiceUnavailable, error_responses
from service.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is alive (no dependency checked)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses=error_responses(503))
def readyz(store: StoreDep) -> Ready:
    """Ready = the broker answers PING and at least one inference worker has a fresh heartbeat."""
    try:
        store.r.ping()
        workers = sorted(store.live_workers(INFERENCE_QUEUE))
    except RedisError as exc:
        raise ServiceUnavailable(f"broker unreachable: {exc}", code="broker_unavailable") from exc
    if not workers:
        raise ServiceUnavailable("no inference worker is alive (no fresh heartbeat)", code="no_worker")
    return Ready(status="ready", workers=workers)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """Prometheus exposition format."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
