"""The gateway application factory. Run with `uvicorn service.app:create_app --factory`.

No app is built at import time: settings come from the environment and may be invalid (e.g. the
default admin token outside dev), which should fail the server start, not an import.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from celery import Celery
from fastapi import FastAPI
from redis import Redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.celery_config import make_celery
from common.jobs import JobStore
from common.settings import Settings, get_settings
from service.api.docs import install_docs, install_typed_openapi
from service.api.routes import adaptors, admin, generate, health, jobs, models, openai_images
from service.api.routes.playground import install_playground
from service.errors import PayloadTooLarge, install_error_handlers
from service.limits import WaitHolders
from service.metrics import GatewayMetrics, MetricsMiddleware
from service.webhooks import run_dispatcher

logger = logging.getLogger(__name__)

DESCRIPTION = """Text-to-image generation with fairness as a request parameter.

`POST /v1/generate` with an optional `fairness_target` (per attribute, the wanted share of each class)
answers 202 with a job id; poll `GET /v1/jobs/{id}` for progress and the audited result. Every error
is `{"error": {"message", "type", "param", "code"}}` with `param` naming the offending field."""


class BodyLimitMiddleware:
    """413 for bodies over the limit, by Content-Length and by the bytes actually sent (chunked uploads).

    The body is buffered (it is small by construction) and replayed to the app, so an oversized
    body is refused before any route or JSON parser sees it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send) -> None:
        err = PayloadTooLarge(f"request body is larger than {self.max_bytes} bytes", param="body")
        payload = json.dumps(err.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": err.status_code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._refuse(send)
                    return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class LazyCelery:
    """The Celery app, built on first use (most routes never send a task), once even under concurrent requests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._app: Celery | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Celery:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = make_celery(self.settings)
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    dispatcher = asyncio.create_task(run_dispatcher(app)) if app.state.settings.webhook_secret else None
    yield
    if dispatcher is not None:
        dispatcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dispatcher
    # Release broker and store connections on shutdown.
    app.state.celery.close()
    app.state.store.r.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    client = Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_connect_timeout=2,
        socket_timeout=10,
        health_check_interval=30,
    )
    store = JobStore(client, ttl_s=settings.job_ttl_s)

    app = FastAPI(
        title="fairdiff",
        version="0.1.0",
        description=DESCRIPTION,
        docs_url=None,  # service.api.docs serves /docs and /redoc from local assets
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.celery = LazyCelery(settings)
    app.state.metrics = GatewayMetrics(store)
    app.state.wait_holders = WaitHolders(settings.max_wait_holders)

    install_error_handlers(app)
    install_docs(app)
    install_typed_openapi(app)
    for module in (generate, openai_images, jobs, adaptors, models, admin, health):
        app.include_router(module.router)
    install_playground(app)

    app.state.metrics.routes = list(app.routes)
    # Added last = outermost: metrics see every request, including ones refused for their size.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    logger.info("gateway ready: base model %r, redis %s", settings.base_model, _redacted(settings.redis_url))
    return app


def _redacted(url: str) -> str:
    """The Redis URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
