"""The one Celery configuration, shared by the gateway (which only sends tasks by name) and
the workers (which run them). Torch-free, so the gateway can import it.
"""

from __future__ import annotations

from celery import Celery

from common.settings import Settings

GENERATE_TASK = "fairdiff.inference.generate"
FINETUNE_TASK = "fairdiff.training.finetune"
INFERENCE_QUEUE = "inference"
TRAINING_QUEUE = "training"


def make_celery(settings: Settings) -> Celery:
    app = Celery("fairdiff", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_routes={
            GENERATE_TASK: {"queue": INFERENCE_QUEUE},
            FINETUNE_TASK: {"queue": TRAINING_QUEUE},
        },
        task_default_queue=INFERENCE_QUEUE,
        # A task is acknowledged only once it has finished, so a worker killed mid-job leaves it
        # on the broker to be redelivered; tasks are idempotent by job id, which makes that safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_expires=settings.job_ttl_s,
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app
