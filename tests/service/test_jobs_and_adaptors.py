"""GET/DELETE /v1/jobs/{id}, job images, and the adaptor listing."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from fastapi.testclient import TestClient

from common.jobs import JobStore
from common.schemas import JobState
from common.settings import Settings
from tests.service.helpers import PROMPT, assert_error, gen, write_manifest


def read_pixels(data: bytes) -> list:
    from PIL import Image

    return list(Image.open(io.BytesIO(data)).convert("RGB").getdata())


def tiny_png() -> bytes:
    """A valid 1x1 PNG, written by hand so the test needs no imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b"")
    )


def test_unknown_and_malformed_job_ids_are_404(client: TestClient) -> None:
    assert_error(client.get("/v1/jobs/" + "0" * 32), 404, "id", "job_not_found")
    assert_error(client.get("/v1/jobs/not-a-job-id"), 404, "id", "job_not_found")
    assert_error(client.delete("/v1/jobs/" + "f" * 32), 404, "id", "job_not_found")


def test_job_view_while_running_and_when_done(client: TestClient, store: JobStore) -> None:
    job_id = gen(client, num_images=2, seed=5).json()["id"]
    store.mark_running(job_id, "w1")
    store.set_progress(job_id, 3, 20)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "running" and job["queue_position"] is None
    assert job["progress"] == {"step": 3, "total": 20}
    assert job["request"]["seed"] == 5 and job["request"]["prompt"] == PROMPT

    result = {
        "images": [
            {"url": f"/v1/jobs/{job_id}/images/{k}.png", "attributes": {"gender": {"female": 0.9}}} for k in range(2)
        ],  # fmt: skip
        "realised": {"gender": {"female": 1.0, "male": 0.0}},
        "target_distance": 0.5,
        "strategy": "none",
        "adaptor": None,
        "timings": {"total_s": 1.0},
    }
    store.finish(job_id, JobState.succeeded, result=result)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["result"] == result and job["finished"] >= job["started"]


def test_cancel_a_queued_job(client: TestClient, store: JobStore) -> None:
    first, second = gen(client).json()["id"], gen(client).json()["id"]
    resp = client.delete(f"/v1/jobs/{first}")
    assert resp.status_code == 200
    assert resp.json()["state"] == "cancelled" and resp.json()["cancel_requested"] is True
    assert store.cancel_requested(first)
    assert client.get(f"/v1/jobs/{second}").json()["queue_position"] == 0
    assert client.delete(f"/v1/jobs/{first}").status_code == 200  # idempotent


def test_cancel_a_running_job_is_202_until_the_worker_stops(client: TestClient, store: JobStore) -> None:
    job_id = gen(client).json()["id"]
    store.mark_running(job_id, "w1")
    resp = client.delete(f"/v1/jobs/{job_id}")
    assert resp.status_code == 202
    assert resp.json()["state"] == "running" and resp.json()["cancel_requested"] is True
    assert store.cancel_requested(job_id)


def test_images_are_served_from_the_jobs_dir(client: TestClient, settings: Settings) -> None:
    job_id = gen(client).json()["id"]
    folder = settings.jobs_dir / job_id
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(tiny_png())
    resp = client.get(f"/v1/jobs/{job_id}/images/0.png")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert read_pixels(resp.content) == read_pixels(tiny_png())  # re-encoded with its metadata (test_image_formats)
    assert_error(client.get(f"/v1/jobs/{job_id}/images/1.png"), 404, "index", "image_not_found")
    assert_error(client.get(f"/v1/jobs/{job_id}/images/abc.png"), 404, "index")
    assert client.get(f"/v1/jobs/{job_id}/images/..%2F..%2Fsecret.png").status_code == 404
    assert_error(client.get(f"/v1/jobs/{'0' * 32}/images/0.png"), 404, "id")


def test_adaptor_listing_from_the_store(client: TestClient, settings: Settings) -> None:
    assert client.get("/v1/adaptors").json() == {"data": []}  # no store folder yet
    write_manifest(settings.adaptor_dir, "fair-gender")
    write_manifest(settings.adaptor_dir, "fair-age", target={"age": {"young": 0.75, "old": 0.25}})
    (settings.adaptor_dir / ".staging-half").mkdir()
    listing = client.get("/v1/adaptors").json()["data"]
    assert [a["id"] for a in listing] == ["fair-age", "fair-gender"]
    one = client.get("/v1/adaptors/fair-gender").json()
    for key in ("kind", "base_model", "attributes", "target", "metrics", "files", "size_bytes", "created"):
        assert key in one
    assert one["kind"] == "prefix_tokens" and one["size_bytes"] == 1234


def test_unknown_adaptor_is_404(client: TestClient) -> None:
    assert_error(client.get("/v1/adaptors/missing"), 404, "id", "adaptor_not_found")
    assert_error(client.get("/v1/adaptors/..%2F..%2Fetc"), 404, None)


def test_unreadable_manifest_is_409_not_500(client: TestClient, settings: Settings) -> None:
    folder: Path = settings.adaptor_dir / "broken"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{not json")
    assert_error(client.get("/v1/adaptors/broken"), 409, "id", "adaptor_unreadable")
    assert client.get("/v1/adaptors").json() == {"data": []}
