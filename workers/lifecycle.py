"""The start of every task: re-read the job and decide whether there is anything to run.

Tasks carry only a job id (acks_late redelivers them), so the job record is the truth: a
missing or finished job is left alone and a job cancelled while queued is closed without work.
"""

from __future__ import annotations

import logging
from typing import Any

from common.jobs import JobStore
from common.schemas import JobState

logger = logging.getLogger(__name__)


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
    jobs.mark_running(job_id, worker)
    return job, None
