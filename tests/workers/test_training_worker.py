"""A real training worker: a finetune job publishes an adaptor that a following generate job uses.

Tiny hyperparameters keep this to seconds on a CPU; the numbers are meaningless until the
testbed is trained, so these tests pin the plumbing (states, curve, atomic publish, cleanup,
adaptor selection), not the fairness effect (tests/service covers that end to end).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from common.celery_config import FINETUNE_TASK, GENERATE_TASK, INFERENCE_QUEUE, TRAINING_QUEUE, make_celery
from common.jobs import JobStore
from common.schemas import FinetuneJob, GenerateJob, JobKind, JobState
from common.settings import Settings
from tests.support.processes import ManagedProcess, wait_until

pytestmark = pytest.mark.integration

TARGET = {"gender": {"female": 0.5, "male": 0.5}}
# images of 2 evaluation steps are too rough for the subject gate to judge, and 2 iterations gain nothing: both
# gates are off here and each is tested on its own below
TINY = {"iterations": 2, "steps": 2, "images_per_prompt": 2, "eval_images": 2, "eval_steps": 2, "checkpoint_every": 1, "rank": 2,
        "min_subject_kept": 0, "min_fairness_gain": 0}  # fmt: skip


@pytest.fixture(scope="module")
def jobs(workers_redis: str) -> Iterator[JobStore]:
    store = JobStore.from_url(workers_redis)
    yield store
    store.r.close()


@pytest.fixture(scope="module")
def celery_client(workers_redis: str) -> Celery:
    return make_celery(Settings(redis_url=workers_redis))


def finetune(jobs: JobStore, client: Celery, env: dict, **hp: float) -> str:
    request = FinetuneJob(
        method="dft",
        base_model=env["FAIRDIFF_BASE_MODEL"],
        fairness_target=TARGET,
        prompts=["a photo of the face of a doctor, a person"],
        hyperparameters={**TINY, **hp},
    )
    job_id = jobs.create(JobKind.finetune, TRAINING_QUEUE, request.to_dict())
    client.send_task(FINETUNE_TASK, args=[job_id])
    return job_id


def wait_finished(jobs: JobStore, job_id: str, procs: list[ManagedProcess], timeout: float = 120.0) -> dict:
    def done() -> dict | None:
        job = jobs.get(job_id)
        return job if job and JobState(job["state"]).finished else None

    return wait_until(done, timeout, f"job {job_id} to finish", interval=0.1, procs=procs)


def test_finetune_publishes_an_adaptor_that_generate_then_uses(
    jobs: JobStore, celery_client: Celery, worker_env: dict, training_worker: ManagedProcess,
    inference_worker: ManagedProcess,
) -> None:  # fmt: skip
    job_id = finetune(jobs, celery_client, worker_env)
    job = wait_finished(jobs, job_id, [training_worker])
    assert job["state"] == "succeeded", job.get("error")
    adaptor_id = job["result"]["adaptor_id"]
    assert job["result"]["manifest"]["id"] == adaptor_id
    assert job["result"]["manifest"]["target"]["gender"] == TARGET["gender"]
    assert len(job["curve"]) >= 2  # one point per iteration at least

    data = Path(worker_env["FAIRDIFF_DATA_DIR"])
    store_dir = data / "adaptors"
    assert (store_dir / adaptor_id / "manifest.json").is_file()
    assert not [p.name for p in store_dir.iterdir() if p.name.startswith(".staging")]
    assert not (data / "checkpoints" / job_id).exists()

    # Its measured fit is poor (2 iterations, measured on its training prompts): `auto` never serves with it, and
    # `enforce` with `auto` stays exact; an explicit id is used as named, with its measured fit in the result.
    fit = job["result"]["manifest"]["metrics"]["after"]
    assert set(fit["prompts"]) == {"a photo of the face of a doctor, a person"} and "mean_prompt_tv" in fit
    cases = (
        ({"strategy": "auto", "fairness_target": TARGET}, "assign", None, "exact"),
        ({"strategy": "auto", "fairness_target": TARGET, "enforce": True}, "assign", None, "exact"),
        ({"strategy": "none", "adaptor_id": adaptor_id}, "adaptor", adaptor_id, "expected"),
    )
    for request, used, adaptor, guarantee in cases:
        gid = jobs.create(JobKind.generate, INFERENCE_QUEUE,
                          GenerateJob(prompt="a photo of a doctor", num_images=2, steps=2, **request).to_dict())  # fmt: skip
        celery_client.send_task(GENERATE_TASK, args=[gid])
        gen = wait_finished(jobs, gid, [inference_worker], timeout=60)
        assert gen["state"] == "succeeded", gen.get("error")
        assert (gen["result"]["strategy"]["used"], gen["result"]["adaptor"]) == (used, adaptor), request
        assert gen["result"]["guarantee"] == guarantee
    # the same request for another target with this adaptor named is refused by the worker as by the gateway
    other = {"gender": {"female": 0.2, "male": 0.8}}
    gid = jobs.create(JobKind.generate, INFERENCE_QUEUE, GenerateJob(prompt="a photo of a doctor", num_images=1, steps=2,
                      adaptor_id=adaptor_id, fairness_target=other).to_dict())  # fmt: skip
    celery_client.send_task(GENERATE_TASK, args=[gid])
    gen = wait_finished(jobs, gid, [inference_worker], timeout=60)
    assert gen["state"] == "failed" and gen["error"]["code"] == "adaptor_target_mismatch"


def test_a_finetune_without_fairness_gain_fails_and_publishes_nothing(
    jobs: JobStore, celery_client: Celery, worker_env: dict, training_worker: ManagedProcess
) -> None:
    """Asking for a full gain (per-prompt TV to the target down to 0, i.e. exactly 4 of 8 women for the doctor, whom
    the base model draws all male) from 2 iterations: the gate refuses the finished job with its numbers."""
    store_dir = Path(worker_env["FAIRDIFF_DATA_DIR"]) / "adaptors"
    before = sorted(p.name for p in store_dir.iterdir()) if store_dir.exists() else []
    job_id = finetune(jobs, celery_client, worker_env, eval_images=8, eval_steps=10, min_fairness_gain=1.0)
    job = wait_finished(jobs, job_id, [training_worker])
    assert job["state"] == "failed", job
    error = job["error"]
    assert error["code"] == "no_fairness_gain" and error["type"] == "fairness_error" and error["min_fairness_gain"] == 1.0
    assert error["mean_prompt_tv"]["before"] > 0.3 and error["mean_prompt_tv"]["after"] > 0
    assert "nothing was published" in error["message"]
    assert (sorted(p.name for p in store_dir.iterdir()) if store_dir.exists() else []) == before


def test_cancelled_finetune_leaves_no_half_adaptor(
    jobs: JobStore, celery_client: Celery, worker_env: dict, training_worker: ManagedProcess
) -> None:
    store_dir = Path(worker_env["FAIRDIFF_DATA_DIR"]) / "adaptors"
    before = sorted(p.name for p in store_dir.iterdir()) if store_dir.exists() else []
    job_id = finetune(jobs, celery_client, worker_env, iterations=500)

    def training() -> bool:
        job = jobs.get(job_id)
        assert job is not None and not JobState(job["state"]).finished, job
        return bool(job.get("curve"))

    wait_until(training, 120, "the finetune to report progress", procs=[training_worker])
    jobs.request_cancel(job_id)
    job = wait_finished(jobs, job_id, [training_worker], timeout=60)
    assert job["state"] == "cancelled"
    assert sorted(p.name for p in store_dir.iterdir()) == before
    assert not (Path(worker_env["FAIRDIFF_DATA_DIR"]) / "checkpoints" / job_id).exists()


def test_a_finetune_that_loses_its_subject_fails_and_publishes_nothing(
    jobs: JobStore, celery_client: Celery, worker_env: dict, training_worker: ManagedProcess
) -> None:
    """One step at lr 1 with no preservation wrecks the text encoder: the gate fails the job for good, with the
    shares it measured, and leaves neither an adaptor nor a checkpoint behind."""
    store_dir = Path(worker_env["FAIRDIFF_DATA_DIR"]) / "adaptors"
    before = sorted(p.name for p in store_dir.iterdir()) if store_dir.exists() else []
    wreck = {"iterations": 1, "steps": 10, "rank": 8, "lr": 1.0, "ema_decay": 0.0, "eval_images": 8, "eval_steps": 10,
             "preserve_pixel_weight": 0, "preserve_feature_weight": 0, "min_subject_kept": 0.95}  # fmt: skip
    job_id = finetune(jobs, celery_client, worker_env, **wreck)
    job = wait_finished(jobs, job_id, [training_worker])
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "subject_lost" and job["error"]["subject_kept"]["share"] < 0.95
    assert "min_subject_kept" in job["error"]["message"] and set(job["error"]["bias"]) == {"before", "after"}
    assert (sorted(p.name for p in store_dir.iterdir()) if store_dir.exists() else []) == before
    assert not (Path(worker_env["FAIRDIFF_DATA_DIR"]) / "checkpoints" / job_id).exists()
