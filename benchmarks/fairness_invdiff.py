"""InvDiff on the testbed, beside DFT's default recipe: does debiasing without labels or a target lower the bias?

Trains `invdiff` (its defaults, on the testbed's own biased training data) and DFT's default recipe
(`gender_te_lora` of benchmarks/fairness_dft.py), each in its own process so wall time and peak memory
are its own. Then base, InvDiff and DFT generate the training and held-out occupations on the same
seeds, read by the independent oracle: bias per attribute, occupation kept, variety; the inferred
groups' agreement (NMI) with the training set's true classes; generation cost relative to `none`.

    python benchmarks/fairness_invdiff.py [--train-images 64] [--held-out-images 128] [--hp JSON]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fairness_dft import SEEDS, held_out_images, oracle_summary  # noqa: E402
from benchmarks.results_io import environment, publish, weights_fingerprint  # noqa: E402

ATTRS = ["gender", "skin_tone", "age"]
RESULT = ROOT / "benchmarks" / "results" / "fairness_invdiff.json"
DFT_RUN = "gender_te_lora"  # DFT's default recipe (text-encoder LoRA, gender 50/50)
BASE_HP = {"min_subject_kept": 0, "eval_images": 8}  # measured here by the oracle, not refused by the trainer's gate


def train_invdiff(store: Path, extra_hp: dict) -> dict:
    """Train InvDiff in this process on the training occupations' prompts (held-out ones for its own evaluation)."""
    from adaptors.classifiers import TestbedAttributeClassifier
    from adaptors.generation import configure_threads, load_pipeline, resolve_model_path
    from adaptors.trainers import get_trainer
    from common.schemas import FinetuneJob
    from testbed.world import prompt_set

    configure_threads(1)
    pipe = load_pipeline("testbed", device="cpu")
    hp = {**BASE_HP, **extra_hp}
    job = FinetuneJob(method="invdiff", base_model="testbed", fairness_target={}, prompts=prompt_set("testbed-train"),
                      prompt_set="testbed-train", eval_prompts=prompt_set("testbed-test"), hyperparameters=hp)  # fmt: skip
    t0 = time.time()
    manifest = get_trainer("invdiff")(job, pipe, TestbedAttributeClassifier(), store / "invdiff", store / "invdiff.ckpt",
                                      lambda _p: None, lambda: False)  # fmt: skip
    return {
        "seconds": round(time.time() - t0, 1),
        "group_seconds": manifest.metrics["group_seconds"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "adaptor_bytes": manifest.size_bytes,
        "hyperparameters": hp,
        "examples": manifest.metrics["examples"],
        "groups": manifest.metrics["groups"],
        "base_weights": weights_fingerprint(resolve_model_path("testbed")),
        "loss_curve": [{k: p[k] for k in ("iteration", "loss", "group_losses")} for p in manifest.metrics["history"]],
    }


def _mean(rows: dict, attr: str) -> float:
    return round(sum(r["bias"][attr] for r in rows.values()) / len(rows), 4)


def variety(images: dict) -> float:
    """Mean per-pixel standard deviation across an occupation's images (averaged over occupations)."""
    return round(sum(float(x.std(0).mean()) for x in images.values()) / len(images), 4)


def measure(pipe, adaptor, per_seed_train: int, per_seed_test: int, steps: int) -> tuple[dict, dict, float]:
    from testbed.world import TEST_OCCUPATIONS, TRAIN_OCCUPATIONS

    t0 = time.time()
    train = held_out_images(pipe, adaptor, per_seed_train, TRAIN_OCCUPATIONS, SEEDS, steps)
    test = held_out_images(pipe, adaptor, per_seed_test, TEST_OCCUPATIONS, SEEDS, steps)
    return train, test, time.time() - t0


def generation_cost(pipe, adaptor, steps: int, repeats: int = 5) -> float:
    """Median over `repeats` of (seconds with the adaptor) / (seconds without) for the same 16 images, timed back to
    back so that a load change on a shared machine hits both alike."""
    from adaptors.generation import GenerationSpec, generate
    from testbed.world import prompt_for

    spec = GenerationSpec(prompt_for("doctor"), num_images=16, seed=1, steps=steps)
    ratios = []
    for _ in range(repeats):
        adaptor.deactivate(pipe)
        t0 = time.perf_counter()
        generate(pipe, spec)
        plain = time.perf_counter() - t0
        adaptor.activate(pipe)
        t0 = time.perf_counter()
        generate(pipe, spec)
        ratios.append((time.perf_counter() - t0) / plain)
    return round(sorted(ratios)[len(ratios) // 2], 2)


def summary(images: dict, base_images: dict | None) -> dict:
    rows = oracle_summary(images, ATTRS)
    out = {
        "bias": {a: _mean(rows, a) for a in ATTRS},
        "occupation_kept": min(r["occupation_kept"] for r in rows.values()),
        "no_person": sum(r["no_person"] for r in rows.values()),
        "variety": variety(images),
        "per_occupation": {o: {"bias": r["bias"], "shares": r["shares"]["gender"]} for o, r in rows.items()},
    }
    if base_images is not None:
        import torch

        pixel = torch.cat([(images[o] - base_images[o]).pow(2).flatten(1).mean(1) for o in images])
        out["pixel_mse_to_base"] = round(pixel.mean().item(), 5)
        out["variety_kept"] = round(out["variety"] / variety(base_images), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-images", type=int, default=64, help="images per training occupation (over 4 seeds)")
    parser.add_argument("--held-out-images", type=int, default=128, help="images per held-out occupation (over 4 seeds)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hp", default="{}", help="JSON overrides of InvDiff's hyperparameters (recorded)")
    parser.add_argument("--dft-hp", default="{}", help="JSON overrides of DFT's default recipe (recorded)")
    parser.add_argument("--attempt", metavar="NAME", help="record this run under attempts.NAME beside the main figures "
                        "(another recipe tried), leaving them as they are")  # fmt: skip
    parser.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_only:
        print(json.dumps(train_invdiff(Path(args.store), json.loads(args.hp))))
        return

    from adaptors.generation import configure_threads, load_pipeline
    from adaptors.loading import load_adaptor

    configure_threads(1)
    result: dict = {"benchmark": "fairness_invdiff", **environment(1),
                    "sizes": {"images_per_training_occupation": args.train_images,
                              "images_per_held_out_occupation": args.held_out_images, "seeds": list(SEEDS),
                              "steps": args.steps, "note": "the issue asks 256 per occupation; sized to ~15 min on 2 "
                              "shared CPU cores"}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        child = subprocess.run([sys.executable, __file__, "--train-only", "--store", tmp, "--hp", args.hp],
                               check=True, capture_output=True, text=True)  # fmt: skip
        invdiff_train = json.loads(child.stdout.strip().splitlines()[-1])
        child = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fairness_dft.py"), "--train-only", DFT_RUN,
                                "--store", tmp, "--hp", args.dft_hp], check=True, capture_output=True, text=True)  # fmt: skip
        dft_train = json.loads(child.stdout.strip().splitlines()[-1])

        pipe = load_pipeline("testbed", device="cpu")
        pt, ph = args.train_images // len(SEEDS), args.held_out_images // len(SEEDS)
        base_train, base_test, base_s = measure(pipe, None, pt, ph, args.steps)
        runs = {}
        for name, folder in (("invdiff", store / "invdiff"), ("dft", store / DFT_RUN)):
            adaptor = load_adaptor(folder)
            adaptor.attach(pipe)
            adaptor.activate(pipe)
            train_imgs, test_imgs, _ = measure(pipe, adaptor, pt, ph, args.steps)
            cost = generation_cost(pipe, adaptor, args.steps)
            adaptor.deactivate(pipe)
            adaptor.detach(pipe)
            runs[name] = {"training_occupations": summary(train_imgs, base_train),
                          "held_out_occupations": summary(test_imgs, base_test),
                          "generation_cost_vs_none": cost,
                          "adaptor_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}  # fmt: skip
    base = {"training_occupations": summary(base_train, None), "held_out_occupations": summary(base_test, None),
            "generation_seconds": round(base_s, 1)}  # fmt: skip
    nmi = invdiff_train["groups"].get("agreement_nmi", {})
    aligned = max((a for a in ATTRS if a in nmi), key=lambda a: nmi[a])
    before = base["training_occupations"]["bias"][aligned]
    after = runs["invdiff"]["training_occupations"]["bias"][aligned]
    reduction = round(1 - after / before, 4) if before > 0 else None
    kept = runs["invdiff"]["training_occupations"]["occupation_kept"]
    result.update({
        "base": base,
        "invdiff": {**runs["invdiff"], "training": invdiff_train},
        "dft_default": {**runs["dft"], "training": {k: dft_train[k] for k in ("seconds", "peak_rss_mb", "hyperparameters")}},
        "aligned_attribute": aligned,
        "targets": {
            "aligned_bias_reduction_on_training_occupations": reduction,
            "bias_reduction_met": reduction is not None and reduction >= 0.30,
            "occupation_kept": kept,
            "occupation_kept_met": kept >= 0.95,
        },
    })  # fmt: skip
    print(f"training occupations: bias {base['training_occupations']['bias']} -> invdiff "
          f"{runs['invdiff']['training_occupations']['bias']}, dft {runs['dft']['training_occupations']['bias']}",
          file=sys.stderr)  # fmt: skip
    if args.attempt:
        previous = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
        brief = {k: result[k] for k in ("code_revision", "sizes", "aligned_attribute", "targets")}
        sets = ("training_occupations", "held_out_occupations")
        brief["invdiff"] = {"hyperparameters": invdiff_train["hyperparameters"],
                            "agreement_nmi": invdiff_train["groups"]["agreement_nmi"],
                            **{s: runs["invdiff"][s]["bias"] for s in sets}}  # fmt: skip
        brief["base"] = {s: base[s]["bias"] for s in sets}
        brief["generation_cost_vs_none"] = {k: runs[k]["generation_cost_vs_none"] for k in runs}
        publish("fairness_invdiff", {"attempts": {**previous.get("attempts", {}), args.attempt: brief}}, merge=True)
        return
    publish("fairness_invdiff", result, merge=True)  # keeps the attempts recorded beside it


if __name__ == "__main__":
    main()
