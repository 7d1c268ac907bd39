"""Webhooks: a signed POST to a local receiver when a job finishes, retries then giving up, the SSRF guard, and the
chosen events. The gateway's dispatcher runs in the TestClient's event loop; a thread plays the worker."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from common.jobs import JobStore
from common.schemas import JobState, ModelInfo
from common.settings import Settings
from service.app import create_app
from service.webhooks import verify
from tests.service.helpers import assert_error, gen

SECRET = "whsec_" + base64.b64encode(b"fairdiff-test-webhook-secret-32b").decode()


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers `status`."""

    def __init__(self, status: int = 204) -> None:
        self.status = status
        self.calls: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?k=1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.calls) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.calls) >= n, f"{len(self.calls)} calls, wanted {n}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture
def hooked(settings: Settings, store: JobStore, testbed_info: ModelInfo) -> Iterator[TestClient]:
    """A gateway that sends webhooks, to loopback too (the receiver's address), retrying fast."""
    store.publish_model(testbed_info)
    hook_settings = settings.model_copy(update={"webhook_secret": SECRET, "webhook_allow_private": True,
                                                "webhook_retry_base_s": 0.05, "webhook_max_attempts": 3})  # fmt: skip
    with TestClient(create_app(hook_settings)) as c:
        yield c


def finish(store: JobStore, job_id: str, state: JobState = JobState.succeeded) -> None:
    store.mark_running(job_id, "test-worker")
    store.finish(job_id, state, result={"images": [{"url": f"/v1/jobs/{job_id}/images/0.png", "seed_index": 0}]})


def wait_state(client: TestClient, url: str, state: str, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        hook = client.get(url, headers=headers or {}).json().get("webhook") or {}
        if hook.get("state") == state:
            return hook
        time.sleep(0.05)
    raise AssertionError(f"webhook never reached {state!r}: {hook}")


def test_a_finished_job_is_posted_once_signed_to_the_receiver(hooked: TestClient, store: JobStore, receiver: Receiver) -> None:
    job_id = gen(hooked, webhook=receiver.url).json()["id"]
    assert hooked.get(f"/v1/jobs/{job_id}").json()["webhook"] == {"state": "pending", "attempts": 0}
    store.add_ready_image(job_id, {"index": 0, "seed": 0, "assigned": None, "url": f"/v1/jobs/{job_id}/images/0.png"})
    finish(store, job_id)
    receiver.wait(1)
    headers, body = receiver.calls[0]
    assert verify(SECRET, headers, body)
    assert not verify(SECRET, headers, body.replace(b"succeeded", b"failed"))
    payload = json.loads(body)
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job_id
    assert payload["data"]["result"]["images"][0]["seed_index"] == 0 and "owner" not in payload["data"]
    assert "images_ready" not in payload["data"]  # the event stream's record; the result has every image
    assert payload["data"]["url"] == f"/v1/jobs/{job_id}"
    assert wait_state(hooked, f"/v1/jobs/{job_id}", "delivered") == {"state": "delivered", "attempts": 1, "last_status": 204}
    time.sleep(0.5)
    assert len(receiver.calls) == 1


def test_a_failing_receiver_is_retried_then_given_up(hooked: TestClient, store: JobStore, receiver: Receiver) -> None:
    receiver.status = 500
    job_id = gen(hooked, webhook=receiver.url).json()["id"]
    finish(store, job_id, JobState.failed)
    receiver.wait(3)
    hook = wait_state(hooked, f"/v1/jobs/{job_id}", "failed")
    assert hook["attempts"] == 3 and hook["last_status"] == 500
    time.sleep(0.5)
    assert len(receiver.calls) == 3
    ids = {h["webhook-id"] for h, _ in receiver.calls}
    assert len(ids) == 1, "retries of one delivery share its id"
    assert all(verify(SECRET, h, b) and json.loads(b)["type"] == "job.failed" for h, b in receiver.calls)


def test_only_the_chosen_events_call_the_webhook(hooked: TestClient, store: JobStore, receiver: Receiver) -> None:
    job_id = gen(hooked, webhook=receiver.url, webhook_events=["failed"]).json()["id"]
    hooked.delete(f"/v1/jobs/{job_id}")  # cancelled: not a chosen event
    assert wait_state(hooked, f"/v1/jobs/{job_id}", "skipped")["attempts"] == 0
    assert receiver.calls == []


def test_a_finetune_calls_its_webhook(hooked: TestClient, store: JobStore, receiver: Receiver, admin) -> None:
    body = {"method": "prefix", "prompt_set": "testbed-train", "fairness_target": {"gender": {"female": 0.5, "male": 0.5}},
            "webhook": receiver.url}  # fmt: skip
    job_id = hooked.post("/v1/admin/finetunes", json=body, headers=admin).json()["id"]
    finish(store, job_id)
    receiver.wait(1)
    payload = json.loads(receiver.calls[0][1])
    assert payload["data"]["kind"] == "finetune" and payload["data"]["url"] == f"/v1/admin/finetunes/{job_id}"


def test_private_addresses_other_schemes_and_unlisted_hosts_are_refused(
    settings: Settings, store: JobStore, testbed_info
) -> None:
    store.publish_model(testbed_info)
    with TestClient(create_app(settings.model_copy(update={"webhook_secret": SECRET}))) as c:
        for url in ("http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.1.2.3/x", "http://[::1]/x",
                    "http://169.254.169.254/latest/meta-data"):  # fmt: skip
            assert_error(gen(c, webhook=url), 422, "webhook", "webhook_private_address")
        assert_error(gen(c, webhook="ftp://example.com/x"), 422, "webhook", "webhook_scheme")
        assert_error(gen(c, webhook="file:///etc/passwd"), 422, "webhook", "webhook_scheme")
        assert_error(gen(c, webhook="http://user:pw@example.com/x"), 422, "webhook", "invalid_webhook_url")
    listed = settings.model_copy(update={"webhook_secret": SECRET, "webhook_allowed_hosts": "hooks.example.com"})
    with TestClient(create_app(listed)) as c:
        assert_error(gen(c, webhook="https://other.example.com/x"), 422, "webhook", "webhook_host_not_allowed")


def test_without_a_secret_webhooks_are_refused(client: TestClient) -> None:
    assert_error(gen(client, webhook="https://example.com/hook"), 422, "webhook", "webhooks_disabled")
    assert_error(gen(client, webhook="https://example.com/hook", webhook_events=["done"]), 422, "webhook_events.0")
