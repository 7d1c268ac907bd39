"""Fault tolerance: a worker killed with SIGKILL mid-job; the job is re-run by another worker.

Its own redis-server and workers (not the shared ones), so which worker takes the job is known.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from celery import Celery

from common.celery_config import GENERATE_TASK, INFERENCE_QUEUE, make_celery
from common.jobs import JobStore
from common.schemas import GenerateJob, JobKind, JobState
from common.settings import Settings
from tests.support.processes import (
    ManagedProcess,
    dump_logs,
    fairdiff_env,
    free_port,
    start_redis,
    start_worker,
    wait_until,
    wait_worker_alive,
)

pytestmark = pytest.mark.integration


def test_killed_worker_job_is_requeued_and_succeeds(tmp_path: Path, worker_env: dict) -> None:
    procs: list[ManagedProcess] = []
    redis_proc = start_redis(free_port(), tmp_path / "redis", appendonly=True)
    procs.append(redis_proc)
    url = redis_proc.info["url"]
    env = fairdiff_env(url, tmp_path / "data", worker_env["FAIRDIFF_BASE_MODEL"],
                       classifier=worker_env["FAIRDIFF_CLASSIFIER"], max_batch="4")  # fmt: skip
    jobs = JobStore.from_url(url)
    client: Celery = make_celery(Settings(redis_url=url))
    try:
        first = start_worker("inference", env, tmp_path / "logs", name="first")
        procs.append(first)
        wait_worker_alive(first, url)
        job_id = jobs.create(JobKind.generate, INFERENCE_QUEUE,
                             GenerateJob(prompt="a photo of a judge", num_images=2, seed=5, steps=300).to_dict())  # fmt: skip
        client.send_task(GENERATE_TASK, args=[job_id])

        def running() -> bool:
            job = jobs.get(job_id)
            return bool(job and job["state"] == "running" and (job.get("progress") or {}).get("step", 0) >= 3)

        wait_until(running, 60, "the job to run on the first worker", procs=[first])
        victim = jobs.get(job_id)["worker"]
        first.kill()  # SIGKILL: no warm shutdown, the message stays unacknowledged

        second = start_worker("inference", env, tmp_path / "logs", name="second")
        procs.append(second)

        def finished() -> dict | None:
            job = jobs.get(job_id)
            return job if job and JobState(job["state"]).finished else None

        # The second worker's sweep notices the dead incarnation (liveness TTL 20 s) and re-queues the job
        # long before Redis's visibility timeout (hours) would redeliver it.
        job = wait_until(finished, 120, "the job to be re-run and finish", interval=0.2, procs=[second])
        assert job["state"] == "succeeded", job.get("error")
        assert job["worker"] != victim and job["worker"].startswith(second.info["hostname"] + "/")
        assert sorted(p.name for p in (tmp_path / "data/jobs" / job_id).iterdir()) == ["0.png", "1.png"]
    except BaseException:
        dump_logs(procs)
        raise
    finally:
        jobs.r.close()
        for p in reversed(procs):
            p.stop()


def test_queued_jobs_survive_a_redis_restart(tmp_path: Path, worker_env: dict) -> None:
    """Append-only Redis restarted with jobs waiting: a worker started afterwards runs every one of them."""
    port = free_port()
    procs: list[ManagedProcess] = []
    redis_proc = start_redis(port, tmp_path / "redis", appendonly=True)
    procs.append(redis_proc)
    url = redis_proc.info["url"]
    env = fairdiff_env(url, tmp_path / "data", worker_env["FAIRDIFF_BASE_MODEL"],
                       classifier=worker_env["FAIRDIFF_CLASSIFIER"])  # fmt: skip
    jobs = JobStore.from_url(url)
    client: Celery = make_celery(Settings(redis_url=url))
    try:
        ids = []
        for seed in range(3):
            job_id = jobs.create(JobKind.generate, INFERENCE_QUEUE,
                                 GenerateJob(prompt="a photo of a clerk", seed=seed, steps=2).to_dict())  # fmt: skip
            client.send_task(GENERATE_TASK, args=[job_id])
            ids.append(job_id)
        client.pool.force_close_all()
        jobs.r.connection_pool.disconnect()

        redis_proc.stop()
        procs.remove(redis_proc)
        redis_proc = start_redis(port, tmp_path / "redis", appendonly=True)
        procs.append(redis_proc)
        assert jobs.queue_depth(INFERENCE_QUEUE) == 3

        worker = start_worker("inference", env, tmp_path / "logs")
        procs.append(worker)

        def all_done() -> bool:
            states = [jobs.get(i)["state"] for i in ids]
            return all(JobState(s).finished for s in states)

        wait_until(all_done, 120, "the queued jobs to run after the restart", interval=0.2, procs=[worker])
        assert [jobs.get(i)["state"] for i in ids] == ["succeeded"] * 3
    except BaseException:
        dump_logs(procs)
        raise
    finally:
        jobs.r.close()
        for p in reversed(procs):
            p.stop()


def test_a_job_running_through_a_redis_blip_is_finished_exactly_once(tmp_path: Path, worker_env: dict) -> None:
    """Redis gone for 20 s under a running job, its worker alive throughout: the job's task dies with the store
    (its retry cannot be sent either), so its worker's beats stop holding the job's lease, and the sweep re-queues
    it once; it succeeds within 2 minutes of Redis's return, started twice (the run cut short and the re-run)."""
    port = free_port()
    procs: list[ManagedProcess] = []
    redis_proc = start_redis(port, tmp_path / "redis", appendonly=True)
    procs.append(redis_proc)
    url = redis_proc.info["url"]
    env = fairdiff_env(url, tmp_path / "data", worker_env["FAIRDIFF_BASE_MODEL"],
                       classifier=worker_env["FAIRDIFF_CLASSIFIER"], max_batch="4")  # fmt: skip
    jobs = JobStore.from_url(url)
    client: Celery = make_celery(Settings(redis_url=url))
    try:
        worker = start_worker("inference", env, tmp_path / "logs", name="blip")
        procs.append(worker)
        wait_worker_alive(worker, url)
        job_id = jobs.create(JobKind.generate, INFERENCE_QUEUE,
                             GenerateJob(prompt="a photo of a judge", num_images=2, seed=5, steps=300).to_dict())  # fmt: skip
        client.send_task(GENERATE_TASK, args=[job_id])
        client.pool.force_close_all()

        def running() -> bool:
            job = jobs.get(job_id)
            return bool(job and job["state"] == "running" and (job.get("progress") or {}).get("step", 0) >= 3)

        wait_until(running, 60, "the job to run", procs=[worker])
        jobs.r.connection_pool.disconnect()
        redis_proc.stop()
        procs.remove(redis_proc)
        time.sleep(20)
        redis_proc = start_redis(port, tmp_path / "redis", appendonly=True)
        procs.append(redis_proc)
        back = time.monotonic()

        def finished() -> dict | None:
            job = jobs.get(job_id)
            return job if job and JobState(job["state"]).finished else None

        job = wait_until(finished, 120, "the job to finish after Redis returned", interval=0.5, procs=[worker])
        assert time.monotonic() - back < 120
        assert job["state"] == "succeeded", job.get("error")
        assert int(job.get("requeued", 0)) <= 1 and int(job["attempts"]) <= 2, job
        assert sorted(p.name for p in (tmp_path / "data/jobs" / job_id).iterdir()) == ["0.png", "1.png"]
        time.sleep(16)  # a sweep later: nothing re-queued it again, and it is not running anywhere
        assert jobs.get(job_id)["state"] == "succeeded" and int(jobs.get(job_id).get("requeued", 0)) <= 1
        assert jobs.running_ids(INFERENCE_QUEUE) == []
    except BaseException:
        dump_logs(procs)
        raise
    finally:
        jobs.r.close()
        for p in reversed(procs):
            p.stop()
