# ruff: noqa: T201, B023, E501  (a research script: prints its rows; each hook runs inside its own loop iteration)
"""Variants of the latent move on the benchmark's weakest cells (issue 36): overshoot, t*, matching images to classes.

python research/gmm/variants.py [--cells mechanic/gender_50_50 secretary/skin_tone_40_30_20_10] [--requests 5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scipy.optimize import linear_sum_assignment  # noqa: E402

from adaptors.assign import joint_assignment  # noqa: E402
from adaptors.audit import classify  # noqa: E402
from adaptors.classifiers import TestbedAttributeClassifier  # noqa: E402
from adaptors.generation import GenerationSpec, configure_threads, generate, load_pipeline  # noqa: E402
from adaptors.trainers.gmm import fit_mixture, joint_labels  # noqa: E402
from benchmarks.request_fairness import TARGETS, counts_match  # noqa: E402
from common.finetune_config import GMMConfig  # noqa: E402
from testbed.oracle import read_batch  # noqa: E402
from testbed.world import prompt_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", nargs="+", default=["mechanic/gender_50_50", "secretary/skin_tone_40_30_20_10"])
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--at", nargs="+", type=int, default=[9, 11])
    ap.add_argument("--alphas", nargs="+", type=float, default=[1.0, 1.5])
    ap.add_argument("--match", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--configs", nargs="*", default=[], help="at:alpha pairs instead of the grid")
    args = ap.parse_args()
    configure_threads(0)
    pipe = load_pipeline("testbed", device="cpu")
    clf = TestbedAttributeClassifier()
    cfg = GMMConfig()
    pools = {}
    for cellname in args.cells:
        occ, tname = cellname.split("/")
        target, attrs, prompt = TARGETS[tname], list(TARGETS[tname]), prompt_for(occ)
        if occ not in pools:
            kept: dict[int, list] = {}
            imgs = generate(
                pipe,
                GenerationSpec(prompt, num_images=cfg.images, seed=cfg.seed, steps=cfg.steps),
                max_batch=64,
                on_latents=lambda s, lat, rows: kept.setdefault(s, []).append(lat.reshape(len(lat), -1).clone()),
            )
            pools[occ] = (classify(clf, imgs), {s: torch.cat(v).numpy() for s, v in kept.items()})
        read, lat = pools[occ]
        grid = [(int(c.split(":")[0]), float(c.split(":")[1]), False) for c in args.configs] or list(
            itertools.product(args.at, args.alphas, [bool(m) for m in args.match])
        )
        for at, alpha, match in grid:
            mix = fit_mixture(lat[at], joint_labels(read, attrs), attrs, replace(cfg, at_step=at))
            ok1 = ok0 = hits = total = 0
            for r in range(args.requests):
                spec = GenerationSpec(prompt, num_images=8, seed=20_000 + r, steps=cfg.steps)
                assignment = joint_assignment(8, target, spec.seed)

                def hook(step, latents, rows):
                    if step != at:
                        return None
                    post = mix.posterior(latents)
                    if match:  # give each class's slots to the images most likely of that class already
                        slots = [assignment[i] for i in rows]
                        cost = np.zeros((len(rows), len(slots)))
                        for j, a in enumerate(slots):
                            carriers = mix.carriers(a)
                            cost[:, j] = -np.log(post[:, carriers].sum(1).numpy() + 1e-9)
                        ri, ci = linear_sum_assignment(cost)
                        for i, j in zip(ri, ci):
                            assignment[rows[i]] = slots[j]
                    flat = latents.reshape(len(latents), -1).float()
                    out = flat.clone()
                    for k, i in enumerate(rows):
                        carriers = mix.carriers(assignment[i])
                        tgt = carriers[int(post[k, carriers].argmax())]
                        out[k] = flat[k] + alpha * (mix.latent_means[tgt] - post[k] @ mix.latent_means)
                    return out.reshape(latents.shape)

                imgs = generate(pipe, spec, on_latents=hook)
                rd = read_batch(imgs.numpy() * 2 - 1)
                ok1 += counts_match(rd, assignment, attrs, 1)
                ok0 += counts_match(rd, assignment, attrs, 0)
                hits += sum(x.person and all(getattr(x, a) == c for a, c in asg.items()) for x, asg in zip(rd, assignment))
                total += 8
                kept_occ = all(x.occupation == occ for x in rd)
            row = {
                "cell": cellname,
                "at": at,
                "alpha": alpha,
                "match": match,
                "within_one": ok1 / args.requests,
                "exact": ok0 / args.requests,
                "hit": round(hits / total, 3),
                "kept_last": kept_occ,
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
