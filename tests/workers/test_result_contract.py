"""The typed `result` in /openapi.json (service.contracts.GenerateResult) is what an inference worker writes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from common.celery_config import GENERATE_TASK, INFERENCE_QUEUE, make_celery
from common.jobs import JobStore
from common.schemas import GenerateJob, JobKind, JobState
from common.settings import Settings
from service.contracts import GenerateResult
from tests.support.processes import ManagedProcess, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def jobs(workers_redis: str) -> Iterator[JobStore]:
    store = JobStore.from_url(workers_redis)
    yield store
    store.r.close()


def _run(jobs: JobStore, worker: ManagedProcess, workers_redis: str, **request: object) -> dict:
    job_id = jobs.create(JobKind.generate, INFERENCE_QUEUE, GenerateJob(**request).to_dict())  # type: ignore[arg-type]
    make_celery(Settings(redis_url=workers_redis)).send_task(GENERATE_TASK, args=[job_id])

    def done() -> dict | None:
        job = jobs.get(job_id)
        return job if job and JobState(job["state"]).finished else None

    job = wait_until(done, 120.0, f"job {job_id} to finish", procs=[worker])
    assert job["state"] == "succeeded", job
    return job["result"]


def _no_extra(model) -> list[str]:
    """Keys the worker wrote that the schema does not name, at any depth."""
    found = [f"{type(model).__name__}.{k}" for k in (model.model_extra or {})]
    for value in model.__dict__.values():
        items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
        for item in items:
            if hasattr(item, "model_extra"):
                found += _no_extra(item)
    return found


def test_every_field_the_worker_writes_is_typed(jobs: JobStore, inference_worker: ManagedProcess, workers_redis: str):
    target = {"gender": {"female": 0.5, "male": 0.5}}
    full = _run(jobs, inference_worker, workers_redis, prompt="a photo of the face of a doctor, a person", num_images=2,
                steps=4, seed=1, fairness_target=target, strategy="assign", enforce=True, ledger="contract")  # fmt: skip
    plain = _run(jobs, inference_worker, workers_redis, prompt="a photo of a doctor", num_images=1, steps=2, audit=False)
    for result in (full, plain):
        typed = GenerateResult.model_validate(result)
        assert _no_extra(typed) == []
        assert typed.model_dump(by_alias=True, exclude_unset=True) == result  # nothing lost or renamed
    assert full["enforcement"]["applied"] and full["ledger"]["key"] == "contract" and full["target_distance"]
