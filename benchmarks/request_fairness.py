"""Does a request get the distribution it asked for, and nothing else changed? One JSON object.

For each held-out testbed occupation and each target, R requests of N images (fresh seeds) are
served three ways -- `none`, `assign`, `assign` + `enforce` -- with the settings the inference
worker uses, and every image is read by the independent oracle (never by the classifier that
steers or that `enforce` checks with). Per cell:

- within_one / exact: requests whose oracle-read counts are within 1 image of (equal to) the assigned ones;
- drift: per untargeted attribute, total variation between its distribution here and under `none`;
- dependence: per untargeted attribute u, the largest |P(u=c | t1) - P(u=c | t2)| over its classes c
  and pairs of classes t1, t2 of a targeted attribute (0: independent, as the base model has it);
- variety: mean pairwise pixel distance between images of one request with the same assigned class,
  as a ratio to `none`'s images grouped by the same assignment;
- occupation kept, recognisable (the oracle sees a person), and seconds per image relative to `none`.

Also: 200 single-image `assign` requests at 30/70 with distinct seeds and no ledger (female share),
and a 40-request single-image ledger stream at 50/50 (deficit rule over audited counts).
Writes benchmarks/results/request_fairness.json.

    python benchmarks/request_fairness.py [--requests 20] [--images 8]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptors.assign import class_texts_for_testbed, deficit_assignment, generate_assigned, joint_assignment, joint_key  # noqa: E402
from adaptors.audit import classify  # noqa: E402
from adaptors.classifiers import TestbedAttributeClassifier  # noqa: E402
from adaptors.enforce import enforce  # noqa: E402
from adaptors.generation import GenerationSpec, configure_threads, generate, load_pipeline  # noqa: E402
from benchmarks.results_io import environment, publish  # noqa: E402
from common.bias import frequencies, total_variation  # noqa: E402
from common.settings import Settings  # noqa: E402
from testbed.oracle import read_batch  # noqa: E402
from testbed.world import ATTRIBUTES, TEST_OCCUPATIONS, prompt_for  # noqa: E402

TARGETS = {
    "gender_50_50": {"gender": {"female": 0.5, "male": 0.5}},
    "gender_30_70": {"gender": {"female": 0.3, "male": 0.7}},
    "skin_tone_40_30_20_10": {"skin_tone": {"I": 0.4, "II": 0.3, "III": 0.2, "IV": 0.1}},
    "age_75_25": {"age": {"young": 0.75, "old": 0.25}},
    "gender_x_skin_tone_uniform": {
        "gender": {"female": 0.5, "male": 0.5},
        "skin_tone": {"I": 0.25, "II": 0.25, "III": 0.25, "IV": 0.25},
    },
}
WAYS = ("none", "assign", "assign_enforce")


def counts_match(readings, assignment, attrs, slack: int) -> bool:
    """Every targeted class's oracle-read count within `slack` images of its assigned count."""
    for attr in attrs:
        for cls in ATTRIBUTES[attr]:
            want = sum(1 for a in assignment if a[attr] == cls)
            got = sum(1 for r in readings if r.person and getattr(r, attr) == cls)
            if abs(want - got) > slack:
                return False
    return True


def shares(readings, attr: str) -> dict[str, float]:
    return frequencies([getattr(r, attr) if r.person else None for r in readings], ATTRIBUTES[attr])


def dependence(readings, targeted: str, untargeted: str) -> float:
    """max over classes u and pairs (t1, t2) of |P(u | t1) - P(u | t2)|, among images with a person."""
    by_class = {}
    for t in ATTRIBUTES[targeted]:
        rows = [r for r in readings if r.person and getattr(r, targeted) == t]
        if len(rows) >= 5:  # a conditional share from fewer images is noise
            by_class[t] = shares(rows, untargeted)
    worst = 0.0
    for a, b in itertools.combinations(by_class.values(), 2):
        worst = max(worst, max(abs(a[c] - b[c]) for c in ATTRIBUTES[untargeted]))
    return round(worst, 4)


def variety(images: np.ndarray, assignment, attrs) -> list[float]:
    """Mean pairwise pixel distance within each group of images that share their assigned classes."""
    flat = images.reshape(len(images), -1)
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(assignment):
        groups.setdefault(joint_key(a, attrs), []).append(i)
    out = []
    for idx in groups.values():
        for i, j in itertools.combinations(idx, 2):
            out.append(float(np.sqrt(((flat[i] - flat[j]) ** 2).mean())))
    return out


def serve(pipe, classifier, texts, kw, settings, spec, target, assignment, none_images):
    """(images, seconds) of each way for one request; `none` is shared across targets."""
    t0 = time.perf_counter()
    assigned = generate_assigned(pipe, spec, assignment, texts, classifier=classifier, **kw)
    assign_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    enforced, _, report = enforce(pipe, classifier, spec, assignment, texts, assigned,
                                  max_rounds=settings.enforce_max_rounds, **kw)  # fmt: skip
    return {"assign": (assigned, assign_s), "assign_enforce": (enforced, assign_s + time.perf_counter() - t0)}, report


