"""Which length of the token map's regression start do the training prompts prefer, read as DFT reads them? One JSON object.

DFT from the regression start (`token_map_init: regression`) shortens the map by 6-11% on the neutral-looks
testbed, and the held-out occupations, which the unshortened start nearly balances, lose
(docs/dft-findings.md). This benchmark asks where the shorter map is the better one, with no training: it
builds one run's untrained start (the same hyper-parameters, `iterations` 0), multiplies the map's write by
each `--scales` factor, and generates every training prompt of the wide set and the held-out occupations at
each `--steps` count (DFT samples at its `steps`, 10 by default; the held-out figures of fairness_dft are at the
service's 20). Each image set is read twice: by the testbed oracle, which the reported figures use, and by
the testbed classifier, whose reading the alignment loss trains on (argmax over the images it finds a
person in, as the loss takes them). A factor below 1 preferred by the classifier's reading but not the
oracle's points at the classifier; one preferred by both at 10 steps but not at 20 points at the sampler.

    python benchmarks/token_map_scale.py --hp JSON [--suffix _NAME] [--scales 0.9 1 1.1] [--steps 10 20]
        [--train-images 64] [--images 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fairness_dft import RUNS, SEEDS, TRAIN_SEED, WIDE, held_out_images, oracle_summary, train  # noqa: E402
from benchmarks.results_io import environment, publish, weights_fingerprint  # noqa: E402

RUN = "neutral_looks_gender_te_lora_wide"  # gender 50/50 on the neutral-looks model, the wide training set


def classifier_female_share(images, classifier) -> float:
    """The classifier's argmax female share among the images it finds a person in, as the alignment loss takes them."""
    from testbed.world import ATTRIBUTES

    pred = classifier.predict(images)
    person = pred.person > 0.5
    if not person.any():
        return 0.0
    chosen = pred.probs["gender"][person].argmax(-1)
    return float((chosen == ATTRIBUTES["gender"].index("female")).float().mean())


def female_shares(images: dict, classifier) -> dict[str, tuple[float, float]]:
    """Occupation -> (the oracle's female share, the classifier's) of its images."""
    oracle = oracle_summary(images, ["gender"])
    return {o: (oracle[o]["shares"]["gender"]["female"], classifier_female_share(x, classifier)) for o, x in images.items()}


def write_parameters(pipe) -> list:
    """The token map's write as the attached LoRA holds it (the embedding layers' lora_embedding_B)."""
    params = []
    for module in pipe.text_encoder.modules():
        for p in getattr(module, "lora_embedding_B", {}).values():
            params.append(p)
    if not params:
        raise RuntimeError("the start holds no embedding LoRA: not a token map")
    return params


def measure(pipe, classifier, scale: float, steps: int, train_images: int, per_seed: int) -> dict:
    """Both readings of the training prompts and the held-out occupations with the write scaled by `scale`."""
    from common.bias import bias
    from testbed.shared_axis import NEUTRAL_LOOK_OCCUPATIONS
    from testbed.world import PROMPT_SETS, TEST_OCCUPATIONS

    lean = {o.name: o.p_female - 0.5 for o in NEUTRAL_LOOK_OCCUPATIONS}

    def gender_bias(female: float) -> float:
        return bias({"female": female, "male": 1.0 - female})

    t0 = time.time()
    rows = female_shares(held_out_images(pipe, None, train_images, PROMPT_SETS[WIDE], (TRAIN_SEED,), steps), classifier)
    held = female_shares(held_out_images(pipe, None, per_seed, TEST_OCCUPATIONS, SEEDS, steps), classifier)

    def summary(shares: dict[str, tuple[float, float]]) -> dict:
        oracle = np.array([s[0] for s in shares.values()])
        clf = np.array([s[1] for s in shares.values()])
        side = np.sign([lean[o] for o in shares])  # +1: the word's data leans female
        return {
            "oracle_bias": round(float(np.mean([gender_bias(p) for p in oracle])), 4),
            "classifier_bias": round(float(np.mean([gender_bias(p) for p in clf])), 4),
            # > 0: what is left of each word's lean (female share past 0.5 on the side the word leans to)
            "oracle_residual_lean": round(float(np.mean(side * (oracle - 0.5))), 4),
            "classifier_residual_lean": round(float(np.mean(side * (clf - 0.5))), 4),
            # > 0: the classifier reads the word's images as leaning further to its side than the oracle does
            "classifier_minus_oracle_towards_lean": round(float(np.mean(side * (clf - oracle))), 4),
        }

    return {
        "scale": scale,
        "steps": steps,
        "training_prompts": summary(rows),
        "held_out": summary(held),
        "held_out_female_share": {o: {"oracle": round(s[0], 4), "classifier": round(s[1], 4)} for o, s in held.items()},
        "seconds": round(time.time() - t0, 1),
    }


def preferred(measured: list[dict], steps: int, where: str, reader: str) -> float:
    """The factor whose residual lean on `where` (as `reader` reads it) is closest to 0, at `steps`."""
    rows = [m for m in measured if m["steps"] == steps]
    return min(rows, key=lambda m: abs(m[where][f"{reader}_residual_lean"]))["scale"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hp", required=True, help="the run's hyper-parameters (JSON), as fairness_dft takes them")
    parser.add_argument("--suffix", default="", help="appended to the key")
    parser.add_argument("--scales", nargs="+", type=float, default=[0.9, 1.0, 1.1])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20])
    parser.add_argument("--train-images", type=int, default=64, help="images per training prompt (one seed)")
    parser.add_argument("--images", type=int, default=256, help="images per held-out occupation (over 4 seeds)")
    args = parser.parse_args()

    import torch

    from adaptors.base import load_adaptor
    from adaptors.classifiers import TestbedAttributeClassifier
    from adaptors.generation import configure_threads, load_pipeline, resolve_model_path

    hp = {**json.loads(args.hp), "iterations": 0}
    with tempfile.TemporaryDirectory() as tmp:
        started = train(RUN, Path(tmp), hp)
        adaptor = load_adaptor(Path(tmp) / RUN)
    configure_threads(1)
    pipe = load_pipeline(RUNS[RUN].base, device="cpu")
    adaptor.attach(pipe)
    adaptor.activate(pipe)
    write = write_parameters(pipe)
    unscaled = [p.detach().clone() for p in write]
    classifier = TestbedAttributeClassifier()
    measured = []
    for steps in args.steps:
        for scale in args.scales:
            with torch.no_grad():
                for p, p0 in zip(write, unscaled, strict=True):
                    p.copy_(p0 * scale)
            measured.append(measure(pipe, classifier, scale, steps, args.train_images, args.images // len(SEEDS)))
    key = f"neutral_looks_gender_start{args.suffix}"
    result = {
        "benchmark": "token_map_scale",
        **environment(1),
        key: {
            "hyperparameters": hp,
            "start_seconds": started["seconds"],
            "base_weights": weights_fingerprint(resolve_model_path(RUNS[RUN].base)),
            "images_per_training_prompt": args.train_images,
            "images_per_held_out_occupation": args.images // len(SEEDS) * len(SEEDS),
            "measured": measured,
            "preferred_scale": {
                f"{where}_{reader}_steps{steps}": preferred(measured, steps, where, reader)
                for steps in args.steps
                for where in ("training_prompts", "held_out")
                for reader in ("oracle", "classifier")
            },
        },
    }
    publish("token_map_scale", result, merge=True)


if __name__ == "__main__":
    main()
