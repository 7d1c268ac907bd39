"""Fast recovery of running jobs that nothing is running any more.

With acks_late on Redis, a killed worker's message stays unacknowledged and Redis hands it out again only
after the visibility timeout, which must exceed the longest training job (hours). And a task that dies while
the store is unreachable (its retry cannot be sent either) leaves its job `running` under a worker that is
still alive. So each worker holds a lease on the jobs it runs: its liveness beat (every few seconds, with a
short TTL) names the jobs its task is executing right now. Every live worker sweeps the running jobs (an index
of them, not every job) for one whose lease lapsed: its worker stopped beating, or beats without naming it.
Each such job is re-sent once per run of it (a Redis SET NX per job, worker and start), and a job whose task
is waiting out a retry it managed to schedule is left to that retry. A job still executing somewhere is
always named by its worker's beat, so it is never re-run beside itself; tasks are idempotent by job id, so a
late redelivery of the original message finds the job finished and does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from common.jobs import JOB_KEY, PREFIX, JobStore
from common.schemas import JobKind, JobState

logger = logging.getLogger(__name__)

RECOVER_KEY = PREFIX + ":recover:{id}:{worker}:{started}"
ALIVE_KEY = PREFIX + ":alive:{worker}"  # process liveness and its leases, set from worker start (before the model loads)
RETRY_FIELD = "retry_at"  # on a job record: its task scheduled a retry for then, so the sweep leaves it alone

_executing: set[str] = set()  # the job ids this process's tasks are executing now
_executing_lock = threading.Lock()


class executing:
    """`with executing(job_id):` around a task body, so this process's beats hold the job's lease meanwhile."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def __enter__(self) -> None:
        with _executing_lock:
            _executing.add(self.job_id)

    def __exit__(self, *_: object) -> None:
        with _executing_lock:
            _executing.discard(self.job_id)


def executing_now() -> list[str]:
    with _executing_lock:
        return sorted(_executing)


def mark_alive(store: JobStore, worker: str, ttl_s: int, jobs: list[str] | None = None) -> None:
    """Beat: this process is alive, and holds the leases of `jobs` (those its tasks execute now)."""
    store.r.set(ALIVE_KEY.format(worker=worker), json.dumps({"t": time.time(), "jobs": jobs or []}), ex=ttl_s)


def is_alive(store: JobStore, worker: str) -> bool:
    return bool(store.r.exists(ALIVE_KEY.format(worker=worker)))


def leases(store: JobStore, worker: str) -> set[str] | None:
    """The jobs `worker`'s last beat named; None when it is not alive, or beats in a form without leases."""
    raw = store.r.get(ALIVE_KEY.format(worker=worker))
    try:
        beat = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(beat, dict) or not isinstance(beat.get("jobs"), list):
        return None
    return {str(j) for j in beat["jobs"]}


def note_retry(store: JobStore, job_id: str, countdown_s: float) -> None:
    """Record that the job's task scheduled a retry (best effort: the store may be what failed)."""
    try:
        store.r.hset(JOB_KEY.format(id=job_id), RETRY_FIELD, time.time() + countdown_s)
    except Exception as exc:
        logger.warning("job %s: could not record its retry (%s); the recovery sweep will re-queue it", job_id, exc)


def incarnation(hostname: str | None = None) -> str:
    """This worker process's identity: Celery node name plus pid, so a restarted container with the
    same node name is still recognised as a new incarnation (its predecessor's jobs are orphans)."""
    return f"{hostname or socket.gethostname()}/{os.getpid()}"


def orphaned_jobs(store: JobStore, kind: JobKind, queue: str, window_s: float, grace_s: float,
                  now: float | None = None) -> list[str]:  # fmt: skip
    """Running jobs of `queue` created within `window_s` whose lease lapsed: their worker process is gone, or
    alive and not executing them. Reads only running jobs.

    `grace_s` spares jobs that started only just now (their worker's first beat may be in flight), and jobs
    whose task scheduled a retry for less than `grace_s` ago.
    """
    now = time.time() if now is None else now
    out = []
    for job_id in store.running_ids(queue):  # O(running jobs), whatever the store holds
        job = store.get(job_id)
        if not job or job.get("state") != JobState.running.value:
            store.forget_running(queue, job_id)  # finished by a path that did not say so, or expired
            continue
        if job.get("kind") != kind.value or float(job.get("created", now)) < now - window_s:
            continue
        if now - float(job.get("started", now)) < grace_s or now - float(job.get(RETRY_FIELD) or 0) < grace_s:
            continue
        worker = str(job.get("worker", ""))
        if is_alive(store, worker):
            held = leases(store, worker)
            if held is None or job_id in held:
                continue
        out.append(job_id)
    return out


def requeue_orphans(store: JobStore, app: Any, kind: JobKind, queue: str, task_name: str, window_s: float,
                    grace_s: float) -> list[str]:  # fmt: skip
    """Re-send the task of each orphaned job once per run of it; returns the job ids re-sent."""
    sent = []
    for job_id in orphaned_jobs(store, kind, queue, window_s, grace_s):
        job = store.get(job_id) or {}
        key = RECOVER_KEY.format(id=job_id, worker=job.get("worker", ""), started=job.get("started", ""))
        if store.r.set(key, "1", nx=True, ex=max(60, int(window_s))):
            store.r.hincrby(JOB_KEY.format(id=job_id), "requeued", 1)
            app.send_task(task_name, args=[job_id], queue=queue)
            logger.warning("job %s was running on %s, which no longer holds its lease; re-queued it", job_id, job.get("worker"))
            sent.append(job_id)
    return sent
