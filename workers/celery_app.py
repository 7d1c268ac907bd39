"""The workers' Celery app: `celery -A workers.celery_app worker -Q inference|training --pool=solo`.

At worker_ready a small thread loads the base model (once per process), warms it up, publishes
ModelInfo for the gateway's validation (inference workers) and then heartbeats every few
seconds, so the gateway's /readyz reports an inference worker only once it can really serve.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import setup_logging, worker_ready, worker_shutdown

from common.celery_config import FINETUNE_TASK, GENERATE_TASK, INFERENCE_QUEUE, TRAINING_QUEUE, make_celery
from common.disk_layout import checkpoints_dir
from common.schemas import JobKind
from common.settings import get_settings

logger = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
HEARTBEAT_TTL_S = 20
SWEEP_EVERY = 3  # heartbeats between sweeps for orphaned jobs (workers/recovery.py)
RECOVERABLE = {INFERENCE_QUEUE: (JobKind.generate, GENERATE_TASK), TRAINING_QUEUE: (JobKind.finetune, FINETUNE_TASK)}

app = make_celery(get_settings())
# the worker imports the task module when it starts (Celery's `imports` setting), so that module may import `app`
# from here without this module importing it back
app.conf.imports = ("workers.tasks",)

_stop = threading.Event()


@setup_logging.connect
def _setup_logging(loglevel: Any = logging.INFO, **_: Any) -> None:
    """Plain stderr logging for our modules and Celery's; connected so Celery leaves the root alone."""
    level = loglevel if isinstance(loglevel, int) else logging.getLevelName(str(loglevel).upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _consumed_queues(sender: Any) -> list[str]:
    try:
        return sorted(sender.app.amqp.queues.consume_from)
    except Exception:  # pragma: no cover - defensive: never stop a worker over bookkeeping
        return [INFERENCE_QUEUE]


def _alive_loop(worker: str) -> None:
    """Process liveness from the first moment, so peers never mistake a loading worker's jobs for orphans; each
    beat also names the jobs this process is executing, renewing their leases (workers/recovery.py)."""
    from workers.recovery import executing_now, mark_alive
    from workers.runtime import job_store

    while not _stop.is_set():
        try:
            mark_alive(job_store(), worker, HEARTBEAT_TTL_S, executing_now())  # renews the leases of its jobs
        except Exception as exc:
            logger.warning("liveness beat failed: %s", exc)
        _stop.wait(HEARTBEAT_S)


def _sweep(queues: list[str]) -> None:
    """Re-queue orphaned jobs, then remove jobs past their retention (both bounded: running jobs, SWEEP_BATCH)."""
    from common.jobs import sweep_expired
    from workers.recovery import requeue_orphans
    from workers.runtime import job_store

    settings = get_settings()
    for queue in queues:
        if queue in RECOVERABLE:
            kind, task = RECOVERABLE[queue]
            requeue_orphans(job_store(), app, kind, queue, task, settings.visibility_timeout_s, HEARTBEAT_TTL_S)
    sweep_expired(job_store(), [settings.jobs_dir, checkpoints_dir(settings.data_dir)])


def _lifecycle(queues: list[str], worker: str) -> None:
    """Load + warm (inference), publish the model, then heartbeat until the worker shuts down."""
    from workers.runtime import get_runtime, job_store, warm_up

    serves_inference = INFERENCE_QUEUE in queues
    runtime = None
    try:
        runtime = get_runtime()
        if serves_inference:
            warm_up(runtime)
    except Exception:
        logger.exception("could not load the base model; this worker will not report itself alive")
        return
    info = runtime.model_info() if serves_inference else None
    beats = 0
    while not _stop.is_set():
        try:
            store = job_store()
            if info is not None:
                # Re-published every beat: survives a Redis restart or a flushed key.
                store.publish_model(info)
            for queue in queues:
                store.heartbeat(queue, worker, ttl_s=HEARTBEAT_TTL_S)
            if beats % SWEEP_EVERY == 0:
                _sweep(queues)
        except Exception as exc:
            logger.warning("heartbeat failed: %s", exc)
        beats += 1
        _stop.wait(HEARTBEAT_S)


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    from workers.recovery import incarnation

    queues = _consumed_queues(sender)
    worker = incarnation(getattr(sender, "hostname", None))
    logger.info("worker %s ready on queues %s; loading the base model", worker, queues)
    threading.Thread(target=_alive_loop, args=(worker,), name="fairdiff-alive", daemon=True).start()
    threading.Thread(target=_lifecycle, args=(queues, worker), name="fairdiff-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    _stop.set()
