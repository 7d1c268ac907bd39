"""The whole service through real processes: uvicorn, Celery inference and training workers, redis-server.

Everything goes over HTTP exactly as a product backend or an operator would send it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import (
    ManagedProcess,
    dump_logs,
    fairdiff_env,
    free_port,
    start_gateway,
    start_redis,
    start_worker,
    wait_until,
    wait_worker_alive,
)

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer e2e-admin-secret"}
SENATOR = "a photo of the face of a senator, a person"
BALANCED = {"gender": {"female": 0.5, "male": 0.5}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    logs = tmp_path_factory.mktemp("e2e-logs")
    procs: list[ManagedProcess] = []
    redis_proc = start_redis(free_port(), tmp_path_factory.mktemp("e2e-redis"), appendonly=True)
    procs.append(redis_proc)
    env = fairdiff_env(redis_proc.info["url"], tmp_path_factory.mktemp("e2e-data"), "testbed",
                       admin_token="e2e-admin-secret", max_batch="16")  # fmt: skip
    try:
        workers = [start_worker("inference", env, logs), start_worker("training", env, logs)]
        procs += workers
        for w in workers:
            wait_worker_alive(w, redis_proc.info["url"], timeout=120)
        gateway = start_gateway(env, logs)
        procs.append(gateway)
        with httpx.Client(base_url=gateway.info["url"], timeout=60) as client:
            yield {"client": client, "procs": procs, "data": Path(env["FAIRDIFF_DATA_DIR"])}
    except Exception:
        dump_logs(procs)
        raise
    finally:
        for p in reversed(procs):
            p.stop()


def wait_job(client: httpx.Client, path: str, timeout: float = 120.0, headers: dict | None = None) -> dict:
    def finished() -> dict | None:
        body = client.get(path, headers=headers).json()
        return body if body["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(finished, timeout, f"{path} to finish", interval=0.2)


def female_share(result: dict) -> float:
    return result["realised"]["gender"]["female"]


def test_ready_and_generate_with_a_target_reports_what_was_delivered(stack):
    client = stack["client"]
    assert client.get("/readyz").status_code == 200
    resp = client.post("/v1/generate", json={"prompt": SENATOR, "num_images": 8, "seed": 1, "fairness_target": BALANCED},
                       headers={"Prefer": "wait=60"})  # fmt: skip
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["state"] == "succeeded"
    result = job["result"]
    assert len(result["images"]) == 8
    first = result["images"][0]
    assert first["attributes"]["gender"]["class"] in ("female", "male")
    png = client.get(first["url"])
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result["target_distance"]["gender"]) == {"total_variation", "kl"}
    assert result["strategy"]["used"] == "assign"  # auto: no adaptor for this target, so exact assignment


def test_progress_moves_and_a_running_job_can_be_cancelled(stack):
    client = stack["client"]
    accepted = client.post("/v1/generate", json={"prompt": SENATOR, "num_images": 32, "steps": 150, "seed": 2})
    assert accepted.status_code == 202
    url = accepted.json()["url"]
    seen: set[int] = set()

    def progressed() -> bool:
        progress = client.get(url).json().get("progress") or {}
        if progress.get("step"):
            seen.add(progress["step"])
        return len(seen) >= 2

    wait_until(progressed, 90, "progress to move", interval=0.05)
    assert client.delete(url).status_code in (200, 202)
    job = wait_job(client, url, timeout=60)
    assert job["state"] == "cancelled"
    assert max(seen) < 150 * 2  # it stopped before the end


def test_idempotency_key_returns_the_same_job(stack):
    client = stack["client"]
    body = {"prompt": SENATOR, "num_images": 1, "steps": 2}
    first = client.post("/v1/generate", json=body, headers={"Idempotency-Key": "e2e-key-1"})
    again = client.post("/v1/generate", json=body, headers={"Idempotency-Key": "e2e-key-1"})
    assert first.json()["id"] == again.json()["id"]


def test_admin_needs_the_token(stack):
    client = stack["client"]
    body = {"method": "prefix", "fairness_target": BALANCED, "prompt_set": "testbed-train"}
    assert client.post("/v1/admin/finetunes", json=body).status_code == 401
    wrong = client.post("/v1/admin/finetunes", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403


@pytest.mark.slow
def test_finetune_publishes_an_adaptor_that_shifts_the_delivered_distribution(stack):
    client = stack["client"]
    started = time.monotonic()
    resp = client.post(
        "/v1/admin/finetunes",
        headers=ADMIN,
        json={"method": "prefix", "fairness_target": BALANCED, "name": "senator-balance",
              "prompts": [SENATOR, "a photo of the face of a pilot, a person"],
              "hyperparameters": {"iterations": 40}},
    )  # fmt: skip
    assert resp.status_code == 202, resp.text
    job = wait_job(client, f"/v1/admin/finetunes/{resp.json()['id']}", timeout=600, headers=ADMIN)
    assert job["state"] == "succeeded", job
    assert job["curve"], "the admin API shows the training curve"
    adaptor_id = job["result"]["adaptor_id"]
    listed = [a["id"] for a in client.get("/v1/adaptors").json()["data"]]
    assert adaptor_id in listed
    manifest = client.get(f"/v1/adaptors/{adaptor_id}").json()
    assert manifest["kind"] == "prefix_tokens" and all(len(h) == 64 for h in manifest["files"].values())

    request = {"prompt": SENATOR, "num_images": 48, "seed": 11}
    base = client.post("/v1/generate", json={**request, "strategy": "none"}, headers={"Prefer": "wait=60"}).json()
    tuned = client.post("/v1/generate", json={**request, "adaptor_id": adaptor_id}, headers={"Prefer": "wait=60"}).json()
    assert tuned["result"]["adaptor"] == adaptor_id
    assert female_share(tuned["result"]) >= female_share(base["result"]) + 0.15, (base["result"]["realised"],
                                                                                tuned["result"]["realised"])
    assert time.monotonic() - started < 600


def test_assign_delivers_the_requested_split_and_reports_it(stack):
    """secretary is ~96% female in the base model; assign must deliver 4/4 per the target."""
    client = stack["client"]
    request = {"prompt": "a photo of the face of a secretary, a person", "num_images": 8, "seed": 3, "fairness_target": BALANCED}
    base = client.post("/v1/generate", json={**request, "strategy": "none"}, headers={"Prefer": "wait=60"}).json()
    resp = client.post("/v1/generate", json={**request, "strategy": "assign"}, headers={"Prefer": "wait=60"})
    assert resp.status_code == 200, resp.text
    result = resp.json()["result"]
    assert result["strategy"]["used"] == "assign"
    assert result["assigned_counts"] == {"gender": {"female": 4, "male": 4}}
    assert [img["assigned"]["gender"] for img in result["images"]].count("male") == 4
    assert base["result"]["counts"]["gender"]["male"] <= 1
    assert abs(result["counts"]["gender"]["male"] - 4) <= 1, result["counts"]


def test_enforce_makes_the_delivered_counts_exact(stack):
    client = stack["client"]
    body = {"prompt": SENATOR, "num_images": 8, "seed": 5, "fairness_target": BALANCED, "strategy": "assign", "enforce": True}
    resp = client.post("/v1/generate", json=body, headers={"Prefer": "wait=120"})
    assert resp.status_code == 200, resp.text
    result = resp.json()["result"]
    assert result["enforcement"]["applied"] is True and result["enforcement"]["satisfied"] is True, result["enforcement"]
    assert result["counts"]["gender"] == result["assigned_counts"]["gender"] == {"female": 4, "male": 4}
    bad = client.post("/v1/generate", json={"prompt": SENATOR, "enforce": True})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "enforce"


def test_a_ledger_makes_single_image_requests_add_up(stack):
    """Ten single-image requests at 30/70 for a ~96%-female occupation still deliver 3 +- 1 women."""
    client = stack["client"]
    body = {"prompt": "a photo of the face of a secretary, a person", "num_images": 1,
            "fairness_target": {"gender": {"female": 0.3, "male": 0.7}}, "ledger": "e2e-stream"}  # fmt: skip
    for seed in range(10):
        result = client.post("/v1/generate", json={**body, "seed": seed}, headers={"Prefer": "wait=60"}).json()["result"]
        assert result["strategy"]["used"] == "assign" and result["images"][0]["assigned"]["gender"] in ("female", "male")
    delivered = result["ledger"]["delivered"]  # the audited classes, counted across all ten requests
    assert result["ledger"]["key"] == "e2e-stream"
    assert 9 <= sum(delivered.values()) <= 10
    assert abs(delivered.get("gender=female", 0) - 3) <= 1, delivered
    bad = client.post("/v1/generate", json={"prompt": "x", "ledger": "k"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "ledger"
