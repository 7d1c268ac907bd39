"""Claiming a job against a real redis-server: of a job's own message and a peer's batch gathering it, exactly one
runs it; a message for a job that a live worker runs under its lease is dropped, for a dead worker's job it runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from common.jobs import JOB_KEY, JobStore
from common.schemas import JobKind, JobState
from workers.lifecycle import claim
from workers.recovery import mark_alive

CLAIM_DB = 8


@pytest.fixture
def store(redis_server: str) -> Iterator[JobStore]:
    client = redis.Redis.from_url(redis_server.rsplit("/", 1)[0] + f"/{CLAIM_DB}", decode_responses=True)
    client.flushdb()
    yield JobStore(client)
    client.close()


def test_a_queued_job_is_claimed_once(store: JobStore) -> None:
    job_id = store.create(JobKind.generate, "inference", {"prompt": "p"})
    assert store.try_mark_running(job_id, "batcher/1", JobState.queued.value)
    assert not store.try_mark_running(job_id, "other/2", JobState.queued.value)
    job = store.get(job_id)
    assert job["state"] == "running" and job["worker"] == "batcher/1" and int(job["attempts"]) == 1
    assert store.queue_depth("inference") == 0 and store.running_ids("inference") == [job_id]


def test_a_cancelled_job_is_never_claimed(store: JobStore) -> None:
    job_id = store.create(JobKind.generate, "inference", {"prompt": "p"})
    store.r.hset(JOB_KEY.format(id=job_id), "cancel", "1")
    assert not store.try_mark_running(job_id, "batcher/1", JobState.queued.value)
    assert claim(store, job_id, "worker/1", "generate") == (None, "cancelled")


def test_a_message_for_a_job_a_live_peer_runs_is_dropped(store: JobStore) -> None:
    job_id = store.create(JobKind.generate, "inference", {"prompt": "p"})
    assert store.try_mark_running(job_id, "batcher/1", JobState.queued.value)
    mark_alive(store, "batcher/1", 20, [job_id])  # its beat names the job: the lease holds
    assert claim(store, job_id, "other/2", "generate") == (None, "held")
    assert store.get(job_id)["worker"] == "batcher/1"


def test_a_message_for_a_dead_workers_job_runs_it(store: JobStore) -> None:
    job_id = store.create(JobKind.generate, "inference", {"prompt": "p"})
    assert store.try_mark_running(job_id, "gone/1", JobState.queued.value)  # never beats: dead
    job, outcome = claim(store, job_id, "survivor/2", "generate")
    assert job is not None and outcome is None
    again = store.get(job_id)
    assert again["worker"] == "survivor/2" and int(again["attempts"]) == 2
    store.finish(job_id, JobState.succeeded, result={})
    assert claim(store, job_id, "survivor/2", "generate") == (None, "succeeded")
