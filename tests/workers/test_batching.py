"""Dynamic batching in a real inference worker: concurrent jobs share a pass, each keeps its own images,
a cancel leaves the others unchanged, and a worker killed mid-batch loses no job and runs none twice.

Its own redis-server and workers, so the jobs waiting in the queue are exactly the ones a test sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from celery import Celery
from PIL import Image

from common.batch_stats import BATCH_STATS_KEY
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

pytestmark = pytest.mark.integration

GENDER = {"gender": {"female": 0.5, "male": 0.5}}
# four requests that differ in everything a pass lets differ: prompt, seed, guidance scale, negative prompt, strategy
REQUESTS = [
    {"prompt": "a photo of the face of a senator, a person", "seed": 11, "guidance_scale": 5.0},
    {"prompt": "a photo of the face of a nurse, a person", "seed": 12, "guidance_scale": 7.5, "negative_prompt": "blurry"},
    {"prompt": "a photo of the face of a judge, a person", "seed": 13, "guidance_scale": 5.0, "strategy": "assign",
     "fairness_target": GENDER},
    {"prompt": "a photo of the face of a clerk, a person", "seed": 14, "guidance_scale": 1.0},
]  # fmt: skip


class Stack:
    def __init__(self, tmp: Path, worker_env: dict) -> None:
        self.tmp = tmp
        self.redis = start_redis(free_port(), tmp / "redis", appendonly=True)
        self.url = self.redis.info["url"]
        self.env = fairdiff_env(self.url, tmp / "data", worker_env["FAIRDIFF_BASE_MODEL"],
                                classifier=worker_env["FAIRDIFF_CLASSIFIER"], max_batch="4", batch_window_ms="0")  # fmt: skip
        self.jobs = JobStore.from_url(self.url)
        self.client: Celery = make_celery(Settings(redis_url=self.url))
        self.procs: list[ManagedProcess] = [self.redis]

    def worker(self, name: str) -> ManagedProcess:
        proc = start_worker("inference", self.env, self.tmp / "logs", name=name)
        self.procs.append(proc)
        wait_worker_alive(proc, self.url)
        return proc

    def submit(self, bodies: list[dict], steps: int) -> list[str]:
        """Write every job first, then send the messages: the first task finds the others waiting."""
        ids = [self.jobs.create(JobKind.generate, INFERENCE_QUEUE, GenerateJob.from_dict({**b, "steps": steps}).to_dict())
               for b in bodies]  # fmt: skip
        for job_id in ids:
            self.client.send_task(GENERATE_TASK, args=[job_id])
        return ids

    def wait(self, ids: list[str], timeout: float, procs: list[ManagedProcess]) -> list[dict]:
        def done() -> list[dict] | None:
            got = [self.jobs.get(i) for i in ids]
            return got if all(j and JobState(j["state"]).finished for j in got) else None

        return wait_until(done, timeout, f"{len(ids)} jobs to finish", interval=0.1, procs=procs)

    def pixels(self, job_id: str) -> np.ndarray:
        return np.asarray(Image.open(self.tmp / "data/jobs" / job_id / "0.png"), dtype=np.int16)

    def close(self) -> None:
        self.jobs.r.close()
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, worker_env: dict) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("batching"), worker_env)
    s.worker("batcher")
    yield s
    s.close()


def test_concurrent_jobs_share_a_pass_and_keep_their_own_images(stack: Stack) -> None:
    """Four single-image jobs waiting together are served in one pass of 4; each image equals the one the job gets
    alone (a pass of 1) within the last bit of uint8: batched CPU float arithmetic differs from a batch of one in
    the last bits of a few pixels, so exact equality is not promised (docs/methods/batching.md)."""
    batched_ids = stack.submit(REQUESTS, steps=10)
    batched = stack.wait(batched_ids, 120, stack.procs)
    assert [j["state"] for j in batched] == ["succeeded"] * 4, [j.get("error") for j in batched]
    assert [j["result"]["batch"]["jobs"] for j in batched] == [4] * 4
    assert batched[2]["result"]["strategy"]["used"] == "assign" and batched[2]["result"]["images"][0]["assigned"]
    stats = stack.jobs.r.hgetall(BATCH_STATS_KEY)
    assert float(stats["size_bucket:4"]) >= 1 and int(stats["images"]) >= 4

    for body, batched_id in zip(REQUESTS, batched_ids):
        (alone_id,) = stack.submit([body], steps=10)
        (alone,) = stack.wait([alone_id], 60, stack.procs)
        assert alone["result"]["batch"]["jobs"] == 1
        diff = np.abs(stack.pixels(batched_id) - stack.pixels(alone_id))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (body, int(diff.max()), float((diff > 0).mean()))


def test_cancel_one_job_of_a_pass_leaves_the_others_unchanged(stack: Stack) -> None:
    reference_ids = stack.submit(REQUESTS, steps=120)
    reference = stack.wait(reference_ids, 120, stack.procs)
    assert [j["result"]["batch"]["jobs"] for j in reference] == [4] * 4

    ids = stack.submit(REQUESTS, steps=120)

    def mid_pass() -> bool:
        got = [stack.jobs.get(i) for i in ids]
        return all(j["state"] == "running" and 3 <= (j.get("progress") or {}).get("step", 0) < 100 for j in got)

    wait_until(mid_pass, 60, "the pass to be under way", interval=0.02, procs=stack.procs)
    stack.jobs.request_cancel(ids[1])
    jobs = stack.wait(ids, 120, stack.procs)
    assert [j["state"] for j in jobs] == ["succeeded", "cancelled", "succeeded", "succeeded"]
    assert not (stack.tmp / "data/jobs" / ids[1]).exists()
    for k in (0, 2, 3):
        assert jobs[k]["result"]["batch"]["jobs"] == 4
        assert np.array_equal(stack.pixels(ids[k]), stack.pixels(reference_ids[k]))


def test_jobs_of_one_weight_adaptor_share_a_pass_and_others_do_not(stack: Stack) -> None:
    """Two jobs naming the same LoRA share one pass with its weights swapped in once; each image equals the one the
    job gets alone (within the last bit of uint8, as above); a plain job waiting beside them runs in its own pass."""
    from adaptors.store import AdaptorStore
    from tests.adaptors.mixin import make_lora

    store = AdaptorStore(stack.tmp / "data" / "adaptors")
    if not store.exists("shared-lora"):
        staging = store.staging_dir("shared-lora")
        make_lora(stack.env["FAIRDIFF_BASE_MODEL"], "shared-lora", 3).save(staging)
        store.publish(staging)
    bodies = [
        {"prompt": "a photo of the face of a senator, a person", "seed": 21, "adaptor_id": "shared-lora"},
        {"prompt": "a photo of the face of a nurse, a person", "seed": 22, "adaptor_id": "shared-lora"},
        {"prompt": "a photo of the face of a judge, a person", "seed": 23},
    ]
    ids = stack.submit(bodies, steps=10)
    jobs = stack.wait(ids, 120, stack.procs)
    assert [j["state"] for j in jobs] == ["succeeded"] * 3, [j.get("error") for j in jobs]
    assert [j["result"]["strategy"]["used"] for j in jobs] == ["adaptor", "adaptor", "none"]
    assert [j["result"]["batch"]["jobs"] for j in jobs] == [2, 2, 1]
    (alone_id,) = stack.submit([bodies[1]], steps=10)
    (alone,) = stack.wait([alone_id], 60, stack.procs)
    assert alone["result"]["batch"]["jobs"] == 1
    diff = np.abs(stack.pixels(ids[1]) - stack.pixels(alone_id))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (int(diff.max()), float((diff > 0).mean()))
    (plain_id,) = stack.submit([{k: v for k, v in bodies[1].items() if k != "adaptor_id"}], steps=10)
    (plain,) = stack.wait([plain_id], 60, stack.procs)
    assert np.abs(stack.pixels(ids[1]) - stack.pixels(plain_id)).max() > 10  # the adaptor was applied in the pass


def test_worker_killed_mid_batch_loses_no_job_and_runs_none_twice(stack: Stack) -> None:
    # the module's worker is stopped, so the victim alone takes the messages
    for p in [p for p in stack.procs if p.name.startswith("worker-") and p.alive()]:
        p.stop()
    victim = stack.worker("victim")
    ids = stack.submit(REQUESTS, steps=150)

    def mid_pass() -> bool:
        got = [stack.jobs.get(i) for i in ids]
        return all(j["state"] == "running" and (j.get("progress") or {}).get("step", 0) >= 3 for j in got)

    wait_until(mid_pass, 60, "the pass to be under way", interval=0.05, procs=[victim])
    assert len({stack.jobs.get(i)["worker"] for i in ids}) == 1  # one pass, on the victim
    victim.kill()  # SIGKILL: no warm shutdown; the leader's message stays unacknowledged, the others wait in the queue
    survivor = stack.worker("survivor")
    jobs = stack.wait(ids, 150, [survivor])
    assert [j["state"] for j in jobs] == ["succeeded"] * 4, [j.get("error") for j in jobs]
    assert all(int(j["attempts"]) == 2 for j in jobs), [j["attempts"] for j in jobs]  # the killed run and one more
    finished = [j["finished"] for j in jobs]
    time.sleep(4)  # any message still on its way finds its job finished
    again = [stack.jobs.get(i) for i in ids]
    assert [j["finished"] for j in again] == finished and all(int(j["attempts"]) == 2 for j in again)
    assert stack.jobs.running_ids(INFERENCE_QUEUE) == []
