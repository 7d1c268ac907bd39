"""Retention and the running-job index of the job store, against a real redis-server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.jobs import FINISHED_ZSET, JOB_KEY, JOBS_BY_KIND, JobStore, sweep_expired
from common.schemas import JobKind, JobState
from workers.recovery import mark_alive, note_retry, orphaned_jobs

RETENTION_DB = 7
TTL_S = 100


@pytest.fixture
def store(redis_server: str) -> Iterator[JobStore]:
    url = redis_server.rsplit("/", 1)[0] + f"/{RETENTION_DB}"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    s = JobStore(client, ttl_s=TTL_S)
    yield s
    client.close()


def _job_with_images(store: JobStore, root: Path, finish: bool = True) -> str:
    job_id = store.create(JobKind.generate, "inference", {"prompt": "p"})
    (root / job_id).mkdir(parents=True)
    (root / job_id / "0.png").write_bytes(b"png")
    if finish:
        store.mark_running(job_id, "w")
        store.finish(job_id, JobState.succeeded, result={"images": []})
    return job_id


def test_expired_jobs_and_their_images_are_gone_after_the_sweep(store: JobStore, tmp_path: Path) -> None:
    old = _job_with_images(store, tmp_path)
    assert sweep_expired(store, [tmp_path]) == []  # not yet expired
    later = time.time() + TTL_S + 1
    fresh_id = store.create(JobKind.generate, "inference", {"prompt": "p"})
    store.finish(fresh_id, JobState.succeeded)
    store.r.zadd(FINISHED_ZSET, {fresh_id: later})  # finished "at" the sweep's now: kept

    assert sweep_expired(store, [tmp_path], now=later) == [old]
    assert store.get(old) is None and not (tmp_path / old).exists()
    assert old not in store.list_ids(JobKind.generate) and store.r.zscore(FINISHED_ZSET, old) is None
    assert store.get(fresh_id) is not None and fresh_id in store.list_ids(JobKind.generate)


def test_a_finished_record_outlives_its_creation_ttl(store: JobStore, tmp_path: Path) -> None:
    job_id = _job_with_images(store, tmp_path)
    assert store.r.ttl(JOB_KEY.format(id=job_id)) > TTL_S  # counted from its end, with room for the sweep


def test_a_job_that_never_finished_loses_its_listing_and_files_once_its_record_expired(store: JobStore,
                                                                                      tmp_path: Path) -> None:  # fmt: skip
    job_id = _job_with_images(store, tmp_path, finish=False)
    store.r.delete(JOB_KEY.format(id=job_id))  # what Redis does at the record's TTL
    assert sweep_expired(store, [tmp_path], now=time.time() + TTL_S + 1) == [job_id]
    assert not (tmp_path / job_id).exists() and store.r.zscore(JOBS_BY_KIND.format(kind="generate"), job_id) is None
    assert store.queue_depth("inference") == 0


def test_each_sweep_is_bounded(store: JobStore, tmp_path: Path) -> None:
    ids = [_job_with_images(store, tmp_path) for _ in range(5)]
    later = time.time() + TTL_S + 1
    first = sweep_expired(store, [tmp_path], now=later, batch=2)
    assert len(first) == 2
    rest = sweep_expired(store, [tmp_path], now=later, batch=2) + sweep_expired(store, [tmp_path], now=later, batch=2)
    assert sorted(first + rest) == sorted(ids)
    assert list(tmp_path.iterdir()) == []


def test_recovery_reads_only_running_jobs(store: JobStore) -> None:
    finished = [store.create(JobKind.generate, "inference", {"prompt": "p"}) for _ in range(50)]
    for job_id in finished:
        store.finish(job_id, JobState.succeeded)
    running = store.create(JobKind.generate, "inference", {"prompt": "p"})
    store.mark_running(running, "gone-worker/1")
    assert store.running_ids("inference") == [running]
    now = time.time() + 60
    assert orphaned_jobs(store, JobKind.generate, "inference", window_s=3600, grace_s=20, now=now) == [running]
    store.finish(running, JobState.failed)
    assert store.running_ids("inference") == []
    assert orphaned_jobs(store, JobKind.generate, "inference", window_s=3600, grace_s=20, now=now) == []


def test_a_live_worker_holds_the_lease_only_of_the_jobs_it_names(store: JobStore) -> None:
    job_id = store.create(JobKind.generate, "inference", {"prompt": "p"})
    store.mark_running(job_id, "live-worker/1")
    now = time.time() + 60

    def orphans() -> list[str]:
        return orphaned_jobs(store, JobKind.generate, "inference", window_s=3600, grace_s=20, now=now)

    mark_alive(store, "live-worker/1", 30, [job_id])
    assert orphans() == []  # executing it: never re-run beside itself
    mark_alive(store, "live-worker/1", 30, [])
    assert orphans() == [job_id]  # alive, but its task is gone (e.g. died with the store)
    note_retry(store, job_id, 5)
    assert orphaned_jobs(store, JobKind.generate, "inference", window_s=3600, grace_s=20) == []  # its retry is due
