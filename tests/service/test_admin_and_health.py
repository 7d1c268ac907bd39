"""Admin auth and finetune jobs, adaptor retirement, health probes, metrics, OpenAPI, errors."""

from __future__ import annotations

import pytest
import redis
from fastapi.testclient import TestClient

from common.jobs import JOB_KEY, JobStore
from common.schemas import JobState
from common.settings import Settings
from service.app import create_app
from testbed import world
from tests.service.helpers import assert_error, gen, write_manifest

TARGET = {"gender": {"female": 0.5, "male": 0.5}}


def finetune(client: TestClient, headers: dict[str, str], **body):
    return client.post("/v1/admin/finetunes", json={"method": "prefix", "fairness_target": TARGET, **body},
                       headers=headers)  # fmt: skip


# -- auth ----------------------------------------------------------------------------------------------
def test_admin_needs_a_token(client: TestClient) -> None:
    resp = client.get("/v1/admin/finetunes")
    assert_error(resp, 401, None, "missing_credentials")
    assert resp.headers["www-authenticate"] == "Bearer"


def test_admin_refuses_a_wrong_token(client: TestClient) -> None:
    assert_error(client.get("/v1/admin/finetunes", headers={"Authorization": "Bearer wrong"}), 403, None)
    assert_error(finetune(client, {"Authorization": "Bearer wrong"}, prompt_set="testbed-train"), 403, None)
    assert_error(client.delete("/v1/admin/adaptors/x", headers={"Authorization": "Basic abc"}), 401, None)


def test_admin_accepts_the_token(client: TestClient, admin: dict[str, str]) -> None:
    resp = client.get("/v1/admin/finetunes", headers=admin)
    assert resp.status_code == 200 and resp.json() == {"data": []}


# -- finetunes -----------------------------------------------------------------------------------------
def test_finetune_job_on_the_training_queue(client: TestClient, admin: dict[str, str], store: JobStore,
                                            raw_redis: redis.Redis) -> None:  # fmt: skip
    resp = finetune(client, admin, prompt_set="testbed-train", hyperparameters={"steps": 50}, name="balanced")
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    assert resp.json()["url"] == f"/v1/admin/finetunes/{job_id}"
    assert raw_redis.llen("training") == 1 and raw_redis.llen("inference") == 0
    request = store.get(job_id)["request"]
    assert request["prompts"] == [world.prompt_for(o) for o in world.TRAIN_OCCUPATIONS]
    assert request["base_model"] == "testbed" and request["method"] == "prefix"
    assert request["hyperparameters"] == {"steps": 50} and request["name"] == "balanced"
    # metrics are measured on the training set's held-out partner
    assert request["eval_prompts"] == [world.prompt_for(o) for o in world.TEST_OCCUPATIONS]

    store.mark_running(job_id, "t1")
    store.set_progress(job_id, 5, 50)
    store.append_curve(job_id, {"step": 5, "loss": 1.2, "bias": 0.4})
    view = client.get(f"/v1/admin/finetunes/{job_id}", headers=admin).json()
    assert view["state"] == "running" and view["progress"] == {"step": 5, "total": 50}
    assert view["curve"] == [{"step": 5, "loss": 1.2, "bias": 0.4}]
    assert [j["id"] for j in client.get("/v1/admin/finetunes", headers=admin).json()["data"]] == [job_id]
    # A finetune is not a generate job: the public jobs route does not show it.
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404

    store.finish(job_id, JobState.succeeded, result={"adaptor_id": "fair-gender"})
    assert client.get(f"/v1/admin/finetunes/{job_id}", headers=admin).json()["result"]["adaptor_id"] == "fair-gender"


def test_finetune_with_explicit_prompts_and_cancel(client: TestClient, admin: dict[str, str]) -> None:
    resp = finetune(client, admin, prompts=["a photo of the face of a nurse, a person"])
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    assert client.get(f"/v1/admin/finetunes/{job_id}", headers=admin).json()["queue_position"] == 0
    cancelled = client.delete(f"/v1/admin/finetunes/{job_id}", headers=admin)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    generate_id = gen(client).json()["id"]
    assert client.get(f"/v1/admin/finetunes/{generate_id}", headers=admin).status_code == 404


