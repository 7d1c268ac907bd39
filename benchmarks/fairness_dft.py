"""DFT on the testbed: does a finetune debias held-out occupations without losing them? One JSON object.

Each run trains one adaptor (in its own process, so its wall time and peak memory are its own)
on the 12 training occupations, then the published adaptor is attached to a fresh pipeline and
the held-out occupations are generated on the same seeds before and after (`--images` per
occupation, over several seeds) and read by the independent oracle: bias per attribute, the
share of images whose occupation is unchanged, similarity to the base image from the same noise.
Runs not asked for keep their previous figures in benchmarks/results/fairness_dft.json.

    python benchmarks/fairness_dft.py [--runs gender_te_lora gender_prefix ...] [--images 256] [--hp JSON --suffix _NAME]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import environment, publish, weights_fingerprint  # noqa: E402
from common.finetune_config import DFTConfig  # noqa: E402

GENDER = {"gender": {"female": 0.5, "male": 0.5}}
SKIN = {"skin_tone": {"I": 0.25, "II": 0.25, "III": 0.25, "IV": 0.25}}
AGE = {"age": {"young": 0.75, "old": 0.25}}
# the trainer's defaults otherwise; its own (classifier) evaluation is not the one reported. The subject gate is off so
# that a run which loses the occupation is still measured; `subject_gate` records whether the default gate would
# have refused it (from the trainer's own 32 evaluation images), `occupation_kept` the oracle on all the images
BASE_HP = {"eval_images": 8, "min_subject_kept": 0, "min_fairness_gain": 0}
WIDE = "testbed-train-wide"  # the 12 drawn occupations plus the 36 lookalike words
HELD_OUT = "testbed-test"  # the 4 held-out occupations every run is measured on


class Run(NamedTuple):
    target: dict
    hp: dict
    prompt_set: str = "testbed-train"
    base: str = "testbed"


RUNS: dict[str, Run] = {
    "gender_te_lora": Run(GENDER, {}),
    "gender_prefix": Run(GENDER, {"train": "prefix"}),
    "gender_x_skin_tone": Run({**GENDER, **SKIN}, {}),
    "gender_age_75_25": Run({**GENDER, **AGE}, {}),
    "gender_plain_dft": Run(GENDER, {"adjusted": False}),
    "gender_te_unet_lora": Run(GENDER, {"train": "both"}),
    "gender_te_unet_lora_200": Run(GENDER, {"train": "both", "iterations": 200}),
    "gender_age_75_25_te_unet": Run({**GENDER, **AGE}, {"train": "both"}),
    "gender_x_skin_tone_te_unet": Run({**GENDER, **SKIN}, {"train": "both"}),
    "gender_te_lora_wide": Run(GENDER, {}, WIDE),
    "gender_te_unet_lora_wide": Run(GENDER, {"train": "both"}, WIDE),
}


SEEDS = (20_000, 20_001, 20_002, 20_003)
TRAIN_IMAGES, TRAIN_SEED = 64, 20_100  # per training occupation, seeds the finetune never sampled


def train(name: str, store: Path, extra_hp: dict) -> dict:
    """Train run `name` in this process; returns timing, memory and the training curve."""
    from adaptors.classifiers import TestbedAttributeClassifier
    from adaptors.generation import configure_threads, load_pipeline, resolve_model_path
    from adaptors.trainers import get_trainer
    from common.schemas import FinetuneJob
    from testbed.world import prompt_set

    configure_threads(1)
    target, hp, train_set, _ = run = RUNS[name]
    hp = {**hp, **extra_hp}
    pipe = load_pipeline(run.base, device="cpu")
    job = FinetuneJob(method="dft", base_model=run.base, fairness_target=target, prompts=prompt_set(train_set),
                      prompt_set=train_set, eval_prompts=prompt_set(HELD_OUT),
                      hyperparameters={**BASE_HP, **hp}, name=name)  # fmt: skip
    points: list[dict] = []
    t0 = time.time()
    get_trainer("dft")(job, pipe, TestbedAttributeClassifier(), store / name, store / f"{name}.ckpt", points.append,
                       lambda: False)  # fmt: skip
    seconds = time.time() - t0
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "hyperparameters": {**BASE_HP, **hp},
        "prompt_set": train_set,
        "base_model": run.base,
        "base_weights": weights_fingerprint(resolve_model_path(run.base)),
        **training_curve(points),
    }


def training_curve(points: list[dict]) -> dict:
    """The loss curve (about 30 points), median gradient norm and skipped steps of a run's progress points.

    Only the training iterations count: a measured start first reports its base images as progress points of
    their own, with no loss."""
    curve = [p for p in points if "iteration" in p]
    every = max(1, len(curve) // 30)
    return {
        "loss_curve": [{k: p[k] for k in ("iteration", "loss", "align", "preserve", "grad_norm")} for p in curve[::every]],
        "grad_norm_median": _median([p["grad_norm"] for p in curve if p["grad_norm"] is not None]),
        "skipped_steps": sum(1 for p in curve if p["skipped"]),
    }


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    return round(values[len(values) // 2], 4) if values else None


def held_out_images(pipe, adaptor, per_seed: int, occupations: tuple[str, ...] | None = None, seeds: tuple[int, ...] = SEEDS,
                    steps: int | None = None, render=None):  # fmt: skip
    """Occupation (held-out by default) -> images (N x 3 x H x W in [0, 1]) on fixed seeds, with or without `adaptor`,
    at `steps` sampling steps (None: the service's default). `render(spec)` replaces the plain generation (guidance
    methods), keeping the same specs and so the same noise."""
    import torch

    from adaptors.generation import GenerationSpec, generate
    from common.settings import Settings
    from testbed.world import TEST_OCCUPATIONS, prompt_for

    settings = Settings()
    encoder = adaptor.prompt_encoder(pipe) if adaptor is not None else None
    out = {}
    for occ in occupations or TEST_OCCUPATIONS:
        batches = []
        for seed in seeds:
            spec = GenerationSpec(prompt_for(occ), num_images=per_seed, seed=seed, steps=steps or settings.default_steps,
                                  guidance_scale=settings.default_guidance_scale)  # fmt: skip
            batches.append(render(spec) if render else generate(pipe, spec, max_batch=64, encode_prompt=encoder))
        out[occ] = torch.cat(batches)
    return out


def oracle_summary(images: dict, attrs: list[str]) -> dict:
    from common.bias import bias, frequencies, intersectional_bias
    from testbed.oracle import read_batch
    from testbed.world import ATTRIBUTES, look_of

    per_occ = {}
    for occ, imgs in images.items():
        readings = read_batch(imgs.numpy() * 2 - 1)
        people = [r for r in readings if r.person]
        labels = {a: [getattr(r, a) for r in people] for a in attrs}
        row = {
            "bias": {a: round(bias(frequencies(labels[a], ATTRIBUTES[a])), 4) for a in attrs},
            "shares": {a: {c: round(v, 4) for c, v in frequencies(labels[a], ATTRIBUTES[a]).items()} for a in attrs},
            "occupation_kept": round(sum(r.occupation == look_of(occ) for r in readings) / len(readings), 4),
            "no_person": len(readings) - len(people),
        }
        if len(attrs) > 1:
            row["intersectional_bias"] = round(intersectional_bias(labels, {a: ATTRIBUTES[a] for a in attrs}), 4)
        per_occ[occ] = row
    return per_occ


def _mean(rows: dict, key: str, attr: str | None = None) -> float:
    values = [r[key][attr] if attr else r[key] for r in rows.values()]
    return round(sum(values) / len(values), 4)


def evaluate(name: str, store: Path, per_seed: int, before_cache: dict) -> dict:
    import torch

    from adaptors.classifiers import TestbedAttributeClassifier
    from adaptors.generation import configure_threads, load_pipeline
    from adaptors.loading import load_adaptor
    from testbed.world import TRAIN_OCCUPATIONS

    configure_threads(1)
    target = RUNS[name].target
    attrs = list(target)
    adaptor = load_adaptor(store / name)
    pipe = load_pipeline(RUNS[name].base, device="cpu")
    before_cache = before_cache.setdefault(RUNS[name].base, {})  # the same base images for every run on a model
    if "images" not in before_cache:
        before_cache["images"] = held_out_images(pipe, None, per_seed)
        before_cache["train_images"] = held_out_images(pipe, None, TRAIN_IMAGES, TRAIN_OCCUPATIONS, (TRAIN_SEED,))
    adaptor.attach(pipe)
    adaptor.activate(pipe)
    after_images = held_out_images(pipe, adaptor, per_seed)
    before, after = oracle_summary(before_cache["images"], attrs), oracle_summary(after_images, attrs)
    classifier = TestbedAttributeClassifier()
    with torch.no_grad():
        fb = torch.cat([classifier.features(x).flatten(1) for x in before_cache["images"].values()])
        fa = torch.cat([classifier.features(x).flatten(1) for x in after_images.values()])
    pixel = torch.cat([(after_images[o] - before_cache["images"][o]).pow(2).flatten(1).mean(1) for o in after_images])
    result = {
        "target": target,
        "bias_before": {a: _mean(before, "bias", a) for a in attrs},
        "bias_after": {a: _mean(after, "bias", a) for a in attrs},
        "max_occupation_bias_after": {a: max(r["bias"][a] for r in after.values()) for a in attrs},
        "occupation_kept": min(r["occupation_kept"] for r in after.values()),
        "occupation_kept_before": min(r["occupation_kept"] for r in before.values()),
        "similarity_to_base": {
            "classifier_feature_cosine": round(torch.nn.functional.cosine_similarity(fa, fb).mean().item(), 4),
            "pixel_mse": round(pixel.mean().item(), 5),
        },
        "images_per_occupation": per_seed * len(SEEDS),
        "per_occupation": {o: {"before": before[o], "after": after[o]} for o in after},
    }
    kept = ((adaptor.manifest.metrics or {}).get("semantics") or {}).get("subject_kept")
    if kept is not None:
        result["subject_gate"] = {"trainer_share": kept["share"], "passed": kept["share"] >= DFTConfig().min_subject_kept}
    # the training occupations too (fewer images): a finetune that fits them but not the held-out ones
    # has learned a change per prompt rather than a rule; the gap says so
    train_after = oracle_summary(held_out_images(pipe, adaptor, TRAIN_IMAGES, TRAIN_OCCUPATIONS, (TRAIN_SEED,)), attrs)
    train_before = oracle_summary(before_cache["train_images"], attrs)
    result["training_occupations"] = {
        "images_per_occupation": TRAIN_IMAGES,
        "bias_before": {a: _mean(train_before, "bias", a) for a in attrs},
        "bias_after": {a: _mean(train_after, "bias", a) for a in attrs},
        "occupation_kept": min(r["occupation_kept"] for r in train_after.values()),
    }
    if len(attrs) > 1:
        result["intersectional_bias_before"] = _mean(before, "intersectional_bias")
        result["intersectional_bias_after"] = _mean(after, "intersectional_bias")
    if "age" in attrs:
        result["old_share_before"] = _mean({o: r["shares"]["age"] for o, r in before.items()}, "old")
        result["old_share"] = _mean({o: r["shares"]["age"] for o, r in after.items()}, "old")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--images", type=int, default=256, help="images per held-out occupation (split over 4 seeds)")
    parser.add_argument("--hp", default="{}", help="JSON hyperparameters applied to every run asked for (recorded)")
    parser.add_argument("--suffix", default="", help="store each run as NAME + SUFFIX (a variant beside the main figures)")
    parser.add_argument("--train-only", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_only:  # the child process of one run
        trained = train(args.train_only, Path(args.store), json.loads(args.hp))
        (Path(args.store) / f"{args.train_only}.train.json").write_text(json.dumps(trained))
        print(json.dumps(trained))
        return
    result: dict = {"benchmark": "fairness_dft", **environment(1)}
    before_cache: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            child = subprocess.run([sys.executable, __file__, "--train-only", name, "--store", tmp, "--hp", args.hp],
                                   check=True, capture_output=True, text=True)  # fmt: skip
            trained = json.loads(child.stdout.strip().splitlines()[-1])
            run = {**evaluate(name, Path(tmp), args.images // len(SEEDS), before_cache), **trained}
            result[name + args.suffix] = run
            print(f"{name}: bias {run['bias_before']} -> {run['bias_after']}, occupation kept {run['occupation_kept']}, "
                  f"{run['seconds']} s, {run['peak_rss_mb']} MB", file=sys.stderr)  # fmt: skip
    publish("fairness_dft", result, merge=True)  # runs other invocations recorded (maybe meanwhile) are kept


if __name__ == "__main__":
    main()
