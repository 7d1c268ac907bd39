"""The ledger against a real redis-server: convergence of single-image streams, no lost updates."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from workers import ledger

TARGET = {"gender": {"female": 0.3, "male": 0.7}}
ATTRS = ["gender"]


@pytest.fixture
def r(redis_server: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.rsplit("/", 1)[0] + "/5", decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def one_request(r: redis.Redis, lid: str, deliver=lambda classes: classes) -> None:
    reserved = ledger.reserve(r, lid, 1, TARGET, ttl_s=600)
    ledger.settle(r, lid, reserved, [deliver(c) for c in reserved], ATTRS)


def test_two_hundred_single_image_requests_reach_sixty_one_forty(r):
    lid = ledger.ledger_id("anon", "k", "a prompt", TARGET)
    for _ in range(200):
        one_request(r, lid)
    assert ledger.delivered(r, lid) == {"gender=female": 60, "gender=male": 140}
    assert ledger.drift(ledger.delivered(r, lid), TARGET) == pytest.approx(0.0)


def test_drift_is_the_worst_attributes_total_variation():
    target = {"gender": {"female": 0.5, "male": 0.5}, "age": {"young": 0.75, "old": 0.25}}
    counts = {"gender=female,age=young": 6, "gender=male,age=young": 2, "gender=male,age=old": 2}
    # gender 0.6/0.4 -> TV 0.1; age 0.8/0.2 -> TV 0.05
    assert ledger.drift(counts, target) == pytest.approx(0.1)
    assert ledger.drift({}, target) == 0.0


def test_conditioning_misses_are_made_up_by_later_requests(r):
    lid = ledger.ledger_id("anon", "k", "a prompt", TARGET)
    state = {"n": 0}

    def sometimes_wrong(classes):
        state["n"] += 1
        if state["n"] % 5 == 0:  # every fifth image comes out male whatever was asked
            return {"gender": "male"}
        return None if state["n"] % 17 == 0 else classes  # and some show no person at all

    for _ in range(200):
        one_request(r, lid, sometimes_wrong)
    got = ledger.delivered(r, lid)
    total = got["gender=female"] + got["gender=male"]
    assert abs(got["gender=female"] - 0.3 * total) <= 2


def test_concurrent_clients_lose_no_update(r):
    lid = ledger.ledger_id("anon", "k", "a prompt", TARGET)

    def client() -> None:
        own = redis.Redis(connection_pool=r.connection_pool)
        for _ in range(100):
            one_request(own, lid)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = ledger.delivered(r, lid)
    assert got["gender=female"] + got["gender=male"] == 200
    assert abs(got["gender=female"] - 60) <= 2
    assert all(int(v) == 0 for k, v in r.hgetall(lid).items() if k.startswith("pending:"))


def test_ledgers_are_separate_per_scope_prompt_and_target():
    base = ledger.ledger_id("anon", "k", "p", TARGET)
    assert base != ledger.ledger_id("tenant-b", "k", "p", TARGET)
    assert base != ledger.ledger_id("anon", "k", "other prompt", TARGET)
    assert base != ledger.ledger_id("anon", "k", "p", {"gender": {"female": 0.5, "male": 0.5}})
