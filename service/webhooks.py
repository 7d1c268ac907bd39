"""Webhooks: one signed POST when a job finishes, retried with backoff, delivered by the gateway, never by a worker.

A request's `webhook` URL is checked when the request arrives (http or https, an allowed host, and no private,
loopback or link-local address unless the deployment allows them) and registered in Redis next to the job. Each
gateway process runs one dispatcher: it looks at registered jobs that are due, and once a job has finished in one of
the chosen states it POSTs `{"type": "job.<state>", "timestamp", "data": <the job>}`. A Redis lock per job makes one
gateway deliver it, and the registration outlives a gateway restart, so a delivery is never lost to one.

Signatures follow the Standard Webhooks convention: headers `webhook-id` (the same for every retry of one
delivery), `webhook-timestamp` (Unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">` under the deployment's `webhook_secret` (a `whsec_` prefix means the rest is base64).
A 2xx answer is a delivery; anything else, or no answer within `webhook_timeout_s`, is retried after
`webhook_retry_base_s` doubling each time, `webhook_max_attempts` times in all; then the webhook is given up.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI

from common.jobs import JobStore
from common.redis_keys import WEBHOOK_KEY, WEBHOOK_LOCK_KEY, WEBHOOKS_PENDING
from common.schemas import JobKind, JobState
from common.settings import Settings
from service.errors import InvalidField
from service.images import present_images

logger = logging.getLogger(__name__)

FINAL_EVENTS = ("succeeded", "failed", "cancelled")
POLL_UNFINISHED_S = 1.0  # how often a registered job that is still running is looked at
MAX_BACKOFF_S = 300.0
BATCH = 50


# -- checking and registering ----------------------------------------------------------------------
def url_refusal(url: str, settings: Settings) -> tuple[str, str] | None:
    """Why a webhook URL may not be called, as (code, message); None when it may."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return "invalid_webhook_url", f"not a URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "webhook_scheme", "must be an http or https URL with a host"
    if parts.username or parts.password:
        return "invalid_webhook_url", "must not carry credentials"
    host = parts.hostname.lower()
    allowed = [h.strip().lower() for h in settings.webhook_allowed_hosts.split(",") if h.strip()]
    if allowed and host not in allowed:
        return "webhook_host_not_allowed", f"host {host!r} is not one of FAIRDIFF_WEBHOOK_ALLOWED_HOSTS"
    if settings.webhook_allow_private:
        return None
    try:
        infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except OSError:
        return "webhook_unresolvable", f"host {host!r} does not resolve"
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not address.is_global:
            return "webhook_private_address", (
                f"host {host!r} resolves to a non-public address ({address}); set FAIRDIFF_WEBHOOK_ALLOW_PRIVATE to allow it"
            )
    return None


def check_webhook(url: str | None, settings: Settings) -> None:
    """422 naming `webhook` unless the URL may be called (or none was given)."""
    if url is None:
        return
    if not settings.webhook_secret:
        raise InvalidField("webhook: this deployment has no FAIRDIFF_WEBHOOK_SECRET, so it sends no webhooks",
                           param="webhook", code="webhooks_disabled")  # fmt: skip
    refusal = url_refusal(url, settings)
    if refusal is not None:
        raise InvalidField(f"webhook: {refusal[1]}", param="webhook", code=refusal[0])


def register(store: JobStore, job_id: str, url: str, events: list[str] | None) -> None:
    key = WEBHOOK_KEY.format(id=job_id)
    pipe = store.r.pipeline()
    pipe.hset(key, mapping={"url": url, "events": json.dumps(list(events or FINAL_EVENTS)), "attempts": 0, "state": "pending"})
    pipe.expire(key, store.ttl_s + 3600)
    pipe.zadd(WEBHOOKS_PENDING, {job_id: time.time()})
    pipe.execute()


def delivery_state(store: JobStore, job_id: str) -> dict[str, Any] | None:
    """What the job's view shows of its webhook: state (pending, delivered, failed, refused, skipped) and attempts."""
    hook = store.r.hgetall(WEBHOOK_KEY.format(id=job_id))
    if not hook:
        return None
    out: dict[str, Any] = {"state": hook.get("state", "pending"), "attempts": int(hook.get("attempts", 0))}
    if hook.get("last_status"):
        out["last_status"] = int(hook["last_status"])
    if hook.get("last_error"):
        out["last_error"] = hook["last_error"]
    return out


# -- signing -----------------------------------------------------------------------------------------
def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret[len("whsec_") :]) if secret.startswith("whsec_") else secret.encode("utf-8")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret_bytes(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300.0) -> bool:
    """A receiver's check (for clients and tests): the signature matches and the timestamp is recent."""
    msg_id, ts = headers["webhook-id"], int(headers["webhook-timestamp"])
    if abs(time.time() - ts) > tolerance_s:
        return False
    expected = sign(secret, msg_id, ts, body).split(",", 1)[1]
    given = [s.split(",", 1)[1] for s in headers["webhook-signature"].split() if s.startswith("v1,")]
    return any(hmac.compare_digest(expected, g) for g in given)


