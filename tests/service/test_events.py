"""GET /v1/jobs/{id}/events and /v1/admin/finetunes/{id}/events: Server-Sent Events to the job's end, with the
same ownership rules as GET on the job. The test plays the worker through the JobStore calls a worker makes."""

from __future__ import annotations

import json
import threading
import time

from fastapi.testclient import TestClient

from common.jobs import JobStore
from common.schemas import JobState
from common.settings import Settings
from service.app import create_app
from tests.service.helpers import assert_error, gen


def read_events(resp) -> list[tuple[str, dict]]:
    """(event, data) pairs of an SSE response, read until the server closes it."""
    events, kind, data = [], "message", []
    for line in resp.iter_lines():
        line = line.rstrip("\r")
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif not line and data:
            events.append((kind, json.loads("\n".join(data))))
            kind, data = "message", []
    return events


def play_worker(store: JobStore, job_id: str, steps: int = 3, curve: bool = False) -> threading.Thread:
    def run() -> None:
        time.sleep(0.3)
        store.mark_running(job_id, "test-worker")
        for i in range(1, steps + 1):
            time.sleep(0.3)
            store.set_progress(job_id, i, steps)
            if curve:
                store.append_curve(job_id, {"step": i, "loss": 1.0 / i, "bias": 0.5 / i})
        time.sleep(0.3)
        store.finish(job_id, JobState.succeeded, result={"images": [{"url": f"/v1/jobs/{job_id}/images/0.png", "seed_index": 0}]})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_events_stream_state_then_each_step_in_order_then_the_finished_job(client: TestClient, store: JobStore) -> None:
    job_id = gen(client).json()["id"]
    worker = play_worker(store, job_id)
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = read_events(resp)
    worker.join()
    kinds = [k for k, _ in events]
    assert kinds[0] == "state" and events[0][1]["state"] == "queued" and events[0][1]["queue_position"] == 0
    assert "running" in [d["state"] for k, d in events if k == "state"]
    steps = [d["progress"]["step"] for k, d in events if k == "progress"]
    assert steps == sorted(steps) and steps[-1] == 3, events
    assert kinds[-1] == "done" and kinds.count("done") == 1
    assert events[-1][1] == client.get(f"/v1/jobs/{job_id}").json()
    assert events[-1][1]["state"] == "succeeded"
    time.sleep(0.1)
    assert client.app.state.wait_holders.held == 0, "a finished stream gives its place back"


def test_each_written_image_is_one_image_event_before_done_with_its_url_in_the_requested_format(
    client: TestClient, store: JobStore
) -> None:
    job_id = gen(client, num_images=3, seed=7, output_format="webp").json()["id"]

    def run() -> None:
        store.mark_running(job_id, "test-worker")
        for k in (0, 1, 0, 2):  # index 0 written twice (a redelivered job): still one event
            time.sleep(0.15)
            store.add_ready_image(job_id, {"index": k, "seed": 7, "assigned": {"gender": "female"},
                                           "url": f"/v1/jobs/{job_id}/images/{k}.png"})  # fmt: skip
        time.sleep(0.15)
        store.finish(job_id, JobState.succeeded, result={"images": []})

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        events = read_events(resp)
    worker.join()
    images = [d for k, d in events if k == "image"]
    assert [d["index"] for d in images] == [0, 1, 2], events
    assert images[2] == {"id": job_id, "index": 2, "seed": 7, "seed_index": 2, "assigned": {"gender": "female"},
                         "url": f"/v1/jobs/{job_id}/images/2.webp"}  # fmt: skip
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.index("done") > max(i for i, k in enumerate(kinds) if k == "image")


def test_a_finished_job_streams_its_state_and_done_at_once(client: TestClient, store: JobStore) -> None:
    job_id = gen(client).json()["id"]
    client.delete(f"/v1/jobs/{job_id}")
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        events = read_events(resp)
    assert [k for k, _ in events] == ["state", "done"] and events[1][1]["state"] == "cancelled"


def test_events_of_unknown_jobs_and_of_another_kind_are_404(client: TestClient, store: JobStore, admin) -> None:
    assert_error(client.get("/v1/jobs/" + "0" * 32 + "/events"), 404, "id", "job_not_found")
    assert_error(client.get("/v1/jobs/not-an-id/events"), 404, "id", "job_not_found")
    job_id = gen(client).json()["id"]
    assert_error(client.get(f"/v1/admin/finetunes/{job_id}/events", headers=admin), 404, "id", "job_not_found")


def test_another_api_keys_job_is_a_404_and_its_owner_streams_it(settings: Settings, store: JobStore, testbed_info) -> None:
    store.publish_model(testbed_info)
    keyed = settings.model_copy(update={"api_keys": "k1,k2"})
    with TestClient(create_app(keyed)) as c:
        job_id = gen(c, {"Authorization": "Bearer k1"}).json()["id"]
        assert c.get(f"/v1/jobs/{job_id}/events").status_code == 401
        assert_error(c.get(f"/v1/jobs/{job_id}/events", headers={"Authorization": "Bearer k2"}), 404, "id", "job_not_found")
        store.request_cancel(job_id)
        with c.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Authorization": "Bearer k1"}) as resp:
            assert resp.status_code == 200
            assert read_events(resp)[-1][1]["state"] == "cancelled"


def test_finetune_events_carry_the_curve_and_need_the_admin_token(client: TestClient, store: JobStore, admin) -> None:
    body = {"method": "prefix", "prompt_set": "testbed-train", "fairness_target": {"gender": {"female": 0.5, "male": 0.5}}}
    resp = client.post("/v1/admin/finetunes", json=body, headers=admin)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    assert client.get(f"/v1/admin/finetunes/{job_id}/events").status_code == 401
    worker = play_worker(store, job_id, curve=True)
    with client.stream("GET", f"/v1/admin/finetunes/{job_id}/events", headers=admin) as resp:
        events = read_events(resp)
    worker.join()
    points = [p for k, d in events if k == "curve" for p in d["points"]]
    assert [p["step"] for p in points] == [1, 2, 3]
    final = client.get(f"/v1/admin/finetunes/{job_id}", headers=admin).json()
    assert events[-1][0] == "done" and events[-1][1]["curve"] == final["curve"]


def test_streams_past_the_cap_get_one_error_event(client: TestClient, store: JobStore) -> None:
    job_id = gen(client).json()["id"]
    holders = client.app.state.wait_holders
    held = 0
    while holders.acquire():
        held += 1
    try:
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
            events = read_events(resp)
    finally:
        for _ in range(held):
            holders.release()
    assert events == [("error", {"id": job_id, "code": "too_many_streams", "message": "too many open streams; poll the job"})]
    assert holders.held == 0
