"""POST /v1/generate: acceptance, queueing, idempotency, `Prefer: wait`, and every bad-input rule."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from fastapi.testclient import TestClient

from common.jobs import JobStore
from common.schemas import JobState
from common.settings import Settings
from service.app import create_app
from tests.service.helpers import assert_error, gen, write_manifest


# -- accepted requests -------------------------------------------------------------------------------
def test_generate_answers_202_writes_the_job_and_enqueues_one_task(
    client: TestClient, store: JobStore, raw_redis: redis.Redis
) -> None:
    target = {"gender": {"female": 0.5, "male": 0.5}}
    resp = gen(client, num_images=4, fairness_target=target)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert set(body) == {"id", "url", "state"}
    assert body["state"] == "queued"
    assert body["url"] == f"/v1/jobs/{body['id']}" == resp.headers["location"]
    assert raw_redis.llen("inference") == 1  # the Celery message, on the broker's queue list

    job = store.get(body["id"])
    assert job is not None and job["kind"] == "generate" and job["queue"] == "inference"
    request = job["request"]
    assert request["num_images"] == 4
    assert isinstance(request["seed"], int)  # random but recorded
    assert request["steps"] == 20 and request["guidance_scale"] == 5.0  # defaults from ModelInfo
    assert (request["width"], request["height"]) == (32, 32)
    # Classes left out of a target would be filled with 0; here both are given.
    assert request["fairness_target"] == target
    assert request["strategy"] == "auto" and request["audit"] is True


def test_explicit_seed_steps_and_classes_left_out(client: TestClient, store: JobStore) -> None:
    resp = gen(client, seed=123, steps=7, guidance_scale=0, width=32, height=32,
               fairness_target={"skin_tone": {"I": 1}}, strategy="assign", audit=False)  # fmt: skip
    assert resp.status_code == 202, resp.text
    request = store.get(resp.json()["id"])["request"]
    assert (request["seed"], request["steps"], request["guidance_scale"]) == (123, 7, 0.0)
    assert request["fairness_target"] == {"skin_tone": {"I": 1.0, "II": 0.0, "III": 0.0, "IV": 0.0}}
    assert request["strategy"] == "assign" and request["audit"] is False


def test_queue_position_while_queued(client: TestClient) -> None:
    ids = [gen(client).json()["id"] for _ in range(3)]
    for expected, job_id in enumerate(ids):
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "queued"
        assert job["queue_position"] == expected
        assert job["progress"] is None and job["result"] is None


def test_idempotency_key_returns_the_same_job_and_enqueues_once(client: TestClient, raw_redis: redis.Redis) -> None:
    first = gen(client, headers={"Idempotency-Key": "order-42"})
    again = gen(client, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert raw_redis.llen("inference") == 1
    other = gen(client, headers={"Idempotency-Key": "order-43"})
    assert other.json()["id"] != first.json()["id"]
    assert raw_redis.llen("inference") == 2


def test_concurrent_requests_with_one_idempotency_key_enqueue_once(client: TestClient, raw_redis: redis.Redis) -> None:
    results: list[str] = []

    def post() -> None:
        results.append(gen(client, headers={"Idempotency-Key": "burst"}).json()["id"])

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert raw_redis.llen("inference") == 1


def test_idempotency_keys_are_scoped_per_api_key(settings: Settings, store: JobStore, testbed_info,
                                                 raw_redis: redis.Redis) -> None:  # fmt: skip
    store.publish_model(testbed_info)
    with TestClient(create_app(settings.model_copy(update={"api_keys": "key-a,key-b"}))) as c:
        a = gen(c, headers={"Idempotency-Key": "k", "Authorization": "Bearer key-a"})
        a2 = gen(c, headers={"Idempotency-Key": "k", "Authorization": "Bearer key-a"})
        b = gen(c, headers={"Idempotency-Key": "k", "Authorization": "Bearer key-b"})
    assert a.json()["id"] == a2.json()["id"] != b.json()["id"]
    assert raw_redis.llen("inference") == 2


def test_api_keys_when_configured(settings: Settings, store: JobStore, testbed_info) -> None:
    store.publish_model(testbed_info)
    with TestClient(create_app(settings.model_copy(update={"api_keys": "key-a"}))) as c:
        missing = gen(c)
        assert_error(missing, 401, None, "missing_credentials")
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_error(gen(c, headers={"Authorization": "Bearer nope"}), 403, None, "invalid_credentials")
        assert gen(c, headers={"Authorization": "Bearer key-a"}).status_code == 202
        assert c.get("/healthz").status_code == 200  # probes stay open


def _play_worker(store: JobStore, job_id: str, delay: float) -> None:
    """What an inference worker does to a job, through the same JobStore calls."""
    time.sleep(delay)
    store.mark_running(job_id, "test-worker")
    store.set_progress(job_id, 1, 1)
    store.finish(job_id, JobState.succeeded, result={"images": [{"url": f"/v1/jobs/{job_id}/images/0.png"}]})


def test_prefer_wait_answers_200_with_the_finished_job(client: TestClient, store: JobStore) -> None:
    job_id = gen(client).json()["id"]  # a finished job is looked up through its idempotency key below
    worker = threading.Thread(target=_play_worker, args=(store, job_id, 0.3))
    store.claim_idempotency("anon", "wait-test", job_id)
    worker.start()
    t0 = time.monotonic()
    resp = gen(client, headers={"Prefer": "wait=5", "Idempotency-Key": "wait-test"})
    worker.join()
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - t0 < 4
    body = resp.json()
    assert body["id"] == job_id and body["state"] == "succeeded"
    assert body["result"]["images"][0]["url"].endswith("/0.png")
    assert body["progress"] == {"step": 1, "total": 1}


def test_prefer_wait_answers_202_when_the_job_is_not_done_in_time(client: TestClient) -> None:
    t0 = time.monotonic()
    resp = gen(client, headers={"Prefer": "respond-async, wait=0.3"})
    elapsed = time.monotonic() - t0
    assert resp.status_code == 202
    assert resp.json()["state"] == "queued"
    assert 0.25 <= elapsed < 3


def test_no_registered_worker_is_503(settings: Settings) -> None:
    with TestClient(create_app(settings)) as c:
        err = assert_error(gen(c), 503, None, "no_worker")
    assert "testbed" in err["message"]


def test_redis_down_is_503_not_500(settings: Settings) -> None:
    from tests.support.processes import free_port

    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(down)) as c:
        assert_error(gen(c), 503, None, "broker_unavailable")


# -- bad input: one test per rule, each naming the field ---------------------------------------------
@pytest.mark.parametrize("n", [0, 65, -1])
def test_num_images_out_of_range(client: TestClient, n: int) -> None:
    assert_error(gen(client, num_images=n), 422, "num_images")


@pytest.mark.parametrize("steps", [0, 201])
def test_steps_out_of_range(client: TestClient, steps: int) -> None:
    assert_error(gen(client, steps=steps), 422, "steps")


def test_guidance_scale_out_of_range(client: TestClient) -> None:
    assert_error(gen(client, guidance_scale=50.5), 422, "guidance_scale")


@pytest.mark.parametrize("field", ["width", "height"])
def test_size_must_match_the_base_model(client: TestClient, field: str) -> None:
    err = assert_error(gen(client, **{field: 64}), 422, field, "unsupported_size")
    assert "32x32" in err["message"]


def test_prompt_longer_than_the_tokenizer_takes(client: TestClient) -> None:
    err = assert_error(gen(client, prompt="a photo of the face of a nurse " * 8), 422, "prompt", "prompt_too_long")
    assert "at most 32" in err["message"]


def test_prompt_at_the_limit_is_accepted(client: TestClient, testbed_info) -> None:
    from service.validation import token_count

    words = []
    while token_count(testbed_info, " ".join([*words, "nurse"])) <= 32:
        words.append("nurse")
    assert token_count(testbed_info, " ".join(words)) == 32
    assert gen(client, prompt=" ".join(words)).status_code == 202


def test_negative_prompt_too_long(client: TestClient) -> None:
    assert_error(gen(client, negative_prompt="blurry " * 40), 422, "negative_prompt", "prompt_too_long")


def test_missing_prompt(client: TestClient) -> None:
    assert_error(client.post("/v1/generate", json={"num_images": 1}), 422, "prompt")


def test_unknown_field_is_named(client: TestClient) -> None:
    assert_error(gen(client, num_imgs=3), 422, "num_imgs")


def test_unknown_attribute(client: TestClient) -> None:
    err = assert_error(gen(client, fairness_target={"race": {"a": 1.0}}), 422, "fairness_target.race")
    assert "unknown attribute" in err["message"]


def test_unknown_class(client: TestClient) -> None:
    target = {"gender": {"female": 0.5, "nonbinary": 0.5}}
    assert_error(gen(client, fairness_target=target), 422, "fairness_target.gender.nonbinary")


def test_negative_probability(client: TestClient) -> None:
    target = {"gender": {"female": -0.5, "male": 1.5}}
    err = assert_error(gen(client, fairness_target=target), 422, "fairness_target.gender.female")
    assert "negative" in err["message"]


def test_nan_probability(client: TestClient) -> None:
    body = '{"prompt": "a nurse", "fairness_target": {"gender": {"female": NaN, "male": 0.5}}}'
    resp = client.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
    err = assert_error(resp, 422, "fairness_target.gender.female")
    assert "finite" in err["message"]


def test_probabilities_not_summing_to_one(client: TestClient) -> None:
    target = {"gender": {"female": 0.5, "male": 0.5 + 1e-5}}
    err = assert_error(gen(client, fairness_target=target), 422, "fairness_target.gender")
    assert "sum" in err["message"]


def test_sum_within_tolerance_is_accepted(client: TestClient) -> None:
    assert gen(client, fairness_target={"gender": {"female": 0.5, "male": 0.5 + 1e-7}}).status_code == 202


def test_empty_target(client: TestClient) -> None:
    assert_error(gen(client, fairness_target={}), 422, "fairness_target")


def test_probability_given_as_a_string(client: TestClient) -> None:
    assert_error(gen(client, fairness_target={"gender": {"female": "0.5", "male": 0.5}}), 422,
                 "fairness_target.gender.female")  # fmt: skip


def test_unknown_strategy(client: TestClient) -> None:
    assert_error(gen(client, strategy="magic"), 422, "strategy")


def test_strategy_that_needs_a_target(client: TestClient) -> None:
    assert_error(gen(client, strategy="assign"), 422, "fairness_target", "missing_fairness_target")


def test_unknown_adaptor(client: TestClient) -> None:
    assert_error(gen(client, adaptor_id="nope"), 404, "adaptor_id", "adaptor_not_found")


def test_adaptor_id_that_is_a_path(client: TestClient) -> None:
    assert_error(gen(client, adaptor_id="../../etc"), 404, "adaptor_id", "adaptor_not_found")


def test_adaptor_for_another_base_model(client: TestClient, settings: Settings) -> None:
    write_manifest(settings.adaptor_dir, "sd15-fair", base_model="runwayml/stable-diffusion-v1-5")
    err = assert_error(gen(client, adaptor_id="sd15-fair"), 409, "adaptor_id", "adaptor_base_model_mismatch")
    assert "stable-diffusion" in err["message"]


def test_known_adaptor_is_accepted(client: TestClient, settings: Settings, store: JobStore) -> None:
    write_manifest(settings.adaptor_dir, "fair-gender")
    resp = gen(client, adaptor_id="fair-gender", strategy="adaptor")
    assert resp.status_code == 202, resp.text
    assert store.get(resp.json()["id"])["request"]["adaptor_id"] == "fair-gender"


def test_adaptor_with_a_conflicting_strategy(client: TestClient, settings: Settings) -> None:
    write_manifest(settings.adaptor_dir, "fair-gender")
    assert_error(gen(client, adaptor_id="fair-gender", strategy="guidance"), 422, "strategy")


def test_body_over_the_limit_by_content_length(client: TestClient, raw_redis: redis.Redis) -> None:
    resp = gen(client, negative_prompt="x" * 10_000)
    assert_error(resp, 413, "body", "body_too_large")
    assert raw_redis.llen("inference") == 0


def test_body_over_the_limit_without_content_length(client: TestClient) -> None:
    def chunks():
        yield b'{"prompt": "a nurse", "negative_prompt": "'
        for _ in range(20):
            yield b"x" * 1000
        yield b'"}'

    resp = client.post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert_error(resp, 413, "body", "body_too_large")


def test_malformed_json(client: TestClient) -> None:
    resp = client.post("/v1/generate", content=b'{"prompt": "a nurse",', headers={"Content-Type": "application/json"})
    err = assert_error(resp, 400, None, "invalid_json")
    assert "JSON" in err["message"]


def test_body_that_is_not_an_object(client: TestClient) -> None:
    resp = client.post("/v1/generate", json=["a nurse"])
    assert resp.status_code == 422
    assert "error" in resp.json()


def test_adaptor_strategy_without_a_matching_adaptor_is_409(client: TestClient, settings: Settings, store: JobStore,
                                                            raw_redis: redis.Redis) -> None:  # fmt: skip
    skewed = {"gender": {"female": 0.3, "male": 0.7}}
    err = assert_error(gen(client, strategy="adaptor", fairness_target=skewed), 409, "strategy", "no_matching_adaptor")
    assert "fairness_target" in err["message"] and "assign" in err["message"]  # says what would work instead
    write_manifest(settings.adaptor_dir, "fair-gender")  # trained for 50/50: still no match for 30/70
    write_manifest(settings.adaptor_dir, "sd15-skewed", base_model="runwayml/stable-diffusion-v1-5", target=skewed)
    assert_error(gen(client, strategy="adaptor", fairness_target=skewed), 409, "strategy", "no_matching_adaptor")
    assert raw_redis.llen("inference") == 0  # nothing was enqueued for a job that could only fail

    matched = gen(client, strategy="adaptor", fairness_target={"gender": {"female": 0.5, "male": 0.5}})
    assert matched.status_code == 202, matched.text
    assert store.get(matched.json()["id"])["request"]["strategy"] == "adaptor"


def test_guidance_strategy_needs_a_calibration_for_prompt_and_sampler(client: TestClient, settings: Settings,
                                                                      store: JobStore) -> None:  # fmt: skip
    half = {"gender": {"female": 0.5, "male": 0.5}}
    prompt = "a photo of the face of a senator, a person"
    body = {"prompt": prompt, "strategy": "guidance", "fairness_target": half}
    assert_error(gen(client, **body), 409, "strategy", "no_calibration")
    write_manifest(settings.adaptor_dir, "ida-senator", kind="ida", hyperparameters={"prompts": [prompt]},
                   sampler={"steps": 20, "guidance_scale": 5.0})  # fmt: skip
    assert_error(gen(client, **body, steps=10), 409, "strategy", "no_calibration")  # calibrated at 20 steps only
    assert_error(gen(client, **{**body, "prompt": "a photo of the face of a nurse, a person"}), 409, "strategy")
    accepted = gen(client, **body, steps=20, guidance_scale=5.0)
    assert accepted.status_code == 202, accepted.text
    assert store.get(accepted.json()["id"])["request"]["strategy"] == "guidance"


def _gmm(settings: Settings, adaptor_id: str, prompt: str, classes: list[dict], **extra: object) -> None:
    """A hand-written latent calibration: its components' classes for one prompt, at 20 steps and CFG 5."""
    write_manifest(settings.adaptor_dir, adaptor_id, kind="gmm", target={"gender": {"female": 0.5, "male": 0.5}},
                   hyperparameters={"prompts": [prompt], "component_classes": [classes], "at_step": 9},
                   sampler={"steps": 20, "guidance_scale": 5.0}, files={"gmm.safetensors": "0" * 64}, **extra)  # fmt: skip


