"""GMM latent balancing (`latent`) beside `assign`, on held-out occupations, every image read by the oracle. One JSON.

Per held-out occupation: one calibration pool (N images, latents recorded after step t*, read by the steering
classifier, as the `gmm` trainer does), from which a mixture is fitted for each target's attributes; then R
requests of 8 images per target (fresh seeds) served by `none`, `assign` and `latent` in the same run, with the
measurement helpers of benchmarks/request_fairness.py: within one / exact (oracle-read counts against the
assigned ones), untargeted drift and dependence, variety ratio, occupation kept, recognisable, and seconds per
image relative to `none` (each request's three ways timed one after the other, so all see the same machine load);
calibration seconds per prompt (pool, reading and fits).

    python benchmarks/fairness_gmm.py [--requests 5] [--occupations senator secretary mechanic librarian]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptors.assign import class_texts_for_testbed, generate_assigned, joint_assignment  # noqa: E402
from adaptors.audit import classify  # noqa: E402
from adaptors.classifiers import TestbedAttributeClassifier  # noqa: E402
from adaptors.generation import GenerationSpec, configure_threads, generate, load_pipeline  # noqa: E402
from adaptors.gmm import generate_balanced  # noqa: E402
from adaptors.trainers.gmm import fit_mixture, joint_labels, record  # noqa: E402
from benchmarks.request_fairness import TARGETS, counts_match, dependence, shares, variety  # noqa: E402
from benchmarks.results_io import environment, publish  # noqa: E402
from common.adaptor_matching import uncovered_class  # noqa: E402
from common.bias import total_variation  # noqa: E402
from common.finetune_config import GMMConfig  # noqa: E402
from common.settings import Settings  # noqa: E402
from testbed.oracle import read_batch  # noqa: E402
from testbed.world import ATTRIBUTES, TEST_OCCUPATIONS, prompt_for  # noqa: E402

WAYS = ("none", "assign", "latent")


def carried(mixture, attrs: list[str], prompt: str, target: dict) -> str | None:
    """The target class no component carries (the gateway's rule over the mixture's classes), None if all are."""
    manifest = {"hyperparameters": {"prompts": [prompt], "component_classes": [mixture.classes]}}
    return uncovered_class(manifest, prompt, target)


def cell(readings_by, images_by, assignments, attrs, none_flat, occ) -> dict:
    out = {}
    untargeted = [u for u in ATTRIBUTES if u not in attrs]
    none_var = [v for imgs, a in zip(images_by["none"], assignments) for v in variety(imgs, a, attrs)]
    for way in WAYS:
        per_request = readings_by[way]
        flat = [r for rs in per_request for r in rs]
        var = [v for imgs, a in zip(images_by[way], assignments) for v in variety(imgs, a, attrs)]
        n = len(per_request)
        out[way] = {
            "realised": {a: {c: round(v, 4) for c, v in shares(flat, a).items()} for a in attrs},
            "within_one": round(sum(counts_match(rs, a, attrs, 1) for rs, a in zip(per_request, assignments)) / n, 4),
            "exact": round(sum(counts_match(rs, a, attrs, 0) for rs, a in zip(per_request, assignments)) / n, 4),
            "drift": {u: round(total_variation(shares(flat, u), shares(none_flat, u)), 4) for u in untargeted},
            "dependence": {u: max(dependence(flat, t, u) for t in attrs) for u in untargeted},
            "variety_ratio": round(float(np.mean(var)) / max(1e-9, float(np.mean(none_var))), 4) if var else None,
            "occupation_kept": round(sum(r.occupation == occ for r in flat) / len(flat), 4),
            "recognisable": round(sum(r.person for r in flat) / len(flat), 4),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5, help="requests per occupation, target and strategy")
    parser.add_argument("--images", type=int, default=8, help="images per request")
    parser.add_argument("--occupations", nargs="+", default=list(TEST_OCCUPATIONS))
    args = parser.parse_args()
    settings = Settings()
    cfg = GMMConfig()
    threads = configure_threads(0)
    pipe = load_pipeline("testbed", device="cpu")
    classifier = TestbedAttributeClassifier()
    texts = class_texts_for_testbed()
    kw = {"mode": settings.assign_mode, "guidance_weight": settings.assign_guidance_weight,
          "classifier_scale": settings.assign_classifier_scale}  # fmt: skip
    cells, calibration, seconds, done = {}, {}, dict.fromkeys(WAYS, 0.0), dict.fromkeys(WAYS, 0)
    for occ in args.occupations:
        prompt = prompt_for(occ)
        t0 = time.perf_counter()
        pool = GenerationSpec(prompt, num_images=cfg.images, seed=cfg.seed, steps=cfg.steps, guidance_scale=cfg.guidance_scale)
        with torch.no_grad():
            pool_images, latents = record(pipe, pool, cfg.at_step, cfg.max_batch, None)
        read = classify(classifier, pool_images)
        pool_s = time.perf_counter() - t0
        specs = [GenerationSpec(prompt, num_images=args.images, seed=20_000 + r, steps=cfg.steps,
                                guidance_scale=cfg.guidance_scale) for r in range(args.requests)]  # fmt: skip
        none_images, none_readings = [], []
        for spec in specs:
            imgs = generate(pipe, spec)
            none_images.append(imgs.numpy())
            none_readings.append(read_batch(imgs.numpy() * 2 - 1))
        none_flat = [r for rs in none_readings for r in rs]
        fits = {}
        for tname, target in TARGETS.items():
            attrs = list(target)
            t1 = time.perf_counter()
            mixture = fit_mixture(latents.numpy(), joint_labels(read, attrs), attrs, cfg)
            fits[tname] = time.perf_counter() - t1
            missing = carried(mixture, attrs, prompt, target)
            if missing is not None:
                cells[f"{occ}/{tname}"] = {"refused": f"{missing}: no component carries it (a 409 at request time)"}
                print(f"{occ:10s} {tname:26s} refused: {missing}", file=sys.stderr)
                continue
            readings_by = {"none": none_readings, "assign": [], "latent": []}
            images_by = {"none": none_images, "assign": [], "latent": []}
            assignments = []
            for spec in specs:
                assignment = joint_assignment(args.images, target, spec.seed)
                assignments.append(assignment)
                for way in ("none", "assign", "latent"):
                    t1 = time.perf_counter()
                    if way == "none":  # timed again beside the others, so the cost compares the same load
                        generate(pipe, spec)
                        seconds["none"] += time.perf_counter() - t1
                        done["none"] += args.images
                        continue
                    if way == "assign":
                        imgs = generate_assigned(pipe, spec, assignment, texts, classifier=classifier, **kw)
                    else:
                        imgs = generate_balanced(pipe, spec, assignment, mixture, cfg.at_step)
                    seconds[way] += time.perf_counter() - t1
                    done[way] += len(imgs)
                    images_by[way].append(imgs.numpy())
                    readings_by[way].append(read_batch(imgs.numpy() * 2 - 1))
            result = cell(readings_by, images_by, assignments, attrs, none_flat, occ)
            result["components"] = ["/".join(c[a] for a in attrs) for c in mixture.classes]
            cells[f"{occ}/{tname}"] = result
            print(f"{occ:10s} {tname:26s} within1 latent {result['latent']['within_one']:.2f} assign "
                  f"{result['assign']['within_one']:.2f} | exact {result['latent']['exact']:.2f} "
                  f"{result['assign']['exact']:.2f} | dep {result['latent']['dependence']} var "
                  f"{result['latent']['variety_ratio']} kept {result['latent']['occupation_kept']}", file=sys.stderr)  # fmt: skip
        calibration[occ] = {"pool_images": cfg.images, "pool_seconds": round(pool_s, 2),
                            "seconds_per_prompt": round(pool_s + max(fits.values()), 2),
                            "fit_seconds": {k: round(v, 3) for k, v in fits.items()}}  # fmt: skip
    per_image = {k: seconds[k] / max(1, done[k]) for k in WAYS}
    out = {
        "benchmark": "fairness_gmm",
        "reader": "testbed oracle (independent of the classifier that names components and steers assign)",
        "sizes": {
            "occupations": args.occupations,
            "requests_per_cell": args.requests,
            "images_per_request": args.images,
            "calibration_images_per_prompt": cfg.images,
        },  # fmt: skip
        "gmm": {
            "at_step": cfg.at_step,
            "steps": cfg.steps,
            "dims": cfg.dims,
            "components_per_class": cfg.components,
            "covariance": cfg.covariance,
            "move": "shift the component mean, keep the residual",
        },  # fmt: skip
        "assign_settings": {
            "mode": settings.assign_mode,
            "guidance_weight": settings.assign_guidance_weight,
            "classifier_scale": settings.assign_classifier_scale,
        },  # fmt: skip
        "summary": summarise(cells, per_image),
        "calibration": calibration,
        "cells": cells,
        **environment(threads),
    }
    publish("fairness_gmm", out)


def summarise(cells: dict, per_image: dict) -> dict:
    served = {k: c for k, c in cells.items() if "refused" not in c}
    out: dict = {"refused_cells": sorted(k for k in cells if k not in served)}
    for way in WAYS:
        rows = [c[way] for c in served.values()]
        out[way] = {
            "within_one_min": min(r["within_one"] for r in rows),
            "within_one_mean": round(float(np.mean([r["within_one"] for r in rows])), 4),
            "exact_min": min(r["exact"] for r in rows),
            "drift_max": max((v for r in rows for v in r["drift"].values()), default=0.0),
            "dependence_max": max((v for r in rows for v in r["dependence"].values()), default=0.0),
            "variety_ratio_min": min((r["variety_ratio"] for r in rows if r["variety_ratio"] is not None), default=None),
            "occupation_kept_min": min(r["occupation_kept"] for r in rows),
            "recognisable_min": min(r["recognisable"] for r in rows),
            "seconds_per_image": round(per_image[way], 5),
            "cost_vs_none": round(per_image[way] / max(1e-9, per_image["none"]), 3),
        }
    out["latent_beats_assign_within_one"] = sorted(k for k, c in served.items()
                                                   if c["latent"]["within_one"] > c["assign"]["within_one"])  # fmt: skip
    out["assign_beats_latent_within_one"] = sorted(k for k, c in served.items()
                                                   if c["assign"]["within_one"] > c["latent"]["within_one"])  # fmt: skip
    out["cells_below_0_90_latent"] = sorted(k for k, c in served.items() if c["latent"]["within_one"] < 0.90)
    return out


if __name__ == "__main__":
    main()
