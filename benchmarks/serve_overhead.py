"""What does the service add over calling the pipeline directly? One JSON object.

Starts the embedded stack (`fairdiff up`: redis-server, Celery workers, uvicorn) on a free port,
then times the same batch (same prompt, seeds, steps) through `POST /v1/generate` with
`Prefer: wait` plus downloading every PNG, against `adaptors.generation.generate` in this
process, interleaved. Both sides use the same thread count. Writes benchmarks/results/serve_overhead.json.

    python benchmarks/serve_overhead.py [--images 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptors.audit import audit  # noqa: E402
from adaptors.classifiers import TestbedAttributeClassifier  # noqa: E402
from adaptors.generation import GenerationSpec, configure_threads, generate, load_pipeline  # noqa: E402
from benchmarks.results_io import environment, publish  # noqa: E402

PROMPT = "a photo of the face of a senator, a person"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_stack(port: int, data: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "FAIRDIFF_DATA_DIR": str(data), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "workers.cli", "up", "--port", str(port)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(client: httpx.Client, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("fairdiff up exited early")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("stack not ready")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads = configure_threads(0)
    port = _free_port()
    data = Path(tempfile.mkdtemp(prefix="fairdiff-bench-"))
    proc = _start_stack(port, data, data / "up.log")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            _wait_ready(client, proc)
            pipe = load_pipeline("testbed", device="cpu")
            classifier = TestbedAttributeClassifier()
            body = {"prompt": PROMPT, "num_images": args.images, "seed": 42, "steps": args.steps, "guidance_scale": 5.0}
            spec = GenerationSpec(PROMPT, num_images=args.images, seed=42, steps=args.steps, guidance_scale=5.0)

            def via_api(with_audit: bool) -> float:
                t0 = time.perf_counter()
                resp = client.post("/v1/generate", json={**body, "audit": with_audit}, headers={"Prefer": "wait=120"})
                job = resp.json()
                assert resp.status_code == 200 and job["state"] == "succeeded", job
                for image in job["result"]["images"]:
                    assert client.get(image["url"]).status_code == 200
                return time.perf_counter() - t0

            def direct(with_audit: bool) -> float:
                t0 = time.perf_counter()
                images = generate(pipe, spec, max_batch=16)
                if with_audit:
                    audit(classifier, images)
                return time.perf_counter() - t0

            via_api(False), direct(False)  # warm-up both paths
            samples: dict[str, list[float]] = {"api": [], "direct": [], "api_audit": [], "direct_audit": []}
            for _ in range(args.repeats):
                samples["api"].append(via_api(False))
                samples["direct"].append(direct(False))
                samples["api_audit"].append(via_api(True))
                samples["direct_audit"].append(direct(True))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)

    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "benchmark": "serve_overhead",
        "images": args.images,
        "steps": args.steps,
        "ratio": round(med["api"] / med["direct"], 4),
        "ratio_with_audit": round(med["api_audit"] / med["direct_audit"], 4),
        "api_s": round(med["api"], 4),
        "direct_s": round(med["direct"], 4),
        "api_audit_s": round(med["api_audit"], 4),
        "direct_audit_s": round(med["direct_audit"], 4),
        "overhead_s": round(med["api"] - med["direct"], 4),
        "samples": {k: [round(x, 4) for x in v] for k, v in samples.items()},
        "repeats": args.repeats,
        **environment(threads),
    }
    publish("serve_overhead", result)


if __name__ == "__main__":
    main()
