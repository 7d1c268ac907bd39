"""Per-deployment limits on what one caller may ask of the gateway: submissions per minute, unfinished jobs, and
connections held open by `Prefer: wait`. Their sizes are settings (`FAIRDIFF_RATE_LIMIT_PER_MINUTE`, ...).

Counters live in Redis, so every gateway replica counts against the same budget.
"""

from __future__ import annotations

import math
import threading
import time

from fastapi import Request

from common.jobs import JobStore
from common.redis_keys import RATE_KEY
from service.api.deps import ANON, Caller
from service.errors import TooManyRequests

RATE_WINDOW_S = 60
ACTIVE_RETRY_AFTER_S = 5  # a job finishes in seconds on the testbed; clients retry about that often


def rate_scope(request: Request, caller: Caller) -> str:
    """Whose budget a request spends: its tenant, or without API keys its client address."""
    if caller.tenant != ANON:
        return caller.tenant
    client = request.client
    return "ip:" + (client.host if client else "unknown")


def check_rate(store: JobStore, scope: str, per_minute: int, now: float | None = None) -> None:
    """Count one submission against `scope`'s fixed one-minute window; 429 with Retry-After past `per_minute`."""
    if per_minute <= 0:
        return
    now = time.time() if now is None else now
    window = int(now // RATE_WINDOW_S)
    key = RATE_KEY.format(scope=scope, window=window)
    pipe = store.r.pipeline()
    pipe.incr(key)
    pipe.expire(key, 2 * RATE_WINDOW_S)
    count = int(pipe.execute()[0])
    if count > per_minute:
        retry = max(1, math.ceil((window + 1) * RATE_WINDOW_S - now))
        raise TooManyRequests(
            f"more than {per_minute} job submissions in a minute for this API key (FAIRDIFF_RATE_LIMIT_PER_MINUTE); "
            f"retry in {retry} s",
            code="rate_limited",
            headers={"Retry-After": str(retry)},
        )


def check_active(store: JobStore, owner: str, cap: int) -> None:
    """429 when `owner` already has `cap` queued or running jobs."""
    if cap <= 0:
        return
    active = store.active_jobs(owner, prune_at=cap)
    if active >= cap:
        raise TooManyRequests(
            f"this API key already has {active} unfinished jobs, the most it may have (FAIRDIFF_MAX_ACTIVE_JOBS_PER_KEY); "
            "wait for one to finish or cancel one",
            code="too_many_active_jobs",
            headers={"Retry-After": str(ACTIVE_RETRY_AFTER_S)},
        )


class WaitHolders:
    """How many requests of this gateway process hold their connection for `Prefer: wait`, capped."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.held = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.held >= self.cap:
                return False
            self.held += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.held -= 1
