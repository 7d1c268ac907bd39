"""Does a stream of small requests reach the pipeline's batch throughput? One JSON object.

The embedded stack (`fairdiff up`: redis-server, one inference worker, uvicorn) serves `--requests`
requests of 1 and of 4 images from 1, 4 and 16 concurrent HTTP clients, plain and `assign` at gender
50/50, each `POST /v1/generate` with `Prefer: wait` and then downloading its PNGs: images/s over the
run, p50 and p95 latency, where the time went, and the mean batch the worker reports on /metrics.
Each cell is compared with the pipeline called directly in this process (same strategy, one thread
as the worker) just before and just after it, averaged: images/s on a batch of 16 (the worker's
max_batch) and the time of one request alone. Audit off on both sides (serve_overhead.py measures it).
Writes benchmarks/results/stream_throughput.json.

    python benchmarks/stream_throughput.py [--requests 64] [--steps 20] [--repeats 3]

Targets (issue #39): at 16 clients >= 0.75x the direct batch-16 images/s (plain) and >= 0.6x
(`assign`, against direct `assign`); at 1 client p50 <= 1.15x one direct request; at 16 clients
p95 <= 2x the direct batch-16 time + the longest a pass waits for more (4 batching windows).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptors.assign import class_texts_for, generate_assigned, joint_assignment  # noqa: E402
from adaptors.generation import GenerationSpec, configure_threads, generate, load_pipeline  # noqa: E402
from benchmarks.results_io import environment, publish  # noqa: E402
from benchmarks.serve_overhead import _free_port, _start_stack, _wait_ready  # noqa: E402
from common.settings import get_settings  # noqa: E402
from workers.batching import WINDOW_CAP  # noqa: E402

PROMPTS = [f"a photo of the face of a {job}, a person" for job in ("senator", "nurse", "judge", "clerk")]
GENDER = {"gender": {"female": 0.5, "male": 0.5}}
MAX_BATCH = 16


def _direct(pipe, strategy: str, images: int, steps: int, seed: int = 0) -> float:
    """Seconds for one direct call of `images` images (one pass: images <= MAX_BATCH)."""
    settings = get_settings()
    spec = GenerationSpec(PROMPTS[seed % len(PROMPTS)], num_images=images, seed=seed, steps=steps, guidance_scale=5.0)
    t0 = time.perf_counter()
    if strategy == "assign":
        assignment = joint_assignment(images, GENDER, seed)
        generate_assigned(pipe, spec, assignment, class_texts_for("testbed"), mode=settings.assign_mode,
                          guidance_weight=settings.assign_guidance_weight, max_batch=MAX_BATCH)  # fmt: skip
    else:
        generate(pipe, spec, max_batch=MAX_BATCH)
    return time.perf_counter() - t0


def direct_reference(pipe, strategy: str, images: int, steps: int, repeats: int) -> dict[str, float]:
    """The direct pipeline now: seconds for a batch of 16 and for one request of `images` images (medians)."""
    batch = statistics.median(_direct(pipe, strategy, MAX_BATCH, steps, s) for s in range(repeats))
    one = statistics.median(_direct(pipe, strategy, images, steps, s) for s in range(repeats))
    return {"batch16_s": batch, "request_s": one}


def _batch_sizes(client: httpx.Client) -> tuple[float, float]:
    """(passes, images) the worker reported so far, from /metrics."""
    text = client.get("/metrics").text
    count = re.search(r"^fairdiff_batch_size_count (\S+)", text, re.M)
    total = re.search(r"^fairdiff_batch_size_sum (\S+)", text, re.M)
    return (float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0)


def stream(client_url: str, strategy: str, images: int, clients: int, requests: int, steps: int) -> dict[str, float]:
    """`requests` requests of `images` images from `clients` concurrent clients; images/s and latency."""
    latencies: list[float] = []
    worker_s: list[float] = []
    render_s: list[float] = []
    errors: list[str] = []
    left = iter(range(requests))
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(base_url=client_url, timeout=300) as client:
            while True:
                with lock:
                    k = next(left, None)
                if k is None:
                    return
                body = {"prompt": PROMPTS[k % len(PROMPTS)], "num_images": images, "seed": 1000 + k, "steps": steps,
                        "guidance_scale": 5.0, "audit": False, "strategy": strategy}  # fmt: skip
                if strategy == "assign":
                    body["fairness_target"] = GENDER
                t0 = time.perf_counter()
                resp = client.post("/v1/generate", json=body, headers={"Prefer": "wait=120"})
                job = resp.json()
                if resp.status_code != 200 or job.get("state") != "succeeded":
                    errors.append(f"{resp.status_code} {str(job)[:200]}")
                    continue
                for image in job["result"]["images"]:
                    client.get(image["url"]).raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    # where the time went: in the worker (claim to finish, of which rendering), the rest is
                    # queueing, the gateway, HTTP and the client's view of the finish
                    timings = job["result"]["timings"]
                    worker_s.append(timings["total_s"])
                    render_s.append(timings["generate_s"])

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "images_per_s": round(len(latencies) * images / wall, 3),
        "p50_s": round(statistics.median(latencies), 4) if latencies else None,
        "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 4) if latencies else None,
        "wall_s": round(wall, 3),
        "worker_p50_s": round(statistics.median(worker_s), 4) if worker_s else None,
        "render_p50_s": round(statistics.median(render_s), 4) if render_s else None,
        "errors": len(errors),
        **({"first_error": errors[0]} if errors else {}),
    }


def _target(value: float, target: float, met: bool) -> dict[str, float | bool]:
    return {"value": round(value, 4), "target": round(target, 4), "met": bool(met)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    threads = configure_threads(1)  # as the worker `fairdiff up` starts on this machine
    pipe = load_pipeline("testbed", device="cpu")
    for strategy in ("none", "assign"):
        _direct(pipe, strategy, 2, args.steps)  # warm-up
    window_s = get_settings().batch_window_ms / 1000.0
    longest_wait_s = WINDOW_CAP * window_s  # what a pass may wait for more requests, at most
    port = _free_port()
    data = Path(tempfile.mkdtemp(prefix="fairdiff-stream-"))
    proc = _start_stack(port, data, data / "up.log")
    served: dict[str, dict] = {}
    direct: dict[str, dict] = {}
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=300) as client:
            _wait_ready(client, proc)
            stream(url, "none", 1, 2, 4, args.steps)  # warm-up
            for strategy in ("none", "assign"):
                for images in args.images:
                    for clients in args.clients:
                        name = f"{strategy}/{images}img/{clients}c"
                        # the machine is shared and its load moves: each cell is compared with the direct pipeline
                        # measured just before and just after it (the stack idle meanwhile), averaged
                        ref = direct_reference(pipe, strategy, images, args.steps, args.repeats)
                        before = _batch_sizes(client)
                        cell = stream(url, strategy, images, clients, args.requests, args.steps)
                        after = _batch_sizes(client)
                        ref2 = direct_reference(pipe, strategy, images, args.steps, args.repeats)
                        passes = after[0] - before[0]
                        cell["mean_batch_images"] = round((after[1] - before[1]) / passes, 2) if passes else None
                        served[name] = cell
                        direct[name] = {k: round((ref[k] + ref2[k]) / 2, 4) for k in ref}
                        direct[name]["batch16_images_per_s"] = round(MAX_BATCH / direct[name]["batch16_s"], 3)
                        print(name, cell, direct[name], file=sys.stderr, flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)

    targets: dict[str, dict] = {}
    top = max(args.clients)
    for strategy, floor in (("none", 0.75), ("assign", 0.6)):
        for images in args.images:
            key = f"{strategy}/{images}img"
            hi, lo = served.get(f"{key}/{top}c"), served.get(f"{key}/1c")
            if hi:
                d = direct[f"{key}/{top}c"]
                ratio = hi["images_per_s"] / d["batch16_images_per_s"]
                targets[f"{key} throughput at {top} clients / direct batch-16"] = _target(ratio, floor, ratio >= floor)
                bound = 2 * d["batch16_s"] + longest_wait_s
                entry = _target(hi["p95_s"], bound, hi["p95_s"] <= bound)
                # Little's law: `top` clients keep top x images in flight, served at most at the direct batch rate
                entry["floor_at_direct_rate_s"] = round(top * images / d["batch16_images_per_s"], 4)
                targets[f"{key} p95 at {top} clients (s)"] = entry
            if lo:
                ratio = lo["p50_s"] / direct[f"{key}/1c"]["request_s"]
                targets[f"{key} p50 at 1 client / direct request"] = _target(ratio, 1.15, ratio <= 1.15)
    result = {
        "benchmark": "stream_throughput",
        "sizes": {
            "requests_per_cell": args.requests,
            "clients": args.clients,
            "images_per_request": args.images,
            "steps": args.steps,
            "max_batch": MAX_BATCH,
            "batch_window_ms": window_s * 1000,
            "longest_batch_wait_ms": longest_wait_s * 1000,
            "direct_repeats": args.repeats,
            "audit": False,
        },  # fmt: skip
        "direct": direct,
        "served": served,
        "targets": targets,
        "targets_met": sum(t["met"] for t in targets.values()),
        "targets_total": len(targets),
        **environment(threads),
    }
    publish("stream_throughput", result)


if __name__ == "__main__":
    main()