def cell_figures(readings_by, images_by, assignments, attrs, none_readings, requests):
    cell = {}
    untargeted = [u for u in ATTRIBUTES if u not in attrs]
    none_variety = [v for imgs, a in zip(images_by["none"], assignments, strict=True) for v in variety(imgs, a, attrs)]
    for way in WAYS:
        per_request = readings_by[way]
        readings = [r for rs in per_request for r in rs]
        var = [v for imgs, a in zip(images_by[way], assignments, strict=True) for v in variety(imgs, a, attrs)]
        cell[way] = {
            "realised": {a: {c: round(v, 4) for c, v in shares(readings, a).items()} for a in attrs},
            "within_one": round(sum(counts_match(rs, a, attrs, 1) for rs, a in zip(per_request, assignments)) / requests, 4),
            "exact": round(sum(counts_match(rs, a, attrs, 0) for rs, a in zip(per_request, assignments)) / requests, 4),
            "drift": {u: round(total_variation(shares(readings, u), shares(none_readings, u)), 4) for u in untargeted},
            "dependence": {u: max(dependence(readings, t, u) for t in attrs) for u in untargeted},
            "variety_ratio": round(float(np.mean(var)) / max(1e-9, float(np.mean(none_variety))), 4) if var else None,
            "occupation_kept": None,  # set by the caller, which knows the occupation
            "recognisable": round(sum(r.person for r in readings) / len(readings), 4),
        }
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20, help="requests per occupation, target and strategy")
    parser.add_argument("--images", type=int, default=8, help="images per request")
    parser.add_argument("--singles", type=int, default=200, help="single-image requests at 30/70 without a ledger")
    parser.add_argument("--stream", type=int, default=40, help="single-image requests of the ledger stream at 50/50")
    args = parser.parse_args()
    settings = Settings()
    threads = configure_threads(0)
    pipe = load_pipeline("testbed", device="cpu")
    classifier = TestbedAttributeClassifier()
    texts = class_texts_for_testbed()
    kw = {"mode": settings.assign_mode, "guidance_weight": settings.assign_guidance_weight,
          "classifier_scale": settings.assign_classifier_scale}  # fmt: skip

    cells: dict[str, dict] = {}
    seconds = dict.fromkeys(WAYS, 0.0)
    done = dict.fromkeys(WAYS, 0)
    for occ in TEST_OCCUPATIONS:
        specs = [GenerationSpec(prompt_for(occ), num_images=args.images, seed=10_000 + r, steps=settings.default_steps,
                                guidance_scale=settings.default_guidance_scale) for r in range(args.requests)]  # fmt: skip
        none_images, none_readings = [], []
        for spec in specs:
            t0 = time.perf_counter()
            imgs = generate(pipe, spec)
            seconds["none"] += time.perf_counter() - t0
            done["none"] += len(imgs)
            none_images.append(imgs.numpy())
            none_readings.append(read_batch(imgs.numpy() * 2 - 1))
        none_flat = [r for rs in none_readings for r in rs]
        for tname, target in TARGETS.items():
            attrs = list(target)
            readings_by = {"none": none_readings, "assign": [], "assign_enforce": []}
            images_by = {"none": none_images, "assign": [], "assign_enforce": []}
            assignments, satisfied = [], 0
            for spec in specs:
                assignment = joint_assignment(args.images, target, spec.seed)
                assignments.append(assignment)
                made, report = serve(pipe, classifier, texts, kw, settings, spec, target, assignment, None)
                satisfied += report.satisfied
                for way, (imgs, secs) in made.items():
                    seconds[way] += secs
                    done[way] += len(imgs)
                    images_by[way].append(imgs.numpy())
                    readings_by[way].append(read_batch(imgs.numpy() * 2 - 1))
            cell = cell_figures(readings_by, images_by, assignments, attrs, none_flat, args.requests)
            for way in WAYS:
                flat = [r for rs in readings_by[way] for r in rs]
                cell[way]["occupation_kept"] = round(sum(r.occupation == occ for r in flat) / len(flat), 4)
            cell["assign_enforce"]["satisfied_per_classifier"] = round(satisfied / args.requests, 4)
            cells[f"{occ}/{tname}"] = cell
            print(f"{occ:10s} {tname:26s} assign within1 {cell['assign']['within_one']:.2f} exact {cell['assign']['exact']:.2f} "
                  f"| enforce exact {cell['assign_enforce']['exact']:.2f} | drift {cell['assign']['drift']} "
                  f"dep {cell['assign']['dependence']} var {cell['assign']['variety_ratio']} "
                  f"kept {cell['assign']['occupation_kept']}", file=sys.stderr)  # fmt: skip

    per_image = {k: seconds[k] / max(1, done[k]) for k in WAYS}
    result = {
        "benchmark": "request_fairness",
        "reader": "testbed oracle (independent of the classifier that steers and enforces)",
        "requests_per_cell": args.requests,
        "images_per_request": args.images,
        "settings": {
            "assign_mode": settings.assign_mode,
            "assign_guidance_weight": settings.assign_guidance_weight,
            "assign_classifier_scale": settings.assign_classifier_scale,
            "enforce_max_rounds": settings.enforce_max_rounds,
        },  # fmt: skip
        "summary": summarise(cells, per_image),
        "single_image_requests": single_images(pipe, classifier, texts, kw, settings, args.singles),
        "ledger_stream": ledger_stream(pipe, classifier, texts, kw, settings, args.stream),
        "cells": cells,
        **environment(threads),
    }
    publish("request_fairness", result)


