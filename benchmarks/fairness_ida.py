"""IDA guidance on the testbed: do calibrated weights deliver the target on fresh seeds? One JSON object.

For each target, the `ida` trainer calibrates weights for each held-out occupation's prompt (new
noise every iteration); then `--images` images per occupation on held-out seeds (never used in
calibration) are generated with and without the weights and read by the independent oracle:
KL to the target, bias, occupation kept, and the time per image relative to no guidance. The
gender targets are also calibrated by the policy-gradient baseline on the same image budget.

    python benchmarks/fairness_ida.py [--targets gender_50_50 ...] [--images 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptors.assign import generate_directed  # noqa: E402
from adaptors.classifiers import TestbedAttributeClassifier  # noqa: E402
from adaptors.generation import GenerationSpec, configure_threads, generate, load_pipeline  # noqa: E402
from adaptors.loading import load_adaptor  # noqa: E402
from adaptors.trainers import get_trainer  # noqa: E402
from benchmarks.results_io import environment, publish  # noqa: E402
from common.bias import bias, frequencies, kl_divergence  # noqa: E402
from common.schemas import FinetuneJob  # noqa: E402
from testbed.oracle import read_batch  # noqa: E402
from testbed.world import ATTRIBUTES, TEST_OCCUPATIONS, prompt_for  # noqa: E402

TARGETS = {
    "gender_50_50": {"gender": {"female": 0.5, "male": 0.5}},
    "gender_30_70": {"gender": {"female": 0.3, "male": 0.7}},
    "skin_tone_uniform": {"skin_tone": {c: 0.25 for c in ATTRIBUTES["skin_tone"]}},
    "age_75_25": {"age": {"young": 0.75, "old": 0.25}},
}
BASELINE_FOR = ("gender_50_50", "gender_30_70")
HELD_OUT_SEED = 90_000


def oracle_row(images, occupation: str, target: dict) -> dict:
    readings = read_batch(images.numpy() * 2 - 1)
    people = [r for r in readings if r.person]
    out = {"occupation_kept": round(sum(r.occupation == occupation for r in readings) / len(readings), 4)}
    for attr in target:
        shares = frequencies([getattr(r, attr) for r in people], ATTRIBUTES[attr])
        out[attr] = {"shares": {c: round(v, 4) for c, v in shares.items()}, "bias": round(bias(shares), 4),
                     "kl": round(kl_divergence(shares, target[attr]), 5)}  # fmt: skip
    out["kl"] = round(sum(out[a]["kl"] for a in target), 5)
    return out


def run(pipe, classifier, name: str, solver: str, hp: dict, images: int, store: Path) -> dict:
    target = TARGETS[name]
    prompts = [prompt_for(o) for o in TEST_OCCUPATIONS]
    job = FinetuneJob(method="ida", base_model="testbed", fairness_target=target, prompts=prompts,
                      hyperparameters={**hp, "solver": solver}, name=f"{name}-{solver}")  # fmt: skip
    t0 = time.time()
    folder = store / f"{name}-{solver}"
    manifest = get_trainer("ida")(job, pipe, classifier, folder, store / "ckpt", lambda p: None, lambda: False)
    seconds = time.time() - t0
    adaptor = load_adaptor(store / f"{name}-{solver}")
    rows, timing = {}, {"plain": 0.0, "guided": 0.0}
    for occ, prompt in zip(TEST_OCCUPATIONS, prompts):
        spec = GenerationSpec(prompt, num_images=images, seed=HELD_OUT_SEED, steps=hp["steps"], guidance_scale=5.0)
        t = time.perf_counter()
        plain = generate(pipe, spec, max_batch=64)
        timing["plain"] += time.perf_counter() - t
        t = time.perf_counter()
        guided = generate_directed(pipe, spec, [adaptor.directions(prompt)] * images, adaptor.warmup_steps, max_batch=64)
        timing["guided"] += time.perf_counter() - t
        per = manifest.metrics["per_prompt"][prompt]
        rows[occ] = {"before": oracle_row(plain, occ, target), "after": oracle_row(guided, occ, target),
                     "iterations": per["iterations"], "calibration_kl_curve": per["kl_curve"],
                     "weights": per["weights"]}  # fmt: skip
    n = len(rows)
    return {
        "kl_before": round(sum(r["before"]["kl"] for r in rows.values()) / n, 5),
        "kl_after": round(sum(r["after"]["kl"] for r in rows.values()) / n, 5),
        "max_kl_after": max(r["after"]["kl"] for r in rows.values()),
        "bias_before": {a: round(sum(r["before"][a]["bias"] for r in rows.values()) / n, 4) for a in target},
        "bias_after": {a: round(sum(r["after"][a]["bias"] for r in rows.values()) / n, 4) for a in target},
        "occupation_kept": min(r["after"]["occupation_kept"] for r in rows.values()),
        "iterations_mean": round(sum(r["iterations"] for r in rows.values()) / n, 2),
        "calibration_seconds": round(seconds, 1),
        "calibration_images": manifest.metrics["images_generated"],
        "cost_per_image_vs_plain": round(timing["guided"] / timing["plain"], 3),
        "per_occupation": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--images", type=int, default=64, help="held-out-seed images per occupation")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps the weights are calibrated for")
    parser.add_argument("--per-iteration", type=int, default=64, help="fresh images per calibration iteration")
    parser.add_argument("--iterations", type=int, default=6)
    args = parser.parse_args()
    threads = configure_threads(1)
    pipe = load_pipeline("testbed", device="cpu")
    classifier = TestbedAttributeClassifier()
    hp = {"steps": args.steps, "images_per_iteration": args.per_iteration, "max_iterations": args.iterations,
          "kl_threshold": 0.005, "eval_images": 16}  # fmt: skip
    result: dict = {"benchmark": "fairness_ida", "held_out_images_per_occupation": args.images, "calibration": hp}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.targets:
            for solver in ("ida", "policy_gradient") if name in BASELINE_FOR else ("ida",):
                out = run(pipe, classifier, name, solver, hp, args.images, Path(tmp))
                prefix = name if solver == "ida" else f"{name}_policy_gradient"
                for key, value in out.items():
                    result[f"{prefix}_{key}"] = value
                print(f"{prefix}: KL {out['kl_before']} -> {out['kl_after']}, occupation kept {out['occupation_kept']}, "
                      f"{out['calibration_seconds']} s", file=sys.stderr)  # fmt: skip
    result.update(environment(threads))
    publish("fairness_ida", result)


if __name__ == "__main__":
    main()
