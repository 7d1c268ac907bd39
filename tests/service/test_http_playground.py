"""The playground's endpoints through real processes (uvicorn, a Celery inference worker, redis-server): Server-Sent
Events of a real job to its end, inline images in each format, the OpenAI client library, and the page in a real
browser (Debian's chromium driven by Playwright: under CI installed when missing and never skipped; elsewhere
skipped without them)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.images import read_metadata
from tests.support.browser import find_chromium, in_ci, install_chromium
from tests.support.processes import (
    ManagedProcess,
    dump_logs,
    fairdiff_env,
    free_port,
    start_gateway,
    start_redis,
    start_worker,
    wait_worker_alive,
)

pytestmark = pytest.mark.integration

SENATOR = "a photo of the face of a senator, a person"
BALANCED = {"gender": {"female": 0.5, "male": 0.5}}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    logs = tmp_path_factory.mktemp("playground-logs")
    procs: list[ManagedProcess] = []
    redis_proc = start_redis(free_port(), tmp_path_factory.mktemp("playground-redis"))
    procs.append(redis_proc)
    env = fairdiff_env(redis_proc.info["url"], tmp_path_factory.mktemp("playground-data"), "testbed",
                       admin_token="playground-admin-secret", max_batch="16")  # fmt: skip
    try:
        worker = start_worker("inference", env, logs)
        procs.append(worker)
        wait_worker_alive(worker, redis_proc.info["url"], timeout=120)
        gateway = start_gateway(env, logs)
        procs.append(gateway)
        with httpx.Client(base_url=gateway.info["url"], timeout=60) as client:
            yield {"client": client, "url": gateway.info["url"], "procs": procs}
    except Exception:
        dump_logs(procs)
        raise
    finally:
        for p in reversed(procs):
            p.stop()


def sse_events(client: httpx.Client, path: str) -> list[tuple[str, dict]]:
    events, kind, data = [], "message", []
    with client.stream("GET", path, headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
            elif not line and data:
                events.append((kind, json.loads("\n".join(data))))
                kind, data = "message", []
    return events


def test_the_event_stream_follows_a_real_job_step_by_step_to_its_result(stack) -> None:
    client = stack["client"]
    accepted = client.post(
        "/v1/generate", json={"prompt": SENATOR, "num_images": 8, "steps": 40, "seed": 4, "fairness_target": BALANCED}
    )
    assert accepted.status_code == 202, accepted.text
    events = sse_events(client, accepted.json()["url"] + "/events")
    kinds = [k for k, _ in events]
    assert kinds[0] == "state" and kinds[-1] == "done" and kinds.count("done") == 1
    states = [d["state"] for k, d in events if k == "state"]
    assert "running" in states and states == sorted(states, key=["queued", "running", "succeeded"].index)
    steps = [d["progress"]["step"] for k, d in events if k == "progress" and d.get("progress")]
    assert len(steps) >= 3 and steps == sorted(steps), steps
    done = events[-1][1]
    assert done["state"] == "succeeded" and len(done["result"]["images"]) == 8
    assert done == client.get(accepted.json()["url"]).json()
    assert done["result"]["images"][0]["attributes"]["gender"]["class"] in ("female", "male")
    # one `image` event per image, after the last step and before `done`, naming what the result then confirms
    images = [d for k, d in events if k == "image"]
    assert [d["index"] for d in images] == list(range(8)), kinds
    assert kinds.index("image") > max(i for i, k in enumerate(kinds) if k == "progress")
    for event, final in zip(images, done["result"]["images"], strict=True):
        assert (event["seed"], event["seed_index"], event["url"]) == (4, final["seed_index"], final["url"])
        assert event["assigned"] == final["assigned"] and event["assigned"]["gender"] in ("female", "male")
    png = client.get(images[5]["url"])
    assert png.status_code == 200 and read_metadata(png.content)["seed_index"] == 5


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_b64_json_images_of_a_real_job_decode_and_carry_their_audit(stack, fmt: str) -> None:
    client = stack["client"]
    body = {"prompt": SENATOR, "num_images": 4, "seed": 9, "fairness_target": BALANCED, "response_format": "b64_json",
            "output_format": fmt}  # fmt: skip
    resp = client.post("/v1/generate", json=body, headers={"Prefer": "wait=60"})
    assert resp.status_code == 200, resp.text
    for k, image in enumerate(resp.json()["result"]["images"]):
        data = base64.b64decode(image["b64_json"])
        assert Image.open(io.BytesIO(data)).format == {"webp": "WEBP", "jpeg": "JPEG"}[fmt]
        meta = read_metadata(data)
        assert meta["seed"] == 9 and meta["seed_index"] == k and meta["prompt"] == SENATOR
        assert meta["assigned"] == image["assigned"]
        assert meta["audited"] == {attr: r["class"] for attr, r in image["attributes"].items()}


def test_the_openai_client_library_against_the_real_stack(stack) -> None:
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=stack["url"] + "/v1", api_key="unused", max_retries=0, timeout=90)
    out = oa.images.generate(prompt=SENATOR, n=4, response_format="b64_json", extra_body={"fairness_target": BALANCED, "seed": 2})
    assert len(out.data) == 4 and Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).size == (32, 32)
    fairdiff = out.model_extra["fairdiff"]
    assert fairdiff["guarantee"] == "exact" and fairdiff["assigned_counts"]["gender"] == {"female": 2, "male": 2}
    out = oa.images.generate(prompt=SENATOR, n=2, size="32x32", response_format="url")
    png = httpx.get(out.data[1].url)
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium: found, or under CI installed with apt-get; a CI run without one fails instead of skipping."""
    path = find_chromium()
    if path is None and in_ci():
        try:
            path = install_chromium()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            pytest.fail(f"CI runs the browser test and could not get chromium: {exc}")
    if path is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium); CI installs it itself")
    return path


