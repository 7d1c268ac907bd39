"""Fair Mapping on the testbed, beside DFT's text-encoder LoRA and IDA in the same run: one JSON object.

Each mapping run trains a `fair_mapping` adaptor on the 12 training occupations (text space only,
gates off so every run is measured; whether the default gates would pass is recorded), attaches
it to the pipeline and generates, on the same seeds before and after, the training occupations and
the held-out ones, read by the independent oracle: bias and total variation (TV) to the target per
occupation, occupation kept, person recognisable, similarity to the base image. Runs: gender 50/50,
skin tone uniform, and gender 30/70 (the weighted fair-distance term, an extension beyond the
paper). In the same process, on the same base images and seeds:
- DFT's text-encoder LoRA at its default recipe, gender 50/50, trained and measured the same way (`--no-dft`);
- IDA at its default recipe (`--no-ida`; `--ida-runs` picks the targets, all three by default). IDA calibrates
  guidance weights per prompt and cannot serve a prompt it was not calibrated on, so it is calibrated twice: on
  the 12 training prompts (measured on the training occupations) and on the 4 held-out prompts themselves
  (measured on the held-out occupations, marked as such in the JSON). It is calibrated for the sampler steps
  and guidance the measurement generates with, on seeds the measurement never uses; the calibration's seconds
  and images are its training cost.

Sizes are flags so a loaded machine can run it reduced; the sizes used are in the JSON.

    python benchmarks/fairness_mapping.py [--per-seed 8 --seeds 2 --train-images 16] [--hp JSON] [--no-dft]
        [--no-ida] [--ida-runs gender_50_50 ...] [--ida-hp JSON]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.fairness_dft import BASE_HP as DFT_BASE_HP  # noqa: E402
from benchmarks.fairness_dft import SEEDS, held_out_images, oracle_summary  # noqa: E402
from benchmarks.results_io import code_revision, environment, publish, weights_fingerprint  # noqa: E402
from common.bias import total_variation  # noqa: E402

GENDER = {"gender": {"female": 0.5, "male": 0.5}}
RUNS: dict[str, dict] = {
    "gender_50_50": GENDER,
    "skin_tone_uniform": {"skin_tone": {"I": 0.25, "II": 0.25, "III": 0.25, "IV": 0.25}},
    "gender_30_70_weighted": {"gender": {"female": 0.3, "male": 0.7}},
}
# gates off so that every run is measured; `gates` records whether the defaults would have published it
MAPPING_HP = {"eval_images": 8, "min_subject_kept": 0, "min_fairness_gain": 0}
TRAIN_SEED = 20_100  # the training occupations' images: seeds no trainer sampled
# IDA's default recipe (common.finetune_config.IDAConfig) with its gate off, like the runs above; its calibration draws
# seeds `seed` + 10000 x prompt + iteration, so the default seed 0 would calibrate the third prompt on SEEDS' noise
IDA_HP = {"min_fairness_gain": 0, "seed": 100_000}
IDA_RUN_NAMES = {"gender_50_50": "ida_gender_50_50", "skin_tone_uniform": "ida_skin_tone_uniform",
                 "gender_30_70_weighted": "ida_gender_30_70"}  # fmt: skip
PER_PROMPT_NOTE = "calibrated on these prompts (per-prompt method)"


def train(method: str, target: dict, hp: dict, pipe, classifier, store: Path, name: str, prompts: str = "testbed-train"):
    """Train (or, for `ida`, calibrate) an adaptor on the prompt set `prompts`; returns it, its manifest and seconds."""
    from adaptors.loading import load_adaptor
    from adaptors.trainers import get_trainer
    from common.schemas import FinetuneJob
    from testbed.world import prompt_set

    job = FinetuneJob(method=method, base_model="testbed", fairness_target=target, prompts=prompt_set(prompts),
                      prompt_set=prompts, eval_prompts=prompt_set("testbed-test"), hyperparameters=hp,
                      name=name)  # fmt: skip
    t0 = time.time()
    manifest = get_trainer(method)(job, pipe, classifier, store / name, store / f"{name}.ckpt", lambda _: None, lambda: False)
    seconds = time.time() - t0
    adaptor = load_adaptor(store / name)
    return adaptor, manifest, round(seconds, 2)


def summarise(before: dict, after: dict, target: dict) -> dict:
    """Means over occupations of bias and TV to the target, occupation kept and recognisable, before and after."""
    attrs = list(target)

    def side(rows: dict) -> dict:
        n = len(rows)
        return {
            "bias": {a: round(sum(r["bias"][a] for r in rows.values()) / n, 4) for a in attrs},
            "tv": {a: round(sum(total_variation(r["shares"][a], target[a]) for r in rows.values()) / n, 4) for a in attrs},
            "occupation_kept": round(sum(r["occupation_kept"] for r in rows.values()) / n, 4),
            "min_occupation_kept": min(r["occupation_kept"] for r in rows.values()),
            "no_person": sum(r["no_person"] for r in rows.values()),
        }

    return {"before": side(before), "after": side(after),
            "per_occupation": {o: {"before": before[o]["shares"], "after": after[o]["shares"]} for o in after}}  # fmt: skip


def similarity(classifier, before: dict, after: dict) -> dict:
    with torch.no_grad():
        fb = torch.cat([classifier.features(x).flatten(1) for x in before.values()])
        fa = torch.cat([classifier.features(x).flatten(1) for x in after.values()])
    pixel = torch.cat([(after[o] - before[o]).pow(2).flatten(1).mean(1) for o in after])
    return {"classifier_feature_cosine": round(torch.nn.functional.cosine_similarity(fa, fb).mean().item(), 4),
            "pixel_mse": round(pixel.mean().item(), 5)}  # fmt: skip


def measure(pipe, classifier, adaptor, target: dict, base: dict, sizes: dict) -> dict:
    """Oracle figures of `adaptor` on the training and held-out occupations, against the base images `base`."""
    from testbed.world import TRAIN_OCCUPATIONS

    adaptor.attach(pipe)
    adaptor.activate(pipe)
    t0 = time.perf_counter()
    held = held_out_images(pipe, adaptor, sizes["per_seed"], seeds=sizes["seeds"])
    seconds = time.perf_counter() - t0
    trained = held_out_images(pipe, adaptor, sizes["train_images"], TRAIN_OCCUPATIONS, (TRAIN_SEED,))
    adaptor.deactivate(pipe)
    adaptor.detach(pipe)
    attrs = list(target)
    out = {
        "training_occupations": summarise(oracle_summary(base["train"], attrs), oracle_summary(trained, attrs), target),
        "held_out_occupations": summarise(oracle_summary(base["held"], attrs), oracle_summary(held, attrs), target),
        "similarity_to_base": similarity(classifier, {**base["held"], **base["train"]}, {**held, **trained}),
        "generation_cost_vs_none": round(seconds / base["seconds"], 3),
        "adaptor_bytes": adaptor.manifest.size_bytes,
    }
    return out


def directed_images(pipe, adaptor, per_seed: int, occupations: tuple[str, ...], seeds: tuple[int, ...]) -> dict:
    """held_out_images' images (same prompts, seeds, steps and guidance, hence the same noise) with IDA's weights."""
    from adaptors.assign import generate_directed

    def render(spec):
        directions = adaptor.directions(spec.prompt)
        if directions is None:
            raise ValueError(f"the ida adaptor was not calibrated on {spec.prompt!r}")
        return generate_directed(pipe, spec, [directions] * spec.num_images, adaptor.warmup_steps, max_batch=64)

    return held_out_images(pipe, None, per_seed, occupations, seeds, render=render)


def ida_run(pipe, classifier, target: dict, hp: dict, base: dict, sizes: dict, store: Path, name: str) -> dict:
    """IDA calibrated on the training prompts (measured there) and on the held-out prompts (measured there)."""
    from testbed.world import TEST_OCCUPATIONS, TRAIN_OCCUPATIONS

    sides = {"training_occupations": ("testbed-train", TRAIN_OCCUPATIONS, sizes["train_images"], (TRAIN_SEED,)),
             "held_out_occupations": ("testbed-test", TEST_OCCUPATIONS, sizes["per_seed"], sizes["seeds"])}  # fmt: skip
    calibration, images, seconds = {}, {}, 0.0
    for side, (prompts, occupations, per_seed, seeds) in sides.items():
        adaptor, manifest, calibration_seconds = train("ida", target, hp, pipe, classifier, store, f"{name}-{prompts}", prompts)
        t0 = time.perf_counter()
        images[side] = directed_images(pipe, adaptor, per_seed, occupations, seeds)
        seconds = time.perf_counter() - t0  # the held-out side's, timed like `measure`'s
        per_prompt = manifest.metrics["per_prompt"].values()
        calibration[side] = {"prompt_set": prompts, "seconds": calibration_seconds,
                             "images": manifest.metrics["images_generated"],
                             "iterations_mean": round(sum(r["iterations"] for r in per_prompt) / len(per_prompt), 2),
                             "adaptor_bytes": adaptor.manifest.size_bytes}  # fmt: skip
    calibration["held_out_occupations"]["note"] = PER_PROMPT_NOTE
    attrs = list(target)
    held, trained = images["held_out_occupations"], images["training_occupations"]
    return {
        "training_occupations": summarise(oracle_summary(base["train"], attrs), oracle_summary(trained, attrs), target),
        "held_out_occupations": {"note": PER_PROMPT_NOTE,
                                 **summarise(oracle_summary(base["held"], attrs), oracle_summary(held, attrs), target)},
        "similarity_to_base": similarity(classifier, {**base["held"], **base["train"]}, {**held, **trained}),
        "generation_cost_vs_none": round(seconds / base["seconds"], 3),
        "calibration": calibration,
        "train_seconds": round(sum(c["seconds"] for c in calibration.values()), 2),
        "adaptor_bytes": sum(c["adaptor_bytes"] for c in calibration.values()),
    }  # fmt: skip


def gates(manifest) -> dict:
    """Whether the default gates (DFT's and the mapping's defaults alike) would publish it, from the trainer's own figures."""
    from common.finetune_config import FairMappingConfig

    cfg, m = FairMappingConfig(), manifest.metrics
    before, after = m["before"]["mean_prompt_tv"], m["after"]["mean_prompt_tv"]
    kept = (m.get("semantics") or {}).get("subject_kept") or {}
    return {"trainer_mean_prompt_tv": {"before": before, "after": after},
            "fairness_gate_passed": after <= (1 - cfg.min_fairness_gain) * before,
            "subject_kept": kept.get("share"), "subject_gate_passed": kept.get("share", 1.0) >= cfg.min_subject_kept}  # fmt: skip


