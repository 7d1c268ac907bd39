"""Fast recovery of jobs whose worker died mid-task.

With acks_late on Redis, a killed worker's message stays unacknowledged and Redis hands it out
again only after the visibility timeout, which must exceed the longest training job (hours).
Every live worker therefore also sweeps for jobs marked running by a worker incarnation that no
longer heartbeats, and re-sends their task once (a Redis SET NX per job and dead incarnation).
Tasks are idempotent by job id, so the late redelivery of the original message is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from common.jobs import PREFIX, JobStore
from common.schemas import JobKind, JobState

logger = logging.getLogger(__name__)

RECOVER_KEY = PREFIX + ":recover:{id}:{worker}"
ALIVE_KEY = PREFIX + ":alive:{worker}"  # process liveness, set from worker start (before the model loads)


def mark_alive(store: JobStore, worker: str, ttl_s: int) -> None:
    store.r.set(ALIVE_KEY.format(worker=worker), time.time(), ex=ttl_s)


def is_alive(store: JobStore, worker: str) -> bool:
    return bool(store.r.exists(ALIVE_KEY.format(worker=worker)))


def incarnation(hostname: str | None = None) -> str:
    """This worker process's identity: Celery node name plus pid, so a restarted container with the
    same node name is still recognised as a new incarnation (its predecessor's jobs are orphans)."""
    return f"{hostname or socket.gethostname()}/{os.getpid()}"


def orphaned_jobs(store: JobStore, kind: JobKind, queue: str, window_s: float, grace_s: float,
                  now: float | None = None) -> list[str]:  # fmt: skip
    """Running jobs of `queue` created within `window_s` whose worker process is gone; reads only running jobs.

    `grace_s` spares jobs that started only just now (their worker's first beat may be in flight).
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
        if now - float(job.get("started", now)) < grace_s or is_alive(store, str(job.get("worker", ""))):
            continue
        out.append(job_id)
    return out


def requeue_orphans(store: JobStore, app: Any, kind: JobKind, queue: str, task_name: str, window_s: float,
                    grace_s: float) -> list[str]:  # fmt: skip
    """Re-send the task of each orphaned job once; returns the job ids re-sent."""
    sent = []
    for job_id in orphaned_jobs(store, kind, queue, window_s, grace_s):
        job = store.get(job_id) or {}
        key = RECOVER_KEY.format(id=job_id, worker=job.get("worker", ""))
        if store.r.set(key, "1", nx=True, ex=max(60, int(window_s))):
            app.send_task(task_name, args=[job_id])
            logger.warning("job %s was running on %s, which stopped heartbeating; re-queued it", job_id, job.get("worker"))
            sent.append(job_id)
    return sent
