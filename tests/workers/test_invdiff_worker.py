"""A real training worker runs `invdiff` on the testbed's own training data; a real inference worker serves the
adaptor only when a request names it, and says it has no target."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from common.celery_config import FINETUNE_TASK, GENERATE_TASK, INFERENCE_QUEUE, TRAINING_QUEUE, make_celery
from common.jobs import JobStore
from common.schemas import FinetuneJob, GenerateJob, JobKind
from common.settings import Settings
from tests.support.processes import ManagedProcess
from tests.workers.test_training_worker import wait_finished

pytestmark = pytest.mark.integration

TARGET = {"gender": {"female": 0.5, "male": 0.5}}
TINY = {"images": 32, "loss_draws": 2, "group_iterations": 20, "iterations": 2, "batch_size": 8, "eval_images": 2,
        "eval_steps": 2, "min_subject_kept": 0, "checkpoint_every": 1}  # fmt: skip


@pytest.fixture(scope="module")
def jobs(workers_redis: str) -> Iterator[JobStore]:
    store = JobStore.from_url(workers_redis)
    yield store
    store.r.close()


@pytest.fixture(scope="module")
def celery_client(workers_redis: str) -> Celery:
    return make_celery(Settings(redis_url=workers_redis))


def finetune(jobs: JobStore, client: Celery, env: dict, **hp) -> str:
    request = FinetuneJob(method="invdiff", base_model=env["FAIRDIFF_BASE_MODEL"], fairness_target={},
                          prompts=["a photo of the face of a doctor, a person"], hyperparameters={**TINY, **hp})  # fmt: skip
    job_id = jobs.create(JobKind.finetune, TRAINING_QUEUE, request.to_dict())
    client.send_task(FINETUNE_TASK, args=[job_id])
    return job_id


def generate(jobs: JobStore, client: Celery, worker: ManagedProcess, **request) -> dict:
    gid = jobs.create(JobKind.generate, INFERENCE_QUEUE,
                      GenerateJob(prompt="a photo of a doctor", num_images=2, steps=2, **request).to_dict())  # fmt: skip
    client.send_task(GENERATE_TASK, args=[gid])
    return wait_finished(jobs, gid, [worker], timeout=60)


def test_invdiff_publishes_a_targetless_adaptor_served_by_id_only(
    jobs: JobStore, celery_client: Celery, worker_env: dict, training_worker: ManagedProcess,
    inference_worker: ManagedProcess,
) -> None:  # fmt: skip
    job = wait_finished(jobs, finetune(jobs, celery_client, worker_env), [training_worker])
    assert job["state"] == "succeeded", job.get("error")
    manifest = job["result"]["manifest"]
    assert manifest["kind"] == "unet_delta" and manifest["target"] == {} and manifest["metrics"]["reference"] == "uniform"
    assert len(job["curve"]) >= 3  # the groups, then one point per iteration
    adaptor_id = job["result"]["adaptor_id"]
    assert (Path(worker_env["FAIRDIFF_DATA_DIR"]) / "adaptors" / adaptor_id / "manifest.json").is_file()

    auto = generate(jobs, celery_client, inference_worker, strategy="auto", fairness_target=TARGET)
    assert auto["state"] == "succeeded" and auto["result"]["strategy"]["used"] == "assign"
    named = generate(jobs, celery_client, inference_worker, adaptor_id=adaptor_id)
    assert named["state"] == "succeeded", named.get("error")
    assert named["result"]["adaptor"] == adaptor_id and named["result"]["guarantee"] is None
    assert "no fairness_target" in named["result"]["strategy"]["reason"]
    refused = generate(jobs, celery_client, inference_worker, adaptor_id=adaptor_id, fairness_target=TARGET)
    assert refused["state"] == "failed" and refused["error"]["code"] == "adaptor_has_no_target"


def test_a_bad_training_set_fails_the_job_naming_the_field(
    jobs: JobStore, celery_client: Celery, worker_env: dict, training_worker: ManagedProcess, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    job = wait_finished(jobs, finetune(jobs, celery_client, worker_env, dataset=str(tmp_path / "empty")), [training_worker])
    assert job["state"] == "failed"
    assert job["error"]["code"] == "invalid_request" and job["error"]["param"] == "hyperparameters.dataset"
    assert "is empty" in job["error"]["message"] and not job.get("curve")