def generation_cost(pipe, classifier, hp: dict, repeats: int, store: Path) -> dict:
    """Time of a mapped batch over a plain one, alternated `repeats` times on the same seeds (median of the ratios), so
    that a machine shared with other jobs slows both alike; the per-run figures above time one pass each."""
    import statistics

    from adaptors.generation import GenerationSpec, generate
    from testbed.world import prompt_for

    adaptor, _, _ = train("fair_mapping", GENDER, {**hp, "eval_images": 1, "eval_steps": 1}, pipe, classifier, store, "cost")
    adaptor.attach(pipe)
    encoder = adaptor.prompt_encoder(pipe)
    spec = GenerationSpec(prompt_for("senator"), num_images=16, seed=1, steps=20, guidance_scale=5.0)
    generate(pipe, spec, max_batch=16)  # warm-up
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(pipe, spec, max_batch=16)
        t1 = time.perf_counter()
        generate(pipe, spec, max_batch=16, encode_prompt=encoder)
        ratios.append((time.perf_counter() - t1) / (t1 - t0))
    adaptor.detach(pipe)
    return {"mapped_over_none_median": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
            "batch": 16, "steps": 20}  # fmt: skip


def main() -> None:
    from adaptors.classifiers import TestbedAttributeClassifier
    from adaptors.generation import configure_threads, load_pipeline, resolve_model_path
    from common.settings import Settings
    from testbed.world import TRAIN_OCCUPATIONS

    parser = argparse.ArgumentParser()
    parser.add_argument("--per-seed", type=int, default=8, help="held-out images per occupation and seed")
    parser.add_argument("--seeds", type=int, default=2, choices=range(1, len(SEEDS) + 1), help="held-out seeds")
    parser.add_argument("--train-images", type=int, default=16, help="images per training occupation")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--hp", default="{}", help="JSON fair_mapping hyperparameters for every mapping run (recorded)")
    parser.add_argument("--no-dft", action="store_true", help="leave out DFT's text-encoder LoRA")
    parser.add_argument("--no-ida", action="store_true", help="leave out IDA")
    parser.add_argument("--ida-runs", nargs="+", default=list(IDA_RUN_NAMES), choices=list(IDA_RUN_NAMES),
                        help="IDA's targets (default: all three runs)")  # fmt: skip
    parser.add_argument("--ida-hp", default="{}", help="JSON overrides of IDA's default recipe (recorded)")
    parser.add_argument("--cost-only", type=int, metavar="REPEATS", help="only the alternated generation-cost measurement, "
                        "merged into the committed JSON under `generation_cost`")  # fmt: skip
    parser.add_argument("--dft-hp", default="{}", help="JSON overrides of DFT's default recipe (recorded; none by default)")
    args = parser.parse_args()
    threads = configure_threads(1)
    if args.cost_only:
        pipe, classifier = load_pipeline("testbed", device="cpu"), TestbedAttributeClassifier()
        with tempfile.TemporaryDirectory() as tmp:
            cost = generation_cost(pipe, classifier, {**MAPPING_HP, **json.loads(args.hp)}, args.cost_only, Path(tmp))
        publish("fairness_mapping", {"generation_cost": {**cost, "revision": code_revision()}}, merge=True)
        return
    sizes = {"per_seed": args.per_seed, "seeds": SEEDS[: args.seeds], "train_images": args.train_images}
    pipe = load_pipeline("testbed", device="cpu")
    classifier = TestbedAttributeClassifier()
    held_out_images(pipe, None, 2, seeds=SEEDS[:1])  # warm-up: the timed runs below compare like with like
    t0 = time.perf_counter()
    held = held_out_images(pipe, None, sizes["per_seed"], seeds=sizes["seeds"])
    base = {"held": held, "seconds": time.perf_counter() - t0,
            "train": held_out_images(pipe, None, sizes["train_images"], TRAIN_OCCUPATIONS, (TRAIN_SEED,))}  # fmt: skip
    hp = {**MAPPING_HP, **json.loads(args.hp)}
    result: dict = {
        "benchmark": "fairness_mapping",
        "revision": code_revision(),
        "weights": weights_fingerprint(resolve_model_path("testbed")),
        "sizes": {"held_out_images_per_occupation": args.per_seed * args.seeds, "seeds": list(sizes["seeds"]),
                  "training_images_per_occupation": args.train_images, "reduced": args.per_seed * args.seeds < 256},
        "mapping_hyperparameters": hp,
        "runs": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            adaptor, manifest, seconds = train("fair_mapping", RUNS[name], hp, pipe, classifier, Path(tmp), name)
            run = {"target": RUNS[name], "train_seconds": seconds, "fair_distance": manifest.metrics["fair_distance"],
                   **measure(pipe, classifier, adaptor, RUNS[name], base, sizes), "gates": gates(manifest)}  # fmt: skip
            result["runs"][name] = run
            print(f"{name}: {json.dumps(run['training_occupations']['after'])}", file=sys.stderr)
        if not args.no_dft:
            dft_hp = {**DFT_BASE_HP, **json.loads(args.dft_hp)}
            adaptor, manifest, seconds = train("dft", GENDER, dft_hp, pipe, classifier, Path(tmp), "dft_te_lora")
            run = {"target": GENDER, "train_seconds": seconds, "hyperparameters": dft_hp,
                   **measure(pipe, classifier, adaptor, GENDER, base, sizes)}  # fmt: skip
            result["runs"]["dft_te_lora_gender_50_50"] = run
        if not args.no_ida:
            settings = Settings()  # IDA's weights hold for one step count: the one held_out_images generates with
            ida_hp = {**IDA_HP, "steps": settings.default_steps, "guidance_scale": settings.default_guidance_scale,
                      **json.loads(args.ida_hp)}  # fmt: skip
            for name in args.ida_runs:
                run = {"target": RUNS[name], "hyperparameters": ida_hp,
                       **ida_run(pipe, classifier, RUNS[name], ida_hp, base, sizes, Path(tmp), IDA_RUN_NAMES[name])}  # fmt: skip
                result["runs"][IDA_RUN_NAMES[name]] = run
                print(f"{IDA_RUN_NAMES[name]}: {json.dumps(run['training_occupations']['after'])}", file=sys.stderr)
    result["summary"] = summary(result["runs"])
    result.update(environment(threads))
    publish("fairness_mapping", result)


def summary(runs: dict) -> dict:
    """The figures the issue asks for, one line each."""
    out = {}
    for name, run in runs.items():
        attr = next(iter(run["target"]))
        tr, ho = run["training_occupations"], run["held_out_occupations"]
        out[name] = {
            "train_bias": [tr["before"]["bias"][attr], tr["after"]["bias"][attr]],
            "train_tv": [tr["before"]["tv"][attr], tr["after"]["tv"][attr]],
            "held_out_bias": [ho["before"]["bias"][attr], ho["after"]["bias"][attr]],
            "held_out_tv": [ho["before"]["tv"][attr], ho["after"]["tv"][attr]],
            "occupation_kept_min": min(tr["after"]["min_occupation_kept"], ho["after"]["min_occupation_kept"]),
            "no_person_after": tr["after"]["no_person"] + ho["after"]["no_person"],
            "feature_cosine_to_base": run["similarity_to_base"]["classifier_feature_cosine"],
            "train_seconds": run["train_seconds"],
            "adaptor_bytes": run["adaptor_bytes"],
            "generation_cost_vs_none": run["generation_cost_vs_none"],
        }
        if "calibration" in run:  # IDA: per prompt, so the held-out figures are on prompts it was calibrated on
            out[name]["calibration_seconds"] = {s: c["seconds"] for s, c in run["calibration"].items()}
            out[name]["calibration_images"] = {s: c["images"] for s, c in run["calibration"].items()}
            out[name]["held_out"] = PER_PROMPT_NOTE
    g = out.get("gender_50_50")
    if g:
        g["target_met"] = g["train_bias"][1] <= 0.5 * g["train_bias"][0] and g["occupation_kept_min"] >= 0.95
    return out


if __name__ == "__main__":
    main()
