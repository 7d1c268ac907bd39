"""Does a request get the distribution it asked for? One JSON object.

For each held-out testbed occupation and each target, R requests of N images (fresh seeds) are
served three ways -- `none`, `assign`, `assign` + `enforce` -- with the same settings the
inference worker uses, and every image is read by the independent oracle (not the classifier
that `enforce` checks with). Reports the realised distribution, the share of requests whose
per-class counts are within 1 image of the assigned counts, the time per image relative to
`none`, the semantics check (occupation kept), how often the audit classifier (what `enforce`
trusts) reads what the oracle reads, and how many requests `enforce` believed exact.
Writes benchmarks/results/request_fairness.json.

    python benchmarks/request_fairness.py [--requests 8] [--images 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptors.assign import class_texts_for_testbed, generate_assigned, joint_assignment  # noqa: E402
from adaptors.audit import classify  # noqa: E402
from adaptors.classifiers import TestbedAttributeClassifier  # noqa: E402
from adaptors.enforce import enforce  # noqa: E402
from adaptors.generation import GenerationSpec, configure_threads, generate, load_pipeline  # noqa: E402
from benchmarks.results_io import environment, publish  # noqa: E402
from common.bias import frequencies  # noqa: E402
from common.settings import Settings  # noqa: E402
from testbed.oracle import read_batch  # noqa: E402
from testbed.world import ATTRIBUTES, TEST_OCCUPATIONS, prompt_for  # noqa: E402

TARGETS = {
    "gender_50_50": {"gender": {"female": 0.5, "male": 0.5}},
    "gender_30_70": {"gender": {"female": 0.3, "male": 0.7}},
    "skin_tone_40_30_20_10": {"skin_tone": {"I": 0.4, "II": 0.3, "III": 0.2, "IV": 0.1}},
}


def _within_one(readings, assignment, attrs) -> bool:
    for attr in attrs:
        for cls in ATTRIBUTES[attr]:
            want = sum(1 for a in assignment if a[attr] == cls)
            got = sum(1 for r in readings if r.person and getattr(r, attr) == cls)
            if abs(want - got) > 1:
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=8, help="requests per occupation, target and strategy")
    parser.add_argument("--images", type=int, default=8, help="images per request")
    args = parser.parse_args()
    settings = Settings()
    threads = configure_threads(0)
    pipe = load_pipeline("testbed", device="cpu")
    classifier = TestbedAttributeClassifier()
    texts = class_texts_for_testbed()
    kw = {"mode": settings.assign_mode, "guidance_weight": settings.assign_guidance_weight,
          "classifier_scale": settings.assign_classifier_scale}  # fmt: skip

    cells: dict[str, dict] = {}
    seconds = {"none": 0.0, "assign": 0.0, "assign_enforce": 0.0}
    images_done = {k: 0 for k in seconds}
    summary = {k: {"within_one": [], "occupation_kept": []} for k in seconds}
    for occ in TEST_OCCUPATIONS:
        for tname, target in TARGETS.items():
            attrs = list(target)
            readings_by = {k: [] for k in seconds}
            agree: dict[str, list[bool]] = {k: [] for k in seconds}  # the audit classifier reads what the oracle reads
            satisfied = 0
            within = {k: 0 for k in seconds}
            for r in range(args.requests):
                seed = 10_000 + r
                spec = GenerationSpec(prompt_for(occ), num_images=args.images, seed=seed,
                                      steps=settings.default_steps, guidance_scale=settings.default_guidance_scale)  # fmt: skip
                assignment = joint_assignment(args.images, target, seed)
                t0 = time.perf_counter()
                plain = generate(pipe, spec)
                seconds["none"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                assigned = generate_assigned(pipe, spec, assignment, texts, classifier=classifier, **kw)
                assign_s = time.perf_counter() - t0
                seconds["assign"] += assign_s
                t0 = time.perf_counter()
                enforced, _, report = enforce(pipe, classifier, spec, assignment, texts, assigned,
                                              max_rounds=settings.enforce_max_rounds, **kw)  # fmt: skip
                seconds["assign_enforce"] += assign_s + time.perf_counter() - t0
                satisfied += report.satisfied
                for key, imgs in (("none", plain), ("assign", assigned), ("assign_enforce", enforced)):
                    readings = read_batch(imgs.numpy() * 2 - 1)
                    labels = classify(classifier, imgs)
                    agree[key] += [all(lab.label(a) == getattr(x, a) for a in attrs)
                                   for x, lab in zip(readings, labels) if x.person and lab.person]  # fmt: skip
                    readings_by[key] += readings
                    within[key] += _within_one(readings, assignment, attrs)
                    images_done[key] += len(imgs)
            cell = {}
            for key, readings in readings_by.items():
                kept = sum(1 for x in readings if x.occupation == occ) / len(readings)
                shares = {a: frequencies([getattr(x, a) for x in readings], ATTRIBUTES[a]) for a in attrs}
                cell[key] = {
                    "realised": {a: {c: round(v, 4) for c, v in shares[a].items()} for a in attrs},
                    "within_one_of_assigned": round(within[key] / args.requests, 4),
                    "occupation_kept": round(kept, 4),
                    "no_person": sum(1 for x in readings if not x.person),
                    "classifier_agrees_with_oracle": round(sum(agree[key]) / max(1, len(agree[key])), 4),
                }
                summary[key]["within_one"].append(within[key] / args.requests)
                summary[key]["occupation_kept"].append(kept)
            cell["assign_enforce"]["satisfied_per_classifier"] = round(satisfied / args.requests, 4)
            cells[f"{occ}/{tname}"] = cell
            print(f"{occ:10s} {tname:22s} within1: none {cell['none']['within_one_of_assigned']:.2f} "
                  f"assign {cell['assign']['within_one_of_assigned']:.2f} "
                  f"enforce {cell['assign_enforce']['within_one_of_assigned']:.2f}", file=sys.stderr)  # fmt: skip

    per_image = {k: seconds[k] / max(1, images_done[k]) for k in seconds}
    result = {
        "benchmark": "request_fairness",
        "requests_per_cell": args.requests,
        "images_per_request": args.images,
        "assign_mode": settings.assign_mode,
        "assign_guidance_weight": settings.assign_guidance_weight,
        "assign_classifier_scale": settings.assign_classifier_scale,
        "enforce_max_rounds": settings.enforce_max_rounds,
        "within_one_of_assigned": {k: round(sum(v["within_one"]) / len(v["within_one"]), 4) for k, v in summary.items()},
        "occupation_kept": {k: round(min(v["occupation_kept"]), 4) for k, v in summary.items()},
        "time_per_image_s": {k: round(v, 5) for k, v in per_image.items()},
        "assign_cost_ratio": round(per_image["assign"] / per_image["none"], 3),
        "enforce_extra_cost_ratio": round(per_image["assign_enforce"] / per_image["none"], 3),
        "cells": cells,
        **environment(threads),
    }
    publish("request_fairness", result)


if __name__ == "__main__":
    main()