def test_finetune_dft_with_held_out_prompts(client: TestClient, admin: dict[str, str], store: JobStore) -> None:
    nurse = "a photo of the face of a nurse, a person"
    resp = finetune(client, admin, method="dft", prompts=[nurse], eval_prompt_set="testbed-test")
    assert resp.status_code == 202, resp.text
    request = store.get(resp.json()["id"])["request"]
    assert request["method"] == "dft" and request["prompts"] == [nurse]
    assert request["eval_prompts"] == [world.prompt_for(o) for o in world.TEST_OCCUPATIONS]
    explicit = finetune(client, admin, method="dft", prompts=[nurse], eval_prompts=[nurse])
    assert store.get(explicit.json()["id"])["request"]["eval_prompts"] == [nurse]
    assert store.get(finetune(client, admin, prompts=[nurse]).json()["id"])["request"]["eval_prompts"] is None


def test_finetune_bad_held_out_prompts(client: TestClient, admin: dict[str, str]) -> None:
    nurse = "a photo of the face of a nurse, a person"
    assert_error(finetune(client, admin, prompts=[nurse], eval_prompt_set="nope"), 422, "eval_prompt_set",
                 "unknown_prompt_set")  # fmt: skip
    assert_error(finetune(client, admin, prompts=[nurse], eval_prompts=[nurse], eval_prompt_set="testbed-test"), 422,
                 "eval_prompts", "prompts_or_prompt_set")  # fmt: skip
    assert_error(finetune(client, admin, prompts=[nurse], eval_prompts=[" "]), 422, "eval_prompts.0", "empty_prompt")


def test_finetune_unknown_method(client: TestClient, admin: dict[str, str]) -> None:
    assert_error(finetune(client, admin, method="dreambooth", prompt_set="testbed-train"), 422, "method",
                 "unknown_method")  # fmt: skip


@pytest.mark.parametrize("method, hp, param", [
    ("dft", {"learning_rate": 0.01}, "hyperparameters"),  # unknown: the message lists the known ones
    ("dft", {"lr": "fast"}, "hyperparameters.lr"),
    ("dft", {"text_encoder_modules": "token_map"}, "hyperparameters.text_encoder_modules"),  # research, not product
    ("dft", {"token_map_train": "write"}, "hyperparameters"),  # a research knob: unknown to the product
    ("prefix", {"train": "unet"}, "hyperparameters.train"),
    ("ida", {"step": -1}, "hyperparameters.step"),
    ("dft", {"ema_decay": 1.0}, "hyperparameters.ema_decay"),  # the published average would never move
    ("dft", {"eval_images": 0}, "hyperparameters.eval_images"),  # would fail only after all the training
    ("fair_mapping", {"depth": 0}, "hyperparameters.depth"),
    ("fair_mapping", {"depth": 17}, "hyperparameters.depth"),
    ("fair_mapping", {"lr": 0}, "hyperparameters.lr"),
    ("fair_mapping", {"fair_weight": -1}, "hyperparameters.fair_weight"),
    ("fair_mapping", {"skip_keywords": ["woman"]}, "hyperparameters.skip_keywords"),
    ("fair_mapping", {"rank": 4}, "hyperparameters"),  # a DFT knob: unknown to fair_mapping
    ("gmm", {"components": 0}, "hyperparameters.components"),  # K of 0
    ("gmm", {"images": 3, "components": 4}, "hyperparameters.images"),  # N smaller than K
    ("gmm", {"at_step": 19}, "hyperparameters.at_step"),  # nothing left to denoise after the move
    ("gmm", {"covariance": "spherical"}, "hyperparameters.covariance"),
])  # fmt: skip
def test_finetune_bad_hyperparameters_are_refused_before_any_job_is_queued(
    client: TestClient, admin: dict[str, str], store: JobStore, method: str, hp: dict, param: str
) -> None:
    resp = finetune(client, admin, method=method, prompt_set="testbed-train", hyperparameters=hp)
    assert_error(resp, 422, param, "invalid_hyperparameters")
    assert client.get("/v1/admin/finetunes", headers=admin).json()["data"] == []