def test_latent_strategy_needs_a_calibration_that_carries_every_class(client: TestClient, settings: Settings,
                                                                      store: JobStore) -> None:  # fmt: skip
    half = {"gender": {"female": 0.5, "male": 0.5}}
    senator = "a photo of the face of a senator, a person"
    body = {"prompt": senator, "strategy": "latent", "fairness_target": half}
    assert_error(gen(client, **{**body, "fairness_target": None}), 422, "fairness_target", "missing_fairness_target")
    assert_error(gen(client, **body), 409, "strategy", "no_calibration")
    _gmm(settings, "gmm-men", senator, [{"gender": "male"}, {"gender": "male"}])
    # the calibration has no component of women: the class is named, before any work
    err = assert_error(gen(client, **body), 409, "fairness_target.gender.female", "uncovered_class")
    assert "gmm-men" in err["message"]
    assert gen(client, **{**body, "fairness_target": {"gender": {"male": 1.0}}}).status_code == 202
    assert_error(gen(client, **{**body, "fairness_target": {"age": {"young": 0.5, "old": 0.5}}}), 409, "strategy",
                 "no_calibration")  # its components are named by gender only  # fmt: skip
    _gmm(settings, "gmm-both", senator, [{"gender": "female"}, {"gender": "male"}], created="2026-11-24T00:00:00+00:00")
    assert_error(gen(client, **body, steps=10), 409, "strategy", "no_calibration")  # calibrated at 20 steps only
    accepted = gen(client, **body, enforce=True, ledger="latent-stream")  # exact per request: enforce and ledger work
    assert accepted.status_code == 202, accepted.text
    assert store.get(accepted.json()["id"])["request"]["strategy"] == "latent"


def test_a_named_latent_calibration_for_another_prompt_or_sampler_is_409(client: TestClient, settings: Settings) -> None:
    senator = "a photo of the face of a senator, a person"
    _gmm(settings, "gmm-senator", senator, [{"gender": "female"}, {"gender": "male"}])
    body = {"prompt": senator, "strategy": "latent", "adaptor_id": "gmm-senator",
            "fairness_target": {"gender": {"female": 0.3, "male": 0.7}}}  # any target its classes carry  # fmt: skip
    assert gen(client, **body).status_code == 202
    assert_error(gen(client, **body, steps=12), 409, "adaptor_id", "adaptor_sampler_mismatch")
    assert_error(gen(client, **body, guidance_scale=7.0), 409, "adaptor_id", "adaptor_sampler_mismatch")
    assert_error(gen(client, **{**body, "prompt": "a photo of the face of a nurse, a person"}), 409, "adaptor_id",
                 "adaptor_prompt_mismatch")  # fmt: skip
    assert_error(gen(client, **{**body, "fairness_target": {"skin_tone": {"I": 1.0}}}), 409,
                 "fairness_target.skin_tone.I", "uncovered_class")  # fmt: skip
