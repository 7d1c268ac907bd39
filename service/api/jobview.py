"""Turning job-store records into public views, shared by the jobs, generate and admin routes."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from common.jobs import JOB_KEY, JobStore
from common.schemas import JobKind, JobState
from service.api.deps import Caller
from service.errors import NotFound
from service.images import present_images
from service.webhooks import delivery_state

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# fields of a job's request that only workers read: the ledger's tenant scope is the caller's opaque tenant id
_PRIVATE_REQUEST_FIELDS = frozenset({"ledger_scope"})
POLL_INTERVAL_S = 0.01  # one small HGETALL on a local Redis: cheap next to the latency it saves
MAX_POLL_INTERVAL_S = 0.25
WAIT_POLL_MAX_S = 0.05  # `Prefer: wait` probes one field, so it need not back off far


def job_url(request: Request, job: dict[str, Any]) -> str:
    name = "get_finetune" if job.get("kind") == JobKind.finetune.value else "get_job"
    return str(request.app.url_path_for(name, job_id=job["id"]))


def public_job(request: Request, store: JobStore, job: dict[str, Any]) -> dict[str, Any]:
    """The record plus what clients need: its URL, and the queue position while it waits."""
    out = dict(job)
    out.pop("owner", None)  # the tenant id is the server's own business
    if isinstance(out.get("request"), dict):
        out["request"] = {k: v for k, v in out["request"].items() if k not in _PRIVATE_REQUEST_FIELDS}
    if job.get("kind") == JobKind.generate.value:
        present_images(out, request.app.state.settings.jobs_dir)
    out["url"] = job_url(request, job)
    out["webhook"] = delivery_state(store, job["id"])
    out["cancel_requested"] = bool(job.get("cancel"))
    out["queue_position"] = store.queue_position(job["id"], job["queue"]) if job.get("state") == JobState.queued.value else None
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.observe_job(job)
    return out


def load_job(store: JobStore, job_id: str, kind: JobKind, caller: Caller | None = None) -> dict[str, Any]:
    """The job, or 404 for malformed ids, unknown ids, jobs of another kind and jobs of another tenant alike
    (404, not 403: a caller learns nothing about jobs that are not its own, not even that they exist)."""
    job = store.get(job_id) if _JOB_ID.match(job_id) else None
    if job is None or job.get("kind") != kind.value or (caller is not None and not caller.owns(job)):
        noun = "job" if kind is JobKind.generate else "finetune job"
        raise NotFound(f"no {noun} with id {job_id!r}", param="id", code="job_not_found")
    return job


def parse_prefer_wait(header: str | None, max_wait_s: float) -> float:
    """Seconds to wait from an RFC 7240 `Prefer: wait=N` header (0 when absent), capped by settings."""
    if not header:
        return 0.0
    for part in re.split(r"[,;]", header):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                wait = float(value.strip().strip('"'))
            except ValueError:
                return 0.0
            if wait != wait or wait <= 0:  # NaN or non-positive
                return 0.0
            return min(wait, max_wait_s)
    return 0.0


async def wait_for_finish(store: JobStore, job_id: str, wait_s: float) -> dict[str, Any] | None:
    """Poll the job's state (one HGET) until it finishes or the wait runs out; the last record read.

    The probe is a single field, so it can stay frequent (at most WAIT_POLL_MAX_S apart) however long the
    job runs: a client served from a shared batch learns of it within a few ms and sends its next request
    in time for the next pass, where a backed-off poll left it a quarter second late.
    """
    deadline = time.monotonic() + wait_s
    interval = POLL_INTERVAL_S
    job = await run_in_threadpool(store.get, job_id)
    while job is not None and not JobState(job["state"]).finished and time.monotonic() < deadline:
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(interval * 1.5, WAIT_POLL_MAX_S)
        state = await run_in_threadpool(store.r.hget, JOB_KEY.format(id=job_id), "state")
        if state is None or JobState(state).finished or time.monotonic() >= deadline:
            job = await run_in_threadpool(store.get, job_id)
    return job
