"""The start of every task: re-read the job and decide whether there is anything to run.

Tasks carry only a job id (acks_late redelivers them), so the job record is the truth: a
missing or finished job is left alone, a job cancelled while queued is closed without work, and
a job that a live worker is running (a peer's batch gathered it, workers/batching.py) is left to
that worker's lease. Claiming is one atomic step (JobStore.try_mark_running), so of a job's own
message and a peer gathering it into a batch, exactly one runs it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from common.jobs import JOB_KEY, JobStore
from common.schemas import JobState
from workers.recovery import is_alive, leases

logger = logging.getLogger(__name__)

LEASE_GRACE_S = 20.0  # a job started this recently is held by its live worker even before a beat names it


def lease_held(jobs: JobStore, job: dict[str, Any], now: float | None = None, grace_s: float = LEASE_GRACE_S) -> bool:
    """Whether a running job's worker is alive and still running it (its beat names the job, or it just started)."""
    now = time.time() if now is None else now
    worker = str(job.get("worker", ""))
    if not worker or not is_alive(jobs, worker):
        return False
    held = leases(jobs, worker)
    return held is None or job["id"] in held or now - float(job.get("started") or 0) < grace_s


def claim(jobs: JobStore, job_id: str, worker: str, label: str) -> tuple[dict[str, Any] | None, str | None]:
    """(job, None) when the job should run now (it is marked running), else (None, outcome name)."""
    job = jobs.get(job_id)
    if job is None:
        logger.warning("%s %s: no such job (expired?); dropping the task", label, job_id)
        return None, "missing"
    state = JobState(job["state"])
    if state.finished:
        logger.info("%s %s: already %s; redelivered task ignored", label, job_id, state.value)
        return None, state.value
    if job["cancel"]:
        jobs.finish(job_id, JobState.cancelled)
        return None, JobState.cancelled.value
    if state == JobState.running and job.get("worker") != worker and lease_held(jobs, job):
        logger.info("%s %s: running on %s, which holds its lease; message dropped", label, job_id, job.get("worker"))
        return None, "held"
    started = jobs.r.hget(JOB_KEY.format(id=job_id), "started") or ""
    if not jobs.try_mark_running(job_id, worker, state.value, started):
        logger.info("%s %s: claimed concurrently by another worker; message dropped", label, job_id)
        return None, "held"
    return job, None
