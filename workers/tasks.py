"""The Celery tasks: thin wrappers that carry only a job id and delegate to workers.inference/training.

Everything a task needs is re-read from the job store, so a redelivered message (after a worker
was killed, or Redis redelivering past the visibility timeout) finds the job's current truth.
Only transient broker/store errors are retried; everything else fails the job with a reason.
"""

from __future__ import annotations

import logging

import redis

from common.celery_config import FINETUNE_TASK, GENERATE_TASK
from common.schemas import JobState
from workers.celery_app import app
from workers.generate import run_generate
from workers.recovery import executing, incarnation, note_retry
from workers.runtime import job_store, loaded
from workers.training import fail_finetune, run_finetune

logger = logging.getLogger(__name__)

MAX_RETRIES = 5
TRANSIENT = (redis.ConnectionError, redis.TimeoutError)


def _fail(job_id: str, exc: BaseException) -> None:
    try:
        job_store().finish(job_id, JobState.failed, error={"type": "internal_error", "message": f"{type(exc).__name__}: {exc}"})
    except TRANSIENT:
        logger.error("job %s failed and the job store is unreachable to record it", job_id)


def _retry(task, job_id: str, exc: BaseException):  # noqa: ANN001, ANN202 (a bound Celery task)
    countdown = min(30, 2**task.request.retries)
    note_retry(job_store(), job_id, countdown)
    return task.retry(exc=exc, countdown=countdown, max_retries=MAX_RETRIES)


@app.task(name=GENERATE_TASK, bind=True)
def generate_task(self, job_id: str) -> str:
    try:
        with executing(job_id):  # this process's beats hold the job's lease while it runs
            return run_generate(job_store(), job_id, incarnation(self.request.hostname))
    except TRANSIENT as exc:
        logger.warning("generate %s: store unreachable (%s); retry %d", job_id, exc, self.request.retries + 1)
        raise _retry(self, job_id, exc) from exc
    except Exception as exc:
        logger.exception("generate %s failed", job_id)
        _fail(job_id, exc)
        return JobState.failed.value


@app.task(name=FINETUNE_TASK, bind=True)
def finetune_task(self, job_id: str) -> str:
    try:
        with executing(job_id):
            return run_finetune(job_store(), job_id, incarnation(self.request.hostname))
    except TRANSIENT as exc:
        logger.warning("finetune %s: store unreachable (%s); retry %d", job_id, exc, self.request.retries + 1)
        raise _retry(self, job_id, exc) from exc
    except Exception as exc:
        logger.exception("finetune %s failed", job_id)
        from workers.runtime import get_runtime

        try:
            fail_finetune(job_store(), get_runtime() if loaded() else None, job_id,
                          {"type": "internal_error", "message": f"{type(exc).__name__}: {exc}"})  # fmt: skip
        except TRANSIENT:
            logger.error("finetune %s failed and the job store is unreachable to record it", job_id)
        return JobState.failed.value
