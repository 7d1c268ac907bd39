"""Jobs belong to the API key that created them, through a real uvicorn gateway and redis-server.

k2 cannot read, cancel, download or replay k1's job (404, never 403); idempotency keys are per key and
bound to the body they came with; no response carries the tenant id or anything derived from the key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import httpx
import pytest
import redis

from common.jobs import JobStore
from common.schemas import JobState, ModelInfo
from tests.service.helpers import PROMPT, assert_error
from tests.service.test_jobs_and_adaptors import read_pixels, tiny_png
from tests.support.processes import fairdiff_env, start_gateway

pytestmark = pytest.mark.integration

TENANT_DB = 6
ADMIN_TOKEN = "tenants-admin-secret"
K1 = {"Authorization": "Bearer k1-secret-key"}
K2 = {"Authorization": "Bearer k2-secret-key"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def gateway(redis_server: str, tmp_path_factory: pytest.TempPathFactory, testbed_info: ModelInfo) -> Iterator[dict]:
    url = redis_server.rsplit("/", 1)[0] + f"/{TENANT_DB}"
    redis.Redis.from_url(url).flushdb()
    store = JobStore.from_url(url)
    store.publish_model(testbed_info)
    data = tmp_path_factory.mktemp("tenants-data")
    env = fairdiff_env(url, data, "testbed", admin_token=ADMIN_TOKEN, api_keys="k1-secret-key,k2-secret-key",
                       tenant_secret="tenants-test-secret")  # fmt: skip
    proc = start_gateway(env, tmp_path_factory.mktemp("tenants-logs"))
    try:
        with httpx.Client(base_url=proc.info["url"], timeout=30) as client:
            yield {"client": client, "store": store, "data": data}
    finally:
        proc.stop()
        store.r.close()


def _create(client: httpx.Client, headers: dict[str, str], **body: object) -> httpx.Response:
    return client.post("/v1/generate", json={"prompt": PROMPT, **body}, headers=headers)


def test_another_key_cannot_read_cancel_or_download_a_job(gateway) -> None:
    client, store = gateway["client"], gateway["store"]
    job_id = _create(client, K1, seed=1).json()["id"]
    store.mark_running(job_id, "test-worker")
    folder = gateway["data"] / "jobs" / job_id
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(tiny_png())
    store.finish(job_id, JobState.succeeded, result={"images": [{"url": f"/v1/jobs/{job_id}/images/0.png"}]})

    for resp in (
        client.get(f"/v1/jobs/{job_id}", headers=K2),
        client.delete(f"/v1/jobs/{job_id}", headers=K2),
        client.get(f"/v1/jobs/{job_id}/images/0.png", headers=K2),
    ):
        err = assert_error(resp, 404, "id", "job_not_found")
        assert "k1" not in err["message"]
    # the owner, and the admin token, still see it
    assert client.get(f"/v1/jobs/{job_id}", headers=K1).json()["state"] == "succeeded"
    assert read_pixels(client.get(f"/v1/jobs/{job_id}/images/0.png", headers=K1).content) == read_pixels(tiny_png())
    assert client.get(f"/v1/jobs/{job_id}", headers=ADMIN).status_code == 200


def test_another_key_cannot_cancel_a_queued_job(gateway) -> None:
    client = gateway["client"]
    job_id = _create(client, K1, seed=2).json()["id"]
    assert_error(client.delete(f"/v1/jobs/{job_id}", headers=K2), 404, "id", "job_not_found")
    assert client.get(f"/v1/jobs/{job_id}", headers=K1).json()["state"] == "queued"
    assert client.delete(f"/v1/jobs/{job_id}", headers=K1).json()["state"] == "cancelled"


def test_idempotency_keys_are_per_key_and_bound_to_their_body(gateway) -> None:
    client = gateway["client"]
    first = _create(client, {**K1, "Idempotency-Key": "order-1"}, seed=3)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    replay = _create(client, {**K1, "Idempotency-Key": "order-1"}, seed=3)
    assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
    assert replay.headers["idempotent-replayed"] == "true"
    # the same request written with its defaults spelled out is the same request
    spelled = _create(client, {**K1, "Idempotency-Key": "order-1"}, seed=3, num_images=1, audit=True)
    assert spelled.json()["id"] == first.json()["id"]

    reused = _create(client, {**K1, "Idempotency-Key": "order-1"}, seed=4)
    assert_error(reused, 422, "Idempotency-Key", "idempotency_key_reused")

    # k2's "order-1" is its own: a new job, not k1's (and never a replay of it)
    other = _create(client, {**K2, "Idempotency-Key": "order-1"}, seed=3)
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert "idempotent-replayed" not in other.headers
    assert_error(client.get(f"/v1/jobs/{first.json()['id']}", headers=K2), 404, "id", "job_not_found")


def test_no_response_carries_the_tenant_id_or_the_keys_hash(gateway) -> None:
    client, store = gateway["client"], gateway["store"]
    resp = _create(client, K1, seed=5, ledger="stream-a", fairness_target={"gender": {"female": 0.5, "male": 0.5}})
    job_id = resp.json()["id"]
    view = client.get(f"/v1/jobs/{job_id}", headers=K1)
    owner = store.get(job_id)["owner"]
    key_hash = hashlib.sha256(b"k1-secret-key").hexdigest()
    assert owner.startswith("t_") and key_hash[:16] not in owner
    for text in (resp.text, view.text):
        assert owner not in text and key_hash[:16] not in text and "k1-secret-key" not in text
    body = view.json()
    assert "owner" not in body and "ledger_scope" not in body["request"]
    assert body["request"]["ledger"] == "stream-a"
    # the job record is owned by an id that another key (or the plain hash) does not give
    assert store.get(job_id)["request"]["ledger_scope"] == owner
    assert store.get(_create(client, K2, seed=5).json()["id"])["owner"] != owner


def test_keys_and_admin_token_are_still_checked(gateway) -> None:
    client = gateway["client"]
    assert_error(_create(client, {}), 401, None, "missing_credentials")
    assert_error(_create(client, {"Authorization": "Bearer nope"}), 403, None, "invalid_credentials")
    assert client.get("/v1/admin/finetunes", headers=K1).status_code == 403