# -- delivering ----------------------------------------------------------------------------------------
def job_payload(app: FastAPI, job: dict[str, Any]) -> dict[str, Any]:
    """The finished job as its owner reads it (without the owner's tenant id or the ledger's scope)."""
    # images_ready: the event stream's progress record, which the finished job's result supersedes
    data = {k: v for k, v in job.items() if k not in ("owner", "cancel", "queue", "worker", "attempts", "images_ready")}
    if isinstance(data.get("request"), dict):
        data["request"] = {k: v for k, v in data["request"].items() if k != "ledger_scope"}
    if job.get("kind") == JobKind.generate.value:
        present_images(data, app.state.settings.jobs_dir)
    name = "get_finetune" if job.get("kind") == JobKind.finetune.value else "get_job"
    data["url"] = str(app.url_path_for(name, job_id=job["id"]))
    return data


def _next(store: JobStore, job_id: str, delay_s: float) -> None:
    store.r.zadd(WEBHOOKS_PENDING, {job_id: time.time() + delay_s})


def _close(store: JobStore, job_id: str, **fields: Any) -> None:
    pipe = store.r.pipeline()
    pipe.hset(WEBHOOK_KEY.format(id=job_id), mapping={k: v for k, v in fields.items() if v is not None})
    pipe.zrem(WEBHOOKS_PENDING, job_id)
    pipe.execute()


def _prepare(app: FastAPI, store: JobStore, job_id: str) -> tuple[str, bytes, str, int] | None:
    """What to send for a due job (url, body, message id, attempts so far), or None when nothing is to be sent now."""
    settings: Settings = app.state.settings
    hook = store.r.hgetall(WEBHOOK_KEY.format(id=job_id))
    job = store.get(job_id)
    if not hook or job is None:
        store.r.zrem(WEBHOOKS_PENDING, job_id)
        return None
    state = JobState(job["state"])
    if not state.finished:
        _next(store, job_id, POLL_UNFINISHED_S)
        return None
    if state.value not in json.loads(hook["events"]):
        _close(store, job_id, state="skipped")
        return None
    refusal = url_refusal(hook["url"], settings)  # again: the name may resolve elsewhere by now
    if refusal is not None:
        _close(store, job_id, state="refused", last_error=refusal[1])
        return None
    finished = datetime.fromtimestamp(job.get("finished") or time.time(), tz=timezone.utc).isoformat()
    payload = {"type": f"job.{state.value}", "timestamp": finished, "data": job_payload(app, job)}
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    return hook["url"], body, f"msg_{job_id}_{state.value}", int(hook.get("attempts", 0))


def _record(store: JobStore, settings: Settings, job_id: str, attempts: int, status: int | None, error: str | None) -> None:
    if status is not None and 200 <= status < 300:
        _close(store, job_id, state="delivered", attempts=attempts, last_status=status, last_error="")
        logger.info("webhook for job %s delivered (HTTP %d, attempt %d)", job_id, status, attempts)
        return
    reason = error or f"HTTP {status}"
    if attempts >= settings.webhook_max_attempts:
        _close(store, job_id, state="failed", attempts=attempts, last_status=status, last_error=reason)
        logger.warning("webhook for job %s given up after %d attempts: %s", job_id, attempts, reason)
        return
    store.r.hset(WEBHOOK_KEY.format(id=job_id), mapping={"attempts": attempts, "last_status": status or "", "last_error": reason})
    _next(store, job_id, min(MAX_BACKOFF_S, settings.webhook_retry_base_s * 2 ** (attempts - 1)))


async def deliver(app: FastAPI, client: httpx.AsyncClient, job_id: str) -> None:
    store: JobStore = app.state.store
    settings: Settings = app.state.settings
    lock = WEBHOOK_LOCK_KEY.format(id=job_id)
    if not await asyncio.to_thread(store.r.set, lock, "1", nx=True, ex=int(settings.webhook_timeout_s) + 30):
        return  # another gateway has it
    try:
        prepared = await asyncio.to_thread(_prepare, app, store, job_id)
        if prepared is None:
            return
        url, body, msg_id, attempts = prepared
        ts = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "fairdiff-webhooks",
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(settings.webhook_secret, msg_id, ts, body),
        }
        status, error = None, None
        try:
            resp = await client.post(url, content=body, headers=headers)
            status = resp.status_code
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        await asyncio.to_thread(_record, store, settings, job_id, attempts + 1, status, error)
    finally:
        await asyncio.to_thread(store.r.delete, lock)


async def run_dispatcher(app: FastAPI, interval_s: float = 0.25) -> None:
    """Deliver due webhooks until cancelled (started by the app's lifespan when a webhook secret is set)."""
    store: JobStore = app.state.store
    settings: Settings = app.state.settings
    async with httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False) as client:
        while True:
            try:
                due = await asyncio.to_thread(store.r.zrangebyscore, WEBHOOKS_PENDING, "-inf", time.time(), 0, BATCH)
                await asyncio.gather(*(deliver(app, client, job_id) for job_id in due))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("webhook dispatcher pass failed; retrying")
                due = []
            await asyncio.sleep(0 if len(due) == BATCH else interval_s)