def test_finetune_unknown_prompt_set(client: TestClient, admin: dict[str, str]) -> None:
    assert_error(finetune(client, admin, prompt_set="laion"), 422, "prompt_set", "unknown_prompt_set")


def test_finetune_needs_prompts_or_a_prompt_set(client: TestClient, admin: dict[str, str]) -> None:
    assert_error(finetune(client, admin), 422, "prompts")
    assert_error(finetune(client, admin, prompts=["a nurse"], prompt_set="testbed-train"), 422, "prompts")
    assert_error(finetune(client, admin, prompts=[]), 422, "prompts")


def test_finetune_prompt_too_long(client: TestClient, admin: dict[str, str]) -> None:
    assert_error(finetune(client, admin, prompts=["a nurse", "a nurse " * 40]), 422, "prompts.1", "prompt_too_long")


def test_finetune_bad_target(client: TestClient, admin: dict[str, str]) -> None:
    resp = finetune(client, admin, prompt_set="testbed-train", fairness_target={"gender": {"female": 0.7, "male": 0.7}})
    assert_error(resp, 422, "fairness_target.gender")


def test_finetune_unknown_base_model(client: TestClient, admin: dict[str, str]) -> None:
    assert_error(finetune(client, admin, prompt_set="testbed-train", base_model="sdxl"), 422, "base_model")


def test_finetune_unknown_id(client: TestClient, admin: dict[str, str]) -> None:
    assert_error(client.get("/v1/admin/finetunes/" + "a" * 32, headers=admin), 404, "id")


# -- adaptor retirement ----------------------------------------------------------------------------------
def test_retire_an_adaptor(client: TestClient, admin: dict[str, str], settings: Settings) -> None:
    write_manifest(settings.adaptor_dir, "fair-gender")
    assert client.delete("/v1/admin/adaptors/fair-gender").status_code == 401
    resp = client.delete("/v1/admin/adaptors/fair-gender", headers=admin)
    assert resp.status_code == 200 and resp.json() == {"id": "fair-gender", "retired": True}
    assert not (settings.adaptor_dir / "fair-gender").exists()
    assert (settings.adaptor_dir / ".retired-fair-gender" / "manifest.json").is_file()
    assert client.get("/v1/adaptors").json() == {"data": []}
    assert client.get("/v1/adaptors/fair-gender").status_code == 404
    assert_error(gen(client, adaptor_id="fair-gender"), 404, "adaptor_id")
    assert_error(client.delete("/v1/admin/adaptors/fair-gender", headers=admin), 404, "id")


# -- health, readiness, metrics ------------------------------------------------------------------------
def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_needs_an_inference_worker_heartbeat(client: TestClient, store: JobStore) -> None:
    err = assert_error(client.get("/readyz"), 503, None, "no_worker")
    assert "inference worker" in err["message"]
    store.heartbeat("training", "t1")
    assert client.get("/readyz").status_code == 503
    store.heartbeat("inference", "w1")
    resp = client.get("/readyz")
    assert resp.status_code == 200 and resp.json() == {"status": "ready", "workers": ["w1"]}


def test_readyz_without_redis(settings: Settings) -> None:
    from tests.support.processes import free_port

    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(down)) as c:
        assert c.get("/healthz").status_code == 200
        assert_error(c.get("/readyz"), 503, None, "broker_unavailable")
        assert c.get("/metrics").status_code == 200  # store gauges left out, not a failure


