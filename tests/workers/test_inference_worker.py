"""A real Celery inference worker process on a real redis-server, driven through JobStore + send_task.

No gateway here: this pins the worker's contract with the job store (states, progress, cancel,
idempotent redelivery, PNGs on disk) independently of the HTTP layer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from common.celery_config import GENERATE_TASK, INFERENCE_QUEUE, make_celery
from common.jobs import JobStore
from common.schemas import GenerateJob, JobKind, JobState
from common.settings import Settings
from tests.support.processes import ManagedProcess, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def jobs(workers_redis: str) -> Iterator[JobStore]:
    store = JobStore.from_url(workers_redis)
    yield store
    store.r.close()


@pytest.fixture(scope="module")
def celery_client(workers_redis: str) -> Celery:
    return make_celery(Settings(redis_url=workers_redis))


def submit(jobs: JobStore, client: Celery, **request: object) -> str:
    job_id = jobs.create(JobKind.generate, INFERENCE_QUEUE, GenerateJob(**request).to_dict())  # type: ignore[arg-type]
    client.send_task(GENERATE_TASK, args=[job_id])
    return job_id


def wait_finished(jobs: JobStore, job_id: str, worker: ManagedProcess, timeout: float = 60.0) -> dict:
    def done() -> dict | None:
        job = jobs.get(job_id)
        return job if job and JobState(job["state"]).finished else None

    return wait_until(done, timeout, f"job {job_id} to finish", procs=[worker])


def test_generate_job_end_to_end_with_progress(
    jobs: JobStore, celery_client: Celery, inference_worker: ManagedProcess, worker_env: dict
) -> None:
    job_id = submit(jobs, celery_client, prompt="a photo of a doctor", num_images=3, seed=7, steps=40)
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = jobs.get(job_id)
        if job and job.get("progress"):
            step = job["progress"]["step"]
            if not seen or step != seen[-1]:
                seen.append(step)
        if job and JobState(job["state"]).finished:
            break
        time.sleep(0.01)
    job = jobs.get(job_id)
    assert job is not None and job["state"] == "succeeded", job
    # 3 images in chunks of max_batch=4: one chunk, 40 steps in all.
    assert job["progress"] == {"step": 40, "total": 40}
    assert len(seen) >= 3 and seen == sorted(seen), f"progress never moved: {seen}"
    assert any(0 < s < 40 for s in seen)

    result = job["result"]
    assert [img["url"] for img in result["images"]] == [f"/v1/jobs/{job_id}/images/{k}.png" for k in range(3)]
    assert [img["seed_index"] for img in result["images"]] == [0, 1, 2]
    assert result["strategy"]["used"] == "none" and result["adaptor"] is None
    assert set(result["timings"]) == {"queue_s", "load_s", "generate_s", "audit_s", "total_s"}
    out = Path(worker_env["FAIRDIFF_DATA_DIR"]) / "jobs" / job_id
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == ["0.png", "1.png", "2.png"]
    assert all((out / name).read_bytes().startswith(b"\x89PNG") for name in pngs)
    assert int(jobs.r.hget("fairdiff:stats", "images_generated") or 0) >= 3


def test_worker_publishes_model_info_and_heartbeat(jobs: JobStore, inference_worker: ManagedProcess, worker_env: dict) -> None:
    info = jobs.model_info(worker_env["FAIRDIFF_BASE_MODEL"])
    assert info is not None
    assert info.height == info.width and info.height > 0
    assert info.max_tokens > 0 and info.tokenizer_json and '"model"' in info.tokenizer_json
    live = jobs.live_workers(INFERENCE_QUEUE)
    assert any(w.startswith(inference_worker.info["hostname"] + "/") for w in live), live


def test_cancel_running_job_stops_between_steps(jobs: JobStore, celery_client: Celery, inference_worker: ManagedProcess) -> None:
    job_id = submit(jobs, celery_client, prompt="a photo of a nurse", num_images=4, seed=1, steps=500)

    def started() -> bool:
        job = jobs.get(job_id)
        assert job is not None and not JobState(job["state"]).finished, job
        return bool(job["state"] == "running" and (job.get("progress") or {}).get("step", 0) >= 2)

    wait_until(started, 60, "the long job to be running", procs=[inference_worker])
    t0 = time.monotonic()
    jobs.request_cancel(job_id)
    job = wait_finished(jobs, job_id, inference_worker, timeout=30)
    assert job["state"] == "cancelled"
    assert time.monotonic() - t0 < 10
    assert job["progress"]["step"] < 500
    assert "result" not in job


def test_guidance_without_a_calibration_fails_the_job_clearly(
    jobs: JobStore, celery_client: Celery, inference_worker: ManagedProcess
) -> None:
    job_id = submit(
        jobs,
        celery_client,
        prompt="a photo of a chef",
        steps=2,
        strategy="guidance",
        fairness_target={"gender": {"female": 0.5, "male": 0.5}},
    )
    job = wait_finished(jobs, job_id, inference_worker)
    assert job["state"] == "failed"
    assert job["error"]["code"] == "no_calibration" and "calibrat" in job["error"]["message"]


def test_redelivered_task_of_finished_job_changes_nothing(
    jobs: JobStore, celery_client: Celery, inference_worker: ManagedProcess, worker_env: dict
) -> None:
    job_id = submit(jobs, celery_client, prompt="a photo of a pilot", num_images=2, seed=3, steps=5)
    first = wait_finished(jobs, job_id, inference_worker)
    assert first["state"] == "succeeded"
    out = Path(worker_env["FAIRDIFF_DATA_DIR"]) / "jobs" / job_id
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}

    celery_client.send_task(GENERATE_TASK, args=[job_id])  # the same message again
    # The worker runs one task at a time in order: once a job sent after it is done, it has been handled.
    marker = submit(jobs, celery_client, prompt="a photo of a baker", steps=1)
    wait_finished(jobs, marker, inference_worker)

    again = jobs.get(job_id)
    assert again == first
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


def test_healthcheck_command_reflects_the_worker_heartbeat(inference_worker: ManagedProcess, worker_env: dict) -> None:
    import subprocess
    import sys

    from tests.support.processes import ROOT

    name = inference_worker.info["hostname"].split("@", 1)[0]

    def check(*args: str) -> int:
        cmd = [sys.executable, "-m", "workers.cli", "healthcheck", *args]
        return subprocess.run(cmd, cwd=ROOT, env=worker_env, capture_output=True, timeout=30).returncode

    assert check("--queue", "inference", "--name", name) == 0
    assert check("--queue", "training", "--name", name) == 1
