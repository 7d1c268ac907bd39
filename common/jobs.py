"""The job store: every job's state, progress, result and cancel flag, in Redis.

The gateway writes a job before it enqueues its task, and workers re-read it when the task
runs (tasks carry only the job id), so a redelivered task finds the truth and a finished job
is never run twice. Each field is its own hash entry, so concurrent writers never clobber
each other's fields.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from common.errors import job_error
from common.redis_keys import (  # noqa: F401  (re-exported: callers import the keys from here too)
    ACTIVE_KEY,
    FINISHED_ZSET,
    IDEMPOTENCY_KEY,
    JOB_KEY,
    JOBS_BY_KIND,
    MODEL_KEY,
    PREFIX,
    QUEUED_ZSET,
    RUNNING_SET,
    WORKER_KEY,
)
from common.schemas import JobKind, JobState, ModelInfo

SWEEP_BATCH = 500  # most jobs one retention sweep removes, so a backlog is cleared over sweeps, never in one

logger = logging.getLogger(__name__)
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_JSON_FIELDS = ("request", "progress", "result", "error", "curve", "timings", "images_ready")


# KEYS: job hash, its queue's queued zset, its queue's running set; ARGV: id, worker, now, expected state,
# expected raw `started` ("" = none), the running state's name. 1 when this caller now runs the job.
_CLAIM_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= ARGV[4] then return 0 end
if (redis.call('HGET', KEYS[1], 'started') or '') ~= ARGV[5] then return 0 end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[6], 'started', ARGV[3], 'worker', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    """Thin, typed access to job records; safe to share between threads."""

    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.ttl_s = ttl_s

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 7 * 24 * 3600) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), ttl_s)

    # -- writing -----------------------------------------------------------------------------
    def create(self, kind: JobKind, queue: str, request: dict[str, Any], job_id: str | None = None,
               owner: str = "anon") -> str:  # fmt: skip
        """Write a queued job owned by the tenant `owner` (an opaque id; the gateway shows it to nobody)."""
        job_id = job_id or new_job_id()
        now = time.time()
        key = JOB_KEY.format(id=job_id)
        pipe = self.r.pipeline()
        pipe.hset(
            key,
            mapping={
                "id": job_id,
                "kind": kind.value,
                "queue": queue,
                "state": JobState.queued.value,
                "owner": owner,
                "created": now,
                "request": json.dumps(request),
            },
        )
        pipe.expire(key, self.ttl_s)
        pipe.zadd(QUEUED_ZSET.format(queue=queue), {job_id: now})
        pipe.zadd(JOBS_BY_KIND.format(kind=kind.value), {job_id: now})
        pipe.sadd(ACTIVE_KEY.format(owner=owner), job_id)
        pipe.expire(ACTIVE_KEY.format(owner=owner), self.ttl_s)
        pipe.execute()
        return job_id

    def active_jobs(self, owner: str, prune_at: int = 0) -> int:
        """How many of `owner`'s jobs are queued or running. At `prune_at` or more, members whose record has
        finished or expired (a worker that died before recording it) are dropped first, so the count is exact
        when it matters and costs one SCARD when it does not."""
        key = ACTIVE_KEY.format(owner=owner)
        count = int(self.r.scard(key))
        if prune_at and count >= prune_at:
            for job_id in self.r.smembers(key):
                state = self.r.hget(JOB_KEY.format(id=job_id), "state")
                if state is None or JobState(state).finished:
                    self.r.srem(key, job_id)
            count = int(self.r.scard(key))
        return count

    def claim_idempotency(self, scope: str, key: str, job_id: str, fingerprint: str = "") -> tuple[str, str]:
        """Bind (scope, key) to job_id and the request's fingerprint unless already bound.

        Returns the (job id, fingerprint) that own the key: this job's, or the earlier request's.
        """
        rkey = IDEMPOTENCY_KEY.format(scope=scope, key=key)
        if self.r.set(rkey, f"{job_id} {fingerprint}", nx=True, ex=self.ttl_s):
            return job_id, fingerprint
        owner, _, owner_fingerprint = str(self.r.get(rkey)).partition(" ")
        return owner, owner_fingerprint

    def release_idempotency(self, scope: str, key: str, job_id: str) -> None:
        """Free a key this job claimed (its enqueue failed), so the client can retry with it."""
        rkey = IDEMPOTENCY_KEY.format(scope=scope, key=key)
        if str(self.r.get(rkey) or "").partition(" ")[0] == job_id:
            self.r.delete(rkey)

    def mark_running(self, job_id: str, worker: str) -> None:
        job = self.get(job_id)
        pipe = self.r.pipeline()
        pipe.hset(JOB_KEY.format(id=job_id), mapping={"state": JobState.running.value, "started": time.time(), "worker": worker})
        pipe.hincrby(JOB_KEY.format(id=job_id), "attempts", 1)  # runs started: more than 1 only after a recovery
        if job:
            pipe.zrem(QUEUED_ZSET.format(queue=job["queue"]), job_id)
            pipe.sadd(RUNNING_SET.format(queue=job["queue"]), job_id)
        pipe.execute()

    def try_mark_running(self, job_id: str, worker: str, expect_state: str, expect_started: str = "") -> bool:
        """mark_running only if the job is still in `expect_state` with that raw `started` value ("" = never
        started) and not cancelled, in one atomic step: of two workers claiming one job (its own message and a
        peer's batch gathering it), exactly one wins."""
        queue = self.r.hget(JOB_KEY.format(id=job_id), "queue") or ""
        keys = [JOB_KEY.format(id=job_id), QUEUED_ZSET.format(queue=queue), RUNNING_SET.format(queue=queue)]
        args = [job_id, worker, time.time(), expect_state, expect_started, JobState.running.value]
        return bool(self._claim_script(keys=keys, args=args))

    @property
    def _claim_script(self) -> Any:
        script = getattr(self, "_claim", None)
        if script is None:
            script = self._claim = self.r.register_script(_CLAIM_LUA)
        return script

    def set_progress(self, job_id: str, step: int, total: int, **extra: Any) -> None:
        self.r.hset(JOB_KEY.format(id=job_id), "progress", json.dumps({"step": step, "total": total, **extra}))

    def step_and_check_cancel(self, job_id: str, step: int, total: int) -> bool:
        """Record progress and read the cancel flag in one round trip (called every denoising step)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(JOB_KEY.format(id=job_id), "progress", json.dumps({"step": step, "total": total}))
        pipe.hget(JOB_KEY.format(id=job_id), "cancel")
        return pipe.execute()[1] == "1"

    def append_curve(self, job_id: str, point: dict[str, Any]) -> None:
        """Training curves: one JSON list, rewritten whole (jobs have one writer)."""
        key = JOB_KEY.format(id=job_id)
        curve = json.loads(self.r.hget(key, "curve") or "[]")
        curve.append(point)
        self.r.hset(key, "curve", json.dumps(curve))

    def add_ready_image(self, job_id: str, image: dict[str, Any]) -> None:
        """A generate job's image is written and can be fetched: `image` has its `index` (and what the worker knows of
        it then: seed, assigned classes, URL). One JSON list, rewritten whole like the curve; an index written again
        (a redelivered job) replaces its entry, so each image is listed once."""
        key = JOB_KEY.format(id=job_id)
        ready = [r for r in json.loads(self.r.hget(key, "images_ready") or "[]") if r.get("index") != image["index"]]
        ready.append(image)
        self.r.hset(key, "images_ready", json.dumps(ready))

    def finish(self, job_id: str, state: JobState, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> None:  # fmt: skip
        job = self.get(job_id)
        now = time.time()
        mapping: dict[str, Any] = {"state": state.value, "finished": now}
        if result is not None:
            mapping["result"] = json.dumps(result)
        if error is not None:
            mapping["error"] = json.dumps(job_error(error))
        pipe = self.r.pipeline()
        pipe.hset(JOB_KEY.format(id=job_id), mapping=mapping)
        if job:
            pipe.zrem(QUEUED_ZSET.format(queue=job["queue"]), job_id)
            pipe.srem(RUNNING_SET.format(queue=job["queue"]), job_id)
            pipe.srem(ACTIVE_KEY.format(owner=job.get("owner", "anon")), job_id)
            # kept job_ttl_s after it finished (the retention sweep then removes it with its files)
            pipe.expire(JOB_KEY.format(id=job_id), self.ttl_s + 3600)
            pipe.zadd(FINISHED_ZSET, {job_id: now})
        pipe.execute()

    def request_cancel(self, job_id: str) -> None:
        """Flag a job; a queued job is cancelled at once, a running one at its next step."""
        job = self.get(job_id)
        if job is None or JobState(job["state"]).finished:
            return
        self.r.hset(JOB_KEY.format(id=job_id), "cancel", "1")
        if job["state"] == JobState.queued.value:
            self.finish(job_id, JobState.cancelled)

    # -- reading -----------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(JOB_KEY.format(id=job_id))
        if not raw:
            return None
        job: dict[str, Any] = dict(raw)
        for name in _JSON_FIELDS:
            if name in job:
                job[name] = json.loads(job[name])
        for name in ("created", "started", "finished"):
            if name in job:
                job[name] = float(job[name])
        job["cancel"] = job.get("cancel") == "1"
        return job

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(JOB_KEY.format(id=job_id), "cancel") == "1"

    def queue_position(self, job_id: str, queue: str) -> int | None:
        """0 = next to run; None when the job is not waiting."""
        rank = self.r.zrank(QUEUED_ZSET.format(queue=queue), job_id)
        return None if rank is None else int(rank)

    def queue_depth(self, queue: str) -> int:
        return int(self.r.zcard(QUEUED_ZSET.format(queue=queue)))

    def running_ids(self, queue: str) -> list[str]:
        return list(self.r.smembers(RUNNING_SET.format(queue=queue)))

    def forget_running(self, queue: str, job_id: str) -> None:
        self.r.srem(RUNNING_SET.format(queue=queue), job_id)

    def list_ids(self, kind: JobKind, limit: int = 100) -> list[str]:
        return list(self.r.zrevrange(JOBS_BY_KIND.format(kind=kind.value), 0, limit - 1))

    # -- base model registry ---------------------------------------------------------------------
    def publish_model(self, info: ModelInfo) -> None:
        self.r.set(MODEL_KEY.format(base=info.base_model), json.dumps(info.to_dict()))

    def model_info(self, base_model: str) -> ModelInfo | None:
        raw = self.r.get(MODEL_KEY.format(base=base_model))
        return ModelInfo(**json.loads(raw)) if raw else None

    def heartbeat(self, queue: str, name: str, ttl_s: int = 30) -> None:
        self.r.set(WORKER_KEY.format(queue=queue, name=name), time.time(), ex=ttl_s)

    def live_workers(self, queue: str) -> list[str]:
        prefix = WORKER_KEY.format(queue=queue, name="")
        return [k[len(prefix) :] for k in self.r.scan_iter(prefix + "*")]


def sweep_expired(store: JobStore, file_roots: Sequence[Path], now: float | None = None, batch: int = SWEEP_BATCH) -> list[str]:
    """Remove jobs past their retention, with their listings and their files (`<root>/<job id>` under each root).

    A job expires `store.ttl_s` after it finished, or after it was created if it never finished (its record then
    expired in Redis on its own, leaving its listing entries and files). Each call removes at most `batch` jobs of
    each kind of backlog, oldest first, so it costs the same however much has piled up; returns the ids removed.
    """
    now = time.time() if now is None else now
    cutoff = now - store.ttl_s
    removed: list[str] = []
    for job_id in store.r.zrangebyscore(FINISHED_ZSET, "-inf", cutoff, start=0, num=batch):
        _remove(store, job_id, file_roots)
        removed.append(job_id)
    for kind in JobKind:  # never finished, and its record already expired
        for job_id in store.r.zrangebyscore(JOBS_BY_KIND.format(kind=kind.value), "-inf", cutoff, start=0, num=batch):
            if not store.r.exists(JOB_KEY.format(id=job_id)):
                _remove(store, job_id, file_roots)
                removed.append(job_id)
    for queue in store.r.scan_iter(QUEUED_ZSET.format(queue="*"), count=100):
        store.r.zremrangebyscore(queue, "-inf", cutoff)
    if removed:
        logger.info("retention: removed %d expired jobs", len(removed))
    return removed


def _remove(store: JobStore, job_id: str, file_roots: Sequence[Path]) -> None:
    if not _JOB_ID.match(job_id):  # never let a stored value name a path outside the roots
        store.r.zrem(FINISHED_ZSET, job_id)
        return
    pipe = store.r.pipeline()
    pipe.delete(JOB_KEY.format(id=job_id))
    for kind in JobKind:
        pipe.zrem(JOBS_BY_KIND.format(kind=kind.value), job_id)
    pipe.zrem(FINISHED_ZSET, job_id)
    pipe.execute()
    for root in file_roots:
        shutil.rmtree(Path(root) / job_id, ignore_errors=True)