def test_the_playground_in_a_browser_generates_and_charts_what_was_delivered(chromium: str, stack, tmp_path: Path) -> None:
    try:
        from playwright import sync_api
    except ImportError:
        if in_ci():
            raise  # a dev dependency: CI that lacks it is broken, not excused
        pytest.skip("needs playwright (pip install -e '.[dev]')")
    shots = Path(os.environ.get("FAIRDIFF_SCREENSHOT_DIR") or tmp_path)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1300})
            failed: list[str] = []
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto(stack["url"] + "/playground")
            female = page.locator('#target [data-attribute="gender"] input[data-class="female"]')
            female.fill("0.25")
            female.dispatch_event("change")
            assert page.locator('#target [data-attribute="gender"] input[data-class="male"]').input_value() == "0.750"
            page.fill("#num", "8")
            page.fill("#seed", "5")
            page.select_option("#enforce", "true")
            page.check("#baseline")
            page.evaluate("""() => { window.arrived = 0; new MutationObserver((changes) => { for (const c of changes)
                for (const n of c.addedNodes) if (n.classList && n.classList.contains('arriving')) window.arrived++; })
                .observe(document.getElementById('grid'), { childList: true }); }""")
            page.click("#go")
            # images show as their `image` events arrive (dashed, `.arriving`), then the audited result replaces them
            done = "#grid figure.img:not(.arriving) img[src]"
            page.wait_for_selector(done, timeout=90_000)
            page.wait_for_function(f"document.querySelectorAll('{done}').length === 8", timeout=30_000)
            page.screenshot(path=str(shots / "playground.png"), full_page=True)
            assert page.evaluate("window.arrived") == 8, "each image was shown as its `image` event arrived"
            job_id = page.locator("#summary h2").inner_text().split()[-1]
            job = stack["client"].get(f"/v1/jobs/{job_id}").json()
            counts = job["result"]["counts"]["gender"]
            for cls in ("female", "male"):
                shown = page.locator(f'#charts [data-attribute="gender"] text.count[data-class="{cls}"]').text_content()
                assert shown == f"n={counts.get(cls, 0)}"
            delivered = page.locator('#charts [data-attribute="gender"] rect.bar-delivered[data-class="female"]')
            assert float(delivered.get_attribute("data-value")) == pytest.approx(job["result"]["realised"]["gender"]["female"])
            assert "exact" in page.locator("#summary").inner_text()
            # the base model's run (strategy none, same prompt and seed) adds a bar per class of every attribute
            base_bars = page.locator('#charts [data-attribute="age"] rect.bar-base')
            base_bars.first.wait_for(timeout=60_000)
            assert base_bars.count() == 2
            page.screenshot(path=str(shots / "playground.png"), full_page=True)
            page.click('button[data-tab="adaptors"]')
            page.wait_for_selector("#adaptors-empty:not([hidden]), #adaptors tbody tr", timeout=10_000)
            page.screenshot(path=str(shots / "playground-adaptors.png"))
            assert not failed, failed
        finally:
            browser.close()
