"""The fairness ledger: delivered class counts per (scope, key, prompt, target), kept in Redis.

Products that ask for one image at a time can never meet a 30/70 target within a request; the
ledger makes a stream of requests add up. Each request reserves its images' classes (deficit
first, counting what is delivered *and* what other in-flight requests have reserved) in an
optimistic Redis transaction, then settles: the reservation is released and the audited
classes are counted as delivered, so a conditioning miss is made up by later requests.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence

import redis

from adaptors.assign import deficit_assignment, joint_key
from common.redis_keys import LEDGER_PREFIX

logger = logging.getLogger(__name__)

PREFIX = LEDGER_PREFIX
_PENDING = "pending:"


def ledger_id(scope: str, key: str, prompt: str, target: Mapping[str, Mapping[str, float]]) -> str:
    """One ledger per (caller scope, ledger key, prompt, target): change any and counting restarts."""
    canonical = json.dumps({"key": key, "prompt": prompt, "target": target}, sort_keys=True)
    return f"{PREFIX}{scope}:{hashlib.sha256(canonical.encode()).hexdigest()[:32]}"


def _counts(raw: Mapping[str, str]) -> tuple[dict[str, int], dict[str, int]]:
    delivered = {k: int(v) for k, v in raw.items() if not k.startswith(_PENDING)}
    pending = {k[len(_PENDING) :]: int(v) for k, v in raw.items() if k.startswith(_PENDING)}
    return delivered, pending


def delivered(r: redis.Redis, lid: str) -> dict[str, int]:
    return _counts(r.hgetall(lid))[0]


def drift(counts: Mapping[str, int], target: Mapping[str, Mapping[str, float]]) -> float:
    """How far a ledger's delivered images are from its target: the largest total variation over its attributes.

    0 when every attribute's delivered shares equal the target; what /metrics reports after each settlement,
    so an operator sees a ledger falling behind (conditioning misses the audit keeps seeing) without asking it.
    """
    from common.bias import total_variation

    total = sum(counts.values())
    if total == 0:
        return 0.0
    worst = 0.0
    for attr, shares in target.items():
        marginal: dict[str, float] = {}
        for key, n in counts.items():
            cls = dict(part.split("=", 1) for part in key.split(",")).get(attr)
            if cls is not None:
                marginal[cls] = marginal.get(cls, 0.0) + n / total
        worst = max(worst, total_variation(marginal, shares))
    return worst


def reserve(r: redis.Redis, lid: str, n: int, target: Mapping[str, Mapping[str, float]], ttl_s: int) -> list[dict[str, str]]:
    """Classes for the next n images, most-behind first; reserved atomically against concurrent requests."""
    attrs = list(target)

    def attempt(pipe: redis.client.Pipeline) -> list[dict[str, str]]:
        done, pending = _counts(pipe.hgetall(lid))
        seen = {k: done.get(k, 0) + pending.get(k, 0) for k in set(done) | set(pending)}
        assignment = deficit_assignment(n, target, seen)
        pipe.multi()
        for classes in assignment:
            pipe.hincrby(lid, _PENDING + joint_key(classes, attrs), 1)
        pipe.expire(lid, ttl_s)
        return assignment

    return r.transaction(attempt, lid, value_from_callable=True)


def settle(
    r: redis.Redis,
    lid: str,
    reserved: Sequence[Mapping[str, str]],
    delivered_classes: Sequence[Mapping[str, str] | None],
    attributes: Sequence[str],
) -> None:
    """Release the reservation and count what was delivered (None = no person: counts nothing)."""
    pipe = r.pipeline(transaction=True)
    for classes in reserved:
        pipe.hincrby(lid, _PENDING + joint_key(classes, attributes), -1)
    for classes in delivered_classes:
        if classes is not None:
            pipe.hincrby(lid, joint_key(classes, attributes), 1)
    pipe.execute()