def summarise(cells: dict, per_image: dict) -> dict:
    """The worst cell for each figure, per way, against the targets in DESIGN.md."""
    out = {}
    for way in WAYS:
        rows = [c[way] for c in cells.values()]
        out[way] = {
            "within_one_min": min(r["within_one"] for r in rows),
            "exact_min": min(r["exact"] for r in rows),
            "drift_max": max((v for r in rows for v in r["drift"].values()), default=0.0),
            "dependence_max": max((v for r in rows for v in r["dependence"].values()), default=0.0),
            "variety_ratio_min": min((r["variety_ratio"] for r in rows if r["variety_ratio"] is not None), default=None),
            "occupation_kept_min": min(r["occupation_kept"] for r in rows),
            "recognisable_min": min(r["recognisable"] for r in rows),
            "seconds_per_image": round(per_image[way], 5),
            "cost_vs_none": round(per_image[way] / per_image["none"], 3),
        }
    worst = {}
    for name, cell in cells.items():
        for way in ("assign", "assign_enforce"):
            for u, v in cell[way]["dependence"].items():
                if v > worst.get(way, ("", 0.0))[1]:
                    worst[way] = (f"{name}: {u}", v)
    out["worst_dependence_cell"] = {k: {"cell": v[0], "value": v[1]} for k, v in worst.items()}
    return out


def single_images(pipe, classifier, texts, kw, settings, n: int) -> dict:
    """n one-image `assign` requests at 30/70 with distinct seeds, no ledger: the assigned and the oracle-read share."""
    target = {"gender": {"female": 0.3, "male": 0.7}}
    assigned_female, read_female, persons = 0, 0, 0
    for k, occ in zip(range(n), itertools.cycle(TEST_OCCUPATIONS)):
        spec = GenerationSpec(prompt_for(occ), num_images=1, seed=50_000 + k, steps=settings.default_steps,
                              guidance_scale=settings.default_guidance_scale)  # fmt: skip
        assignment = joint_assignment(1, target, spec.seed)
        assigned_female += assignment[0]["gender"] == "female"
        r = read_batch(generate_assigned(pipe, spec, assignment, texts, classifier=classifier, **kw).numpy() * 2 - 1)[0]
        persons += r.person
        read_female += r.person and r.gender == "female"
    return {"requests": n, "target_female": 0.3, "assigned_female_share": round(assigned_female / n, 4),
            "oracle_female_share": round(read_female / max(1, persons), 4)}  # fmt: skip


def ledger_stream(pipe, classifier, texts, kw, settings, n: int) -> dict:
    """n one-image requests for the secretary at 50/50 under one ledger: each assigned by the deficit rule over the
    counts the audit classifier delivered so far (as workers/ledger.py does), every image read by the oracle."""
    target = {"gender": {"female": 0.5, "male": 0.5}}
    delivered: Counter[str] = Counter()
    readings = []
    for k in range(n):
        spec = GenerationSpec(prompt_for("secretary"), num_images=1, seed=70_000 + k, steps=settings.default_steps,
                              guidance_scale=settings.default_guidance_scale)  # fmt: skip
        assignment = deficit_assignment(1, target, delivered)
        imgs = generate_assigned(pipe, spec, assignment, texts, classifier=classifier, **kw)
        audited = classify(classifier, imgs)[0]
        if audited.person:
            delivered[joint_key({"gender": audited.label("gender")}, ["gender"])] += 1
        readings += read_batch(imgs.numpy() * 2 - 1)
    none = [r for k in range(n) for r in read_batch(generate(pipe, GenerationSpec(
        prompt_for("secretary"), num_images=1, seed=70_000 + k, steps=settings.default_steps,
        guidance_scale=settings.default_guidance_scale)).numpy() * 2 - 1)]  # fmt: skip
    return {
        "requests": n,
        "oracle_counts": dict(Counter(r.gender for r in readings if r.person)),
        "drift": {u: round(total_variation(shares(readings, u), shares(none, u)), 4) for u in ("skin_tone", "age")},
        "dependence": {u: dependence(readings, "gender", u) for u in ("skin_tone", "age")},
        "occupation_kept": round(sum(r.occupation == "secretary" for r in readings) / n, 4),
    }


if __name__ == "__main__":
    main()
