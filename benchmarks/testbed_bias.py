"""How biased is the testbed model, and how recognisable are its images? One JSON object.

Generates N images per occupation at guidance 1 and at the default guidance scale, reads them
with the independent oracle, and compares generated class shares with the data table.
Writes benchmarks/results/testbed_bias.json.

    python benchmarks/testbed_bias.py [--images 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptors.audit import classify  # noqa: E402
from adaptors.classifiers import TestbedAttributeClassifier  # noqa: E402
from adaptors.generation import GenerationSpec, generate, load_pipeline  # noqa: E402
from benchmarks.results_io import environment, publish  # noqa: E402
from common.bias import bias, frequencies  # noqa: E402
from common.settings import TESTBED, Settings  # noqa: E402
from testbed.data import render_balanced  # noqa: E402
from testbed.oracle import read_batch  # noqa: E402
from testbed.world import ATTRIBUTES, OCCUPATIONS, TEST_OCCUPATIONS, prompt_for  # noqa: E402


def _shares(readings, attr: str) -> dict[str, float]:
    return {k: round(v, 4) for k, v in frequencies([getattr(r, attr) for r in readings], ATTRIBUTES[attr]).items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256, help="images per occupation and guidance scale")
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()
    settings = Settings()
    pipe = load_pipeline(TESTBED, device="cpu")
    classifier = TestbedAttributeClassifier()
    scales = {"guidance_1": 1.0, "guidance_default": settings.default_guidance_scale}

    per_occupation: dict[str, dict] = {}
    agreement = {a: [] for a in ATTRIBUTES}
    person_agreement: list[bool] = []
    recognisable: list[bool] = []
    timed_images, timed_seconds = 0, 0.0
    for occ in OCCUPATIONS:
        row: dict = {"split": "test" if occ.name in TEST_OCCUPATIONS else "train", "data": occ.shares()}
        for key, scale in scales.items():
            spec = GenerationSpec(prompt=prompt_for(occ.name), num_images=args.images, seed=args.seed,
                                  steps=settings.default_steps, guidance_scale=scale)  # fmt: skip
            t0 = time.perf_counter()
            images = generate(pipe, spec, max_batch=64)
            if key == "guidance_default":
                timed_seconds += time.perf_counter() - t0
                timed_images += len(images)
            readings = read_batch(images.numpy() * 2 - 1)
            row[key] = {a: _shares(readings, a) for a in ATTRIBUTES}
            row[key]["recognisable"] = round(float(np.mean([r.person and r.occupation == occ.name for r in readings])), 4)
            if key == "guidance_default":
                recognisable += [r.person and r.occupation == occ.name for r in readings]
                for r, c in zip(readings, classify(classifier, images), strict=True):
                    person_agreement.append(r.person == c.person)
                    if r.person and c.person:
                        for a in ATTRIBUTES:
                            agreement[a].append(getattr(r, a) == c.attributes[a]["class"])
        per_occupation[occ.name] = row
        print(f"{occ.name:10s} female data {occ.p_female:.2f} gs1 {row['guidance_1']['gender']['female']:.2f} "
              f"default {row['guidance_default']['gender']['female']:.2f}", file=sys.stderr)  # fmt: skip

    def mean_bias(key: str) -> dict[str, float]:
        return {a: round(float(np.mean([bias(per_occupation[n][key][a]) for n in TEST_OCCUPATIONS])), 4) for a in ATTRIBUTES}

    x, labels = render_balanced(2000, seed=99)
    oracle = read_batch(x)
    pred = classifier.predict((torch.from_numpy(x) + 1) / 2)
    accuracy = {
        "oracle": {a: round(float(np.mean([getattr(r, a) == ATTRIBUTES[a][lab[j]] for r, lab in zip(oracle, labels)])), 4)
                   for j, a in enumerate(ATTRIBUTES, start=1)},
        "classifier": {a: round(float((pred.probs[a].argmax(-1).numpy() == labels[:, j]).mean()), 4)
                       for j, a in enumerate(ATTRIBUTES, start=1)},
    }  # fmt: skip
    training = json.loads((ROOT / "testbed" / "weights" / "training_log.json").read_text())
    result = {
        "benchmark": "testbed_bias",
        "images_per_occupation": args.images,
        "steps": settings.default_steps,
        "guidance_default": settings.default_guidance_scale,
        "mean_bias": mean_bias("guidance_default"),
        "mean_bias_guidance_1": mean_bias("guidance_1"),
        "mean_bias_data": {
            a: round(float(np.mean([bias(OCCUPATIONS_BY[n].shares()[a]) for n in TEST_OCCUPATIONS])), 4) for a in ATTRIBUTES
        },
        "recognisable": round(float(np.mean(recognisable)), 4),
        "seconds_per_image": round(timed_seconds / timed_images, 5),
        "oracle_classifier_agreement_on_generated": {
            "person": round(float(np.mean(person_agreement)), 4),
            **{a: round(float(np.mean(v)), 4) for a, v in agreement.items()},
        },
        "accuracy_on_renderer_images": accuracy,
        "training_wall_seconds": training.get("wall_seconds"),
        "per_occupation": per_occupation,
        **environment(torch.get_num_threads()),
    }
    publish("testbed_bias", result)


OCCUPATIONS_BY = {o.name: o for o in OCCUPATIONS}

if __name__ == "__main__":
    main()
