"""Bounded resources: /metrics labels, per-key rate and concurrency limits, `Prefer: wait` holders, work per request."""

from __future__ import annotations

import random
import re
import string
import time

import redis
from fastapi.testclient import TestClient

from common.jobs import JOB_KEY, JobStore
from common.schemas import JobState
from common.settings import Settings
from service.app import create_app
from tests.service.helpers import assert_error, gen

K1 = {"Authorization": "Bearer k1"}
K2 = {"Authorization": "Bearer k2"}
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")


def test_metrics_stay_small_under_made_up_methods_and_paths(client: TestClient) -> None:
    rng = random.Random(34)

    def word(n: int) -> str:
        return "".join(rng.choices(string.ascii_letters + string.digits, k=n))

    for i in range(3000):
        method = word(rng.randint(3, 12)).upper() if i % 2 else rng.choice(METHODS)
        path = rng.choice(["/" + word(rng.randint(1, 30)), f"/v1/jobs/{word(32)}", f"/v1/{word(8)}/{word(8)}", "/healthz"])
        client.request(method, path)
    body = client.get("/metrics").text
    assert len(body.encode()) < 100 * 1024, len(body)
    methods = set(re.findall(r'method="([^"]*)"', body))
    routes = set(re.findall(r'route="([^"]*)"', body))
    assert methods <= {*METHODS, "other"}
    assert routes <= {*client.app.openapi()["paths"], "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "unmatched"}
    assert 'method="other"' in body and 'route="unmatched"' in body
    assert 'route="/v1/jobs/{job_id}"' in body


def _app(settings: Settings, store: JobStore, testbed_info, **update) -> TestClient:
    store.publish_model(testbed_info)
    return TestClient(create_app(settings.model_copy(update=update)))


def test_submissions_past_the_rate_limit_are_429_per_key(settings: Settings, store: JobStore, testbed_info) -> None:
    with _app(settings, store, testbed_info, api_keys="k1,k2", rate_limit_per_minute=3) as c:
        for _ in range(3):
            assert gen(c, headers=K1).status_code == 202
        refused = gen(c, headers=K1)
        assert_error(refused, 429, None, "rate_limited")
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert "FAIRDIFF_RATE_LIMIT_PER_MINUTE" in refused.json()["error"]["message"]
        assert gen(c, headers=K2).status_code == 202  # another key has its own budget
        assert c.get("/healthz").status_code == 200  # reads are not submissions


def test_the_rate_limit_without_keys_is_per_client(settings: Settings, store: JobStore, testbed_info) -> None:
    with _app(settings, store, testbed_info, rate_limit_per_minute=1) as c:
        assert gen(c).status_code == 202
        assert_error(gen(c), 429, None, "rate_limited")


def test_unfinished_jobs_per_key_are_capped(settings: Settings, store: JobStore, testbed_info) -> None:
    with _app(settings, store, testbed_info, api_keys="k1,k2", max_active_jobs_per_key=2) as c:
        first = gen(c, headers={**K1, "Idempotency-Key": "one"}).json()["id"]
        gen(c, headers=K1)
        refused = gen(c, headers={**K1, "Idempotency-Key": "three"})
        assert_error(refused, 429, None, "too_many_active_jobs")
        assert int(refused.headers["retry-after"]) > 0
        # a replay adds no job, so it is answered; the refused request's key stays free for its retry
        assert gen(c, headers={**K1, "Idempotency-Key": "one"}).json()["id"] == first
        assert gen(c, headers=K2).status_code == 202
        store.finish(first, JobState.succeeded, result={"images": []})
        third = gen(c, headers={**K1, "Idempotency-Key": "three"})
        assert third.status_code == 202
        assert_error(gen(c, headers=K1), 429, None, "too_many_active_jobs")
        assert c.delete(f"/v1/jobs/{third.json()['id']}", headers=K1).json()["state"] == "cancelled"
        assert gen(c, headers=K1).status_code == 202  # a cancelled job frees its place too


def test_a_job_whose_record_expired_frees_its_place(settings: Settings, store: JobStore, testbed_info,
                                                    raw_redis: redis.Redis) -> None:  # fmt: skip
    with _app(settings, store, testbed_info, max_active_jobs_per_key=1) as c:
        job_id = gen(c).json()["id"]
        raw_redis.delete(JOB_KEY.format(id=job_id))  # as if its record expired with the job unfinished
        assert gen(c).status_code == 202


def test_prefer_wait_holders_are_capped(settings: Settings, store: JobStore, testbed_info) -> None:
    with _app(settings, store, testbed_info, max_wait_holders=0) as c:
        t0 = time.monotonic()
        resp = gen(c, headers={"Prefer": "wait=5"})
        assert resp.status_code == 202 and time.monotonic() - t0 < 2.0
        assert c.app.state.wait_holders.held == 0


def test_work_per_request_is_capped(settings: Settings, store: JobStore, testbed_info) -> None:
    with _app(settings, store, testbed_info, max_work_per_request=100) as c:
        assert gen(c, num_images=5, steps=20).status_code == 202
        err = assert_error(gen(c, num_images=6, steps=20), 422, "num_images", "too_much_work")
        assert "FAIRDIFF_MAX_WORK_PER_REQUEST" in err["message"]
        assert_error(gen(c, num_images=6), 422, "num_images", "too_much_work")  # the default steps count too
