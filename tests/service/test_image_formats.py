"""Image formats and inline images on /v1/generate, and the OpenAI-compatible POST /v1/images/generations.

No Celery worker runs here: a thread plays the worker through the JobStore calls a worker makes, writing PNGs as
workers/inference.py does.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from common.jobs import JobStore
from common.schemas import JobKind, JobState
from common.settings import Settings
from service.app import create_app
from service.images import read_metadata
from tests.service.helpers import PROMPT, assert_error, gen, write_manifest

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def finish_like_a_worker(store: JobStore, settings: Settings, job_id: str) -> None:
    n = store.get(job_id)["request"]["num_images"]
    folder = settings.jobs_dir / job_id
    folder.mkdir(parents=True, exist_ok=True)
    store.mark_running(job_id, "test-worker")
    images = []
    for k in range(n):
        Image.new("RGB", (32, 32), COLOURS[k % len(COLOURS)]).save(folder / f"{k}.png")
        gender = "female" if k % 2 == 0 else "male"
        images.append({"url": f"/v1/jobs/{job_id}/images/{k}.png", "seed_index": k, "assigned": {"gender": gender},
                       "attributes": {"gender": {"class": "male", "confidence": 0.9}}})  # fmt: skip
    result = {"images": images, "realised": {"gender": {"female": 0.0, "male": 1.0}}, "guarantee": "exact",
              "strategy": {"requested": "auto", "used": "assign", "reason": "test"}}  # fmt: skip
    store.finish(job_id, JobState.succeeded, result=result)


def worker_thread(store: JobStore, settings: Settings) -> threading.Thread:
    """Finishes the next generate job that appears (for requests that wait for their job)."""
    before = set(store.list_ids(JobKind.generate))

    def run() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            new = set(store.list_ids(JobKind.generate)) - before
            if new:
                finish_like_a_worker(store, settings, new.pop())
                return
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize("fmt,pil_name", [("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")])
def test_b64_json_images_decode_in_the_chosen_format_with_their_metadata(
    client: TestClient, store: JobStore, settings: Settings, fmt: str, pil_name: str
) -> None:
    body = {"num_images": 2, "seed": 11, "output_format": fmt, "response_format": "b64_json"}
    job_id = gen(client, **body).json()["id"]
    finish_like_a_worker(store, settings, job_id)
    job = client.get(f"/v1/jobs/{job_id}").json()
    for k, image in enumerate(job["result"]["images"]):
        assert image["url"] == f"/v1/jobs/{job_id}/images/{k}.{fmt}"
        data = base64.b64decode(image["b64_json"])
        img = decode(data)
        assert img.format == pil_name and img.size == (32, 32)
        r, g, b = img.convert("RGB").getpixel((16, 16))
        assert max(abs(r - COLOURS[k][0]), abs(g - COLOURS[k][1]), abs(b - COLOURS[k][2])) < 12
        meta = read_metadata(data)
        assert meta == {"job": job_id, "prompt": PROMPT, "seed": 11, "seed_index": k, "assigned": image["assigned"],
                        "audited": {"gender": "male"}}  # fmt: skip
        served = client.get(image["url"])
        assert served.headers["content-type"] == f"image/{fmt}" and read_metadata(served.content) == meta


def test_a_default_job_view_is_unchanged(client: TestClient, store: JobStore, settings: Settings) -> None:
    job_id = gen(client, num_images=2).json()["id"]
    assert "extra" not in store.get(job_id)["request"] or store.get(job_id)["request"]["extra"] == {}
    finish_like_a_worker(store, settings, job_id)
    images = client.get(f"/v1/jobs/{job_id}").json()["result"]["images"]
    assert [i["url"] for i in images] == [f"/v1/jobs/{job_id}/images/{k}.png" for k in range(2)]
    assert not any("b64_json" in i for i in images)


def test_any_format_is_served_by_extension_and_unknown_ones_are_404(
    client: TestClient, store: JobStore, settings: Settings
) -> None:
    job_id = gen(client).json()["id"]
    finish_like_a_worker(store, settings, job_id)
    for ext, pil_name in (("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG"), ("jpg", "JPEG")):
        resp = client.get(f"/v1/jobs/{job_id}/images/0.{ext}")
        assert resp.status_code == 200 and decode(resp.content).format == pil_name
    for bad in ("0.gif", "0", "x.png", "0.png.webp"):
        assert_error(client.get(f"/v1/jobs/{job_id}/images/{bad}"), 404, "index", "image_not_found")


def test_unknown_formats_are_refused(client: TestClient) -> None:
    assert_error(gen(client, output_format="gif"), 422, "output_format")
    assert_error(gen(client, response_format="inline"), 422, "response_format")


# -- OpenAI-compatible ---------------------------------------------------------------------------
def test_images_generations_answers_in_openais_shape_with_urls(client: TestClient, store: JobStore, settings: Settings) -> None:
    worker = worker_thread(store, settings)
    resp = client.post("/v1/images/generations", json={"prompt": PROMPT, "n": 2, "size": "32x32",
                                                       "fairness_target": {"gender": {"female": 0.5, "male": 0.5}}})  # fmt: skip
    worker.join()
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"created", "data", "output_format", "size", "fairdiff"} and body["size"] == "32x32"
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    job_id = body["fairdiff"]["id"]
    assert body["data"][0]["url"] == f"http://testserver/v1/jobs/{job_id}/images/0.png"
    assert decode(client.get(body["data"][0]["url"]).content).format == "PNG"
    assert body["fairdiff"]["strategy"]["used"] == "assign" and body["fairdiff"]["guarantee"] == "exact"
    assert body["fairdiff"]["images"][0]["attributes"]["gender"]["class"] == "male"
    assert store.get(job_id)["request"]["fairness_target"] == {"gender": {"female": 0.5, "male": 0.5}}


def test_the_openai_client_library_round_trips_b64_json_and_url(client: TestClient, store: JobStore, settings: Settings) -> None:
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    for response_format in ("b64_json", "url"):
        worker = worker_thread(store, settings)
        out = oa.images.generate(model="testbed", prompt=PROMPT, n=2, size="32x32", response_format=response_format,
                                 extra_body={"fairness_target": {"gender": {"female": 0.5, "male": 0.5}}, "seed": 3})  # fmt: skip
        worker.join()
        assert len(out.data) == 2
        if response_format == "b64_json":
            assert decode(base64.b64decode(out.data[0].b64_json)).size == (32, 32) and out.data[0].url is None
        else:
            assert out.data[0].url.endswith("/images/0.png") and out.data[0].b64_json is None
        assert out.model_extra["fairdiff"]["seed"] == 3


def test_images_generations_refuses_what_it_cannot_serve(client: TestClient, settings: Settings) -> None:
    def images(**body):
        return client.post("/v1/images/generations", json={"prompt": PROMPT, **body})

    assert_error(images(size="1024x1024"), 422, "size", "unsupported_size")
    assert_error(images(size="big"), 422, "size")
    assert_error(images(n=0), 422, "n")
    assert_error(images(model="no-such-adaptor"), 404, "model")
    write_manifest(settings.adaptor_dir, "other-model", base_model="sd15")
    assert_error(images(model="other-model"), 409, "model")
    assert_error(images(fairness_target={"gender": {"female": 0.5, "male": 0.6}}), 422, "fairness_target.gender")


def test_a_job_not_finished_within_the_wait_is_a_504_pointing_at_it(settings: Settings, store: JobStore, testbed_info) -> None:
    store.publish_model(testbed_info)
    with TestClient(create_app(settings.model_copy(update={"max_wait_s": 0.3}))) as c:
        resp = c.post("/v1/images/generations", json={"prompt": PROMPT})
        err = assert_error(resp, 504, None, "job_not_finished")
        location = resp.headers["location"]
        assert location in err["message"] and c.get(location).json()["state"] == "queued"


def test_an_image_fetched_while_its_job_runs_carries_its_assigned_classes(client: TestClient, store: JobStore,
                                                                          settings: Settings) -> None:  # fmt: skip
    """An `image` event's URL works at once: before the audit, its metadata names what the worker had assigned."""
    job_id = gen(client, num_images=2, seed=3).json()["id"]
    store.mark_running(job_id, "test-worker")
    folder = settings.jobs_dir / job_id
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), COLOURS[1]).save(folder / "1.png")
    store.add_ready_image(job_id, {"index": 1, "seed": 3, "assigned": {"gender": "male"},
                                   "url": f"/v1/jobs/{job_id}/images/1.png"})  # fmt: skip
    resp = client.get(f"/v1/jobs/{job_id}/images/1.webp")
    assert resp.status_code == 200 and client.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
    meta = read_metadata(resp.content)
    assert (meta["seed"], meta["seed_index"], meta["assigned"]) == (3, 1, {"gender": "male"}) and "audited" not in meta
    assert client.get(f"/v1/jobs/{job_id}/images/0.png").status_code == 404  # not written yet
