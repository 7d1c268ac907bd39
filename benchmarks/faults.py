"""Fault recovery through real processes: how long a running job takes to finish after each fault, and whether any
job is lost or run more often than the fault requires.

Scenarios, each over `--trials` jobs (2 images, `--steps` steps, on two inference workers of the testbed):
- `worker_kill`: SIGKILL of the worker running the job (a replacement is started before the next trial);
  timed from the kill to the job's end.
- `redis_restart`: Redis stopped (SIGTERM, append-only file flushed) and started again at once under the running
  job; timed from the restart.
- `redis_blip`: Redis gone for `--blip-s` seconds under the running job; timed from its return.

A job is lost when it has not succeeded `--timeout` seconds after the fault. Its runs are the times a worker
started it (`attempts` on the record); a fault interrupts one run and one more finishes the job, so `run_twice`
counts jobs started more than twice. `resumed_by` says what started the second run: the recovery sweep or the
task's own retry.

    python -m benchmarks.faults --trials 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kombu import pools

from benchmarks.results_io import publish
from common.celery_config import GENERATE_TASK, INFERENCE_QUEUE, make_celery
from common.jobs import JobStore
from common.schemas import GenerateJob, JobKind, JobState
from common.settings import Settings
from tests.support.processes import (
    ManagedProcess,
    fairdiff_env,
    free_port,
    start_redis,
    start_worker,
    wait_until,
    wait_worker_alive,
)

SCENARIOS = ("worker_kill", "redis_restart", "redis_blip")


class Stack:
    """A redis-server and two inference workers; the pieces a trial breaks are replaced in place."""

    def __init__(self, root: Path, steps: int) -> None:
        self.root, self.steps = root, steps
        self.port = free_port()
        self.redis = start_redis(self.port, root / "redis", appendonly=True)
        self.url = self.redis.info["url"]
        self.env = fairdiff_env(self.url, root / "data", "testbed", max_batch="4")
        self.jobs = JobStore.from_url(self.url)
        self.celery = make_celery(Settings(redis_url=self.url))
        self.workers: list[ManagedProcess] = []
        for _ in range(2):
            self.add_worker()

    def add_worker(self) -> None:
        worker = start_worker("inference", self.env, self.root / "logs", name=f"w{free_port()}")
        wait_worker_alive(worker, self.url, timeout=180)
        self.workers.append(worker)

    def submit_running(self, seed: int) -> str:
        """A job, once a worker has run a few of its steps."""
        job_id = self.jobs.create(JobKind.generate, INFERENCE_QUEUE,
                                  GenerateJob(prompt="a photo of a judge", num_images=2, seed=seed,
                                              steps=self.steps).to_dict())  # fmt: skip
        self.celery.send_task(GENERATE_TASK, args=[job_id])

        def running() -> bool:
            job = self.jobs.get(job_id)
            return bool(job and job["state"] == "running" and (job.get("progress") or {}).get("step", 0) >= 3)

        wait_until(running, 120, "the job to run", interval=0.1)
        return job_id

    def restart_redis(self, down_s: float) -> None:
        self.jobs.r.connection_pool.disconnect()
        self.redis.stop()
        time.sleep(down_s)
        self.redis = start_redis(self.port, self.root / "redis", appendonly=True)
        # the old connections died with the server: kombu's connection pools are global, so reset them all
        pools.reset()
        self.celery = make_celery(Settings(redis_url=self.url))

    def wait_finished(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                job = self.jobs.get(job_id)
            except Exception:  # the store is coming back
                job = None
            if job and JobState(job["state"]).finished:
                return job
            time.sleep(0.1)
        return None

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.redis.stop()
        self.jobs.r.close()


def trial(stack: Stack, scenario: str, seed: int, blip_s: float, timeout: float) -> dict[str, Any]:
    job_id = stack.submit_running(seed)
    if scenario == "worker_kill":
        worker = stack.jobs.get(job_id)["worker"]
        victim = next(w for w in stack.workers if worker.startswith(w.info["hostname"] + "/"))
        victim.kill()
        stack.workers.remove(victim)
    else:
        stack.restart_redis(blip_s if scenario == "redis_blip" else 0.0)
    t0 = time.monotonic()
    job = stack.wait_finished(job_id, timeout)
    recovered_s = time.monotonic() - t0 if job else None
    if scenario == "worker_kill":
        stack.add_worker()
    attempts = int((job or {}).get("attempts", 0))
    requeued = int((job or {}).get("requeued", 0))
    return {
        "job": job_id,
        "state": job["state"] if job else "lost",
        "recover_s": None if recovered_s is None else round(recovered_s, 2),
        "attempts": attempts,
        "requeued": requeued,
        "resumed_by": resumed_by(attempts, requeued),
        "run_twice": attempts > 2,
    }


def resumed_by(attempts: int, requeued: int) -> str:
    """What re-ran the interrupted job: the recovery sweep, the task's own retry (the store came back before it
    gave up), or nothing (it ran through the fault)."""
    if requeued:
        return "recovery sweep"
    return "task retry" if attempts > 1 else "none"


def summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    times = sorted(t["recover_s"] for t in trials if t["recover_s"] is not None)
    return {
        "trials": len(trials),
        "lost": sum(t["state"] != "succeeded" for t in trials),
        "run_twice": sum(t["run_twice"] for t in trials),
        "recover_s_p50": statistics.median(times) if times else None,
        "recover_s_max": times[-1] if times else None,
        "requeued": sum(t["requeued"] for t in trials),
        "per_trial": trials,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--blip-s", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fairdiff-faults-") as tmp:
        stack = Stack(Path(tmp), args.steps)
        try:
            for scenario in args.scenarios.split(","):
                runs = [trial(stack, scenario, seed, args.blip_s, args.timeout) for seed in range(args.trials)]
                results[scenario] = summary(runs)
        finally:
            stack.close()
    publish("faults", {"benchmark": "faults", "steps": args.steps, "blip_s": args.blip_s, "images": 2,
                       "inference_workers": 2, "scenarios": results})  # fmt: skip


if __name__ == "__main__":
    main()