def test_metrics(client: TestClient, store: JobStore, raw_redis: redis.Redis) -> None:
    raw_redis.hset("fairdiff:stats", mapping={"adaptor_cache_hits": 7, "adaptor_cache_misses": 2, "adaptor_swaps": 3})
    job_id = gen(client).json()["id"]
    gen(client)
    store.mark_running(job_id, "w1")
    store.finish(job_id, JobState.succeeded, result={"images": [{"url": "a"}, {"url": "b"}]})
    client.get(f"/v1/jobs/{job_id}")
    client.get(f"/v1/jobs/{job_id}")  # counted once
    client.get("/v1/jobs/" + "0" * 32)
    client.get("/openapi.json")
    client.get("/v1/no-such-route")
    text = client.get("/metrics").text
    assert 'fairdiff_http_requests_total{method="POST",route="/v1/generate",status="202"} 2.0' in text
    assert 'fairdiff_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert 'fairdiff_http_requests_total{method="GET",route="/openapi.json",status="200"} 1.0' in text
    assert 'fairdiff_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert "fairdiff_http_request_duration_seconds_bucket" in text
    assert 'fairdiff_queue_depth{queue="inference"} 1.0' in text
    assert 'fairdiff_queue_depth{queue="training"} 0.0' in text
    assert 'fairdiff_job_duration_seconds_count{kind="generate",state="succeeded"} 1.0' in text
    assert "fairdiff_images_generated_total 2.0" in text
    assert "fairdiff_worker_adaptor_cache_hits 7.0" in text
    assert "fairdiff_worker_adaptor_cache_misses 2.0" in text
    assert "fairdiff_worker_adaptor_swaps 3.0" in text
    assert "fairdiff_live_workers" in text


# -- errors and docs -----------------------------------------------------------------------------------
def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404, None)
    assert client.put("/v1/generate").json()["error"]["type"]


def test_unexpected_errors_are_500_json_without_a_traceback(settings: Settings, store: JobStore, testbed_info,
                                                            raw_redis: redis.Redis) -> None:  # fmt: skip
    job_id = "b" * 32
    raw_redis.hset(JOB_KEY.format(id=job_id), mapping={"id": job_id, "kind": "generate", "queue": "inference",
                                                       "state": "queued", "request": "{corrupt"})  # fmt: skip
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        resp = c.get(f"/v1/jobs/{job_id}")
    assert resp.status_code == 500
    assert resp.json() == {"error": {"message": "internal server error", "type": "internal_error", "param": None,
                                     "code": "internal_error"}}  # fmt: skip
    assert "Traceback" not in resp.text


def test_openapi_declares_models_and_errors(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/generate"]["post"]
    assert {"200", "202", "400", "404", "409", "413", "422", "503"} <= set(post["responses"])
    assert "ErrorResponse" in spec["components"]["schemas"] and "GenerateRequest" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_the_default_admin_token_only_serves_loopback(settings: Settings, store: JobStore, testbed_info) -> None:
    from common.settings import DEFAULT_ADMIN_TOKEN

    dev = settings.model_copy(update={"admin_token": DEFAULT_ADMIN_TOKEN, "env": "dev"})
    assert dev.admin_token_refusal("127.0.0.1") is None and dev.admin_token_refusal("::1") is None
    assert dev.admin_token_refusal("localhost") is None and dev.admin_token_refusal(None) is None
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.org"):
        assert "FAIRDIFF_ADMIN_TOKEN" in (dev.admin_token_refusal(host) or ""), host
    assert settings.admin_token_refusal("0.0.0.0") is None  # a real secret may listen anywhere

    store.publish_model(testbed_info)
    headers = {"Authorization": f"Bearer {DEFAULT_ADMIN_TOKEN}"}
    app = create_app(dev)
    with TestClient(app, base_url="http://10.1.2.3") as remote:  # a request that arrived on a network address
        err = assert_error(remote.get("/v1/admin/finetunes", headers=headers), 403, None, "default_admin_token")
        assert "FAIRDIFF_ADMIN_TOKEN" in err["message"]
    with TestClient(app, base_url="http://127.0.0.1") as local:
        assert local.get("/v1/admin/finetunes", headers=headers).status_code == 200


def test_fairdiff_gateway_refuses_the_default_token_off_loopback(capsys, monkeypatch) -> None:
    from common.settings import get_settings
    from workers.cli import main

    monkeypatch.delenv("FAIRDIFF_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("FAIRDIFF_ENV", "dev")
    get_settings.cache_clear()
    try:
        assert main(["gateway", "--host", "0.0.0.0"]) == 2
    finally:
        get_settings.cache_clear()
    assert "FAIRDIFF_ADMIN_TOKEN" in capsys.readouterr().err
