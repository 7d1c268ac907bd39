"""What does switching fairness adaptors cost, next to one generation? One JSON object.

Two LoRA adaptors (text encoder + UNet) and two prefix-token adaptors are published to a
temporary store; the inference worker's AdaptorCache then switches between the cached ones.
For comparison, diffusers' own load_lora_weights + unload_lora_weights of the same file.
Writes benchmarks/results/adaptor_switch.json.

    python benchmarks/adaptor_switch.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peft import LoraConfig  # noqa: E402

from adaptors.cache import AdaptorCache  # noqa: E402
from adaptors.generation import GenerationSpec, configure_threads, generate, load_pipeline  # noqa: E402
from adaptors.lora import lora_from_pipe  # noqa: E402
from adaptors.prefix import PREFIX_KEY, PrefixAdaptor, init_prefix  # noqa: E402
from adaptors.store import AdaptorStore  # noqa: E402
from benchmarks.results_io import environment, publish  # noqa: E402
from common.adaptor_manifest import AdaptorManifest, now_iso  # noqa: E402

REPEATS = 50
PROMPT = "a photo of the face of a senator, a person"


def _manifest(adaptor_id: str, kind: str) -> AdaptorManifest:
    return AdaptorManifest(
        id=adaptor_id, kind=kind, base_model="testbed", attributes=["gender"],
        target={"gender": {"female": 0.5, "male": 0.5}}, metrics={}, files={}, size_bytes=0, created=now_iso(),
        hyperparameters={}, prompt_set=None, sampler={}, name=adaptor_id,
    )  # fmt: skip


def _publish_lora(store: AdaptorStore, adaptor_id: str, seed: int) -> Path:
    maker = load_pipeline("testbed", device="cpu")
    torch.manual_seed(seed)
    maker.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # fmt: skip
    maker.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                              target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))  # fmt: skip
    for model in (maker.unet, maker.text_encoder):
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    staging = store.staging_dir(adaptor_id)
    lora_from_pipe(maker, _manifest(adaptor_id, "lora")).save(staging)
    store.publish(staging)
    return store.path(adaptor_id)


def _publish_prefix(store: AdaptorStore, pipe, adaptor_id: str, seed: int) -> None:
    adaptor = PrefixAdaptor(_manifest(adaptor_id, "prefix_tokens"), {PREFIX_KEY: init_prefix(pipe, seed=seed, scale=1.0)})
    staging = store.staging_dir(adaptor_id)
    adaptor.save(staging)
    store.publish(staging)


def _timed(fn, repeats: int = REPEATS) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    threads = configure_threads(0)
    pipe = load_pipeline("testbed", device="cpu")
    root = Path(tempfile.mkdtemp(prefix="fairdiff-bench-store-"))
    store = AdaptorStore(root)
    lora_a = _publish_lora(store, "lora-a", 1)
    _publish_lora(store, "lora-b", 2)
    _publish_prefix(store, pipe, "prefix-a", 3)
    _publish_prefix(store, pipe, "prefix-b", 4)
    cache = AdaptorCache(pipe, store, max_bytes=64 * 1024 * 1024, base_model="testbed")

    spec = GenerationSpec(PROMPT, num_images=1, seed=0, steps=20, guidance_scale=5.0)
    generate(pipe, spec)  # warm-up
    generation = statistics.median(_timed(lambda: generate(pipe, spec), 10))

    for adaptor_id in ("lora-a", "lora-b", "prefix-a", "prefix-b"):
        cache.use(adaptor_id)  # first use: read, verify, attach
    state = {"i": 0}

    def switch_between(a: str, b: str):
        def step() -> None:
            state["i"] += 1
            cache.use(a if state["i"] % 2 else b)

        return step

    lora_switch = _timed(switch_between("lora-a", "lora-b"))
    prefix_switch = _timed(switch_between("prefix-a", "prefix-b"))
    cache.use(None)
    cache.clear()

    def load_unload() -> None:
        pipe.load_lora_weights(str(lora_a), adapter_name="bench")
        pipe.unload_lora_weights()

    load_unload()  # warm-up
    load_unload_s = statistics.median(_timed(load_unload, 10))
    switch_s = statistics.median(lora_switch)
    result = {
        "benchmark": "adaptor_switch",
        "switch_s": round(switch_s, 6),
        "switch_p95_s": round(sorted(lora_switch)[int(0.95 * len(lora_switch)) - 1], 6),
        "prefix_switch_s": round(statistics.median(prefix_switch), 6),
        "load_unload_s": round(load_unload_s, 6),
        "generation_s": round(generation, 5),
        "switch_share": round(switch_s / generation, 5),
        "prefix_switch_share": round(statistics.median(prefix_switch) / generation, 5),
        "load_unload_share": round(load_unload_s / generation, 5),
        "cache_stats": cache.stats(),
        "generation": {"images": 1, "steps": spec.steps, "guidance_scale": spec.guidance_scale, "size": "32x32"},
        "repeats": REPEATS,
        **environment(threads),
    }
    publish("adaptor_switch", result)


if __name__ == "__main__":
    main()
