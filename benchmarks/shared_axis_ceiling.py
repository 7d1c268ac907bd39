"""How far can a text-side rule debias the shared-axis testbed at best? One JSON object.

The shared-axis model (testbed.shared_axis) writes every occupation word's embedding row as a
look vector plus its centred shares times one direction per attribute. A text-encoder finetune
that generalises to held-out occupations has to learn, in effect, "move every word's coordinate
to the target's"; this benchmark applies that rule exactly, with no training: the axes are
recovered from the saved rows by least squares (look one-hot plus the three share coordinates;
the fit is exact) and each occupation row moves by scale x (the target's coordinate - its own)
along them. For gender 50/50 that takes the gender coordinate out; `--rule gender_age_75_25`
also moves the age coordinate to 75% young's, `--rule gender_x_skin_tone` the skin-tone
coordinate to the middle tone. Scale 0 is the base model, 1 the exact rule, > 1
pushes past it; `--below-scale` gives the words below the goal (for gender, the male-leaning ones)
a scale of their own. Held-out and training occupations are read by the oracle on the same seeds as
fairness_dft, so a finetune's figures there can be set against the best any rule of this form
reaches: what is left at scale 1 is held by the UNet's reading of the rest of the row (the look),
which no edit along the shared axes removes; a finetune is not confined to such edits.

    python benchmarks/shared_axis_ceiling.py [--rule gender|gender_age_75_25|gender_x_skin_tone] [--scales 0 1 1.5]
        [--below-scale 1.25] [--images 256] [--train-images 64]

With several scales of the gender rule in one invocation, `gender_two_sided_fit` records the rule
with a scale per side that the training occupations choose, and what it does to the held-out ones.
Rules and scales not asked for keep their previous figures in benchmarks/results/shared_axis_ceiling.json.
`--model neutral-looks` measures the neutral-looks variant (testbed.shared_axis), where every look's words
average the same shares, under keys prefixed `neutral_looks_`. `--read regressed` moves each word by the gender
coordinate the token map's regression start reads from its row when fitted to the training words' true shares
(keys `regressed_scale_*`): what that start reaches with perfect leans.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fairness_dft import (  # noqa: E402
    NEUTRAL_LOOKS,
    SEEDS,
    SHARED_AXES,
    TRAIN_IMAGES,
    TRAIN_SEED,
    _mean,
    held_out_images,
    oracle_summary,
)
from benchmarks.results_io import environment, publish, weights_fingerprint  # noqa: E402

# --model: the base model each name measures (the neutral-looks one's keys are prefixed neutral_looks_)
MODELS = {"shared-axes": SHARED_AXES, "neutral-looks": NEUTRAL_LOOKS}


def shared_axes(pipe, words: tuple | None = None) -> tuple[list[int], np.ndarray, np.ndarray, float]:
    """(token ids of the occupation words, their coordinates (words x 3: gender, age, skin tone), the three axes
    (3 x D), the fit's max residual). `words`: the occupation table the model was built from (default: the
    shared-axis model's)."""
    from testbed.shared_axis import SHARED_OCCUPATIONS, stereotype_coordinates
    from testbed.world import OCCUPATIONS, look_index

    words = SHARED_OCCUPATIONS if words is None else words
    vocab = pipe.tokenizer.get_vocab()
    table = pipe.text_encoder.get_input_embeddings().weight.detach().numpy()
    ids = [vocab[o.name + "</w>"] for o in words]
    looks = np.eye(len(OCCUPATIONS))[[look_index(o.name) for o in words]]
    coords = np.array([stereotype_coordinates(o) for o in words])
    design = np.concatenate([looks, coords], 1)
    solution, *_ = np.linalg.lstsq(design, table[ids], rcond=None)
    residual = float(np.abs(design @ solution - table[ids]).max())
    return ids, coords, solution[len(OCCUPATIONS) :], residual


# the coordinate each attribute's rule moves every word to: the target's share minus 0.5, as
# testbed.shared_axis.stereotype_coordinates centres them (gender 50/50; age 75% young; skin tone
# uniform over the four tones, whose mean darkness is the middle)
COLUMNS = {"gender": 0, "age": 1, "skin_tone": 2}
RULES: dict[str, dict[str, float]] = {
    "gender": {"gender": 0.0},
    "gender_age_75_25": {"gender": 0.0, "age": 0.25},
    "gender_x_skin_tone": {"gender": 0.0, "skin_tone": 0.0},
}


def measure(
    pipe,
    rule: str,
    scale: float,
    per_seed: int,
    below_scale: float | None = None,
    train_images: int = TRAIN_IMAGES,
    words: tuple | None = None,
    read: str = "exact",
) -> dict:
    """Apply the rule at this scale to the loaded pipeline's rows, read the images, put the rows back.

    `below_scale`: the scale for words whose coordinate lies below the goal (for gender, the
    male-leaning ones), when the two sides need different pushes; None: `scale` for both.
    `read`: "exact" moves each word by its own coordinate; "regressed" by the coordinate the regression
    start's fit reads from its row (`regressed_gender_move`)."""

    from testbed.world import TRAIN_OCCUPATIONS

    t0 = time.time()
    attrs = list(RULES[rule])
    with moved_rows(pipe, rule, scale, below_scale, words, read) as residual:
        held = oracle_summary(held_out_images(pipe, None, per_seed), attrs)
        train = oracle_summary(held_out_images(pipe, None, train_images, TRAIN_OCCUPATIONS, (TRAIN_SEED,)), attrs)

    result = {
        "rule": rule,
        "read": read,
        "scale": scale,
        **({"below_goal_scale": below_scale} if below_scale is not None else {}),
        "held_out_bias": {a: _mean(held, "bias", a) for a in attrs},
        "held_out_max_bias": {a: max(r["bias"][a] for r in held.values()) for a in attrs},
        "held_out_female_share": {o: r["shares"]["gender"]["female"] for o, r in held.items()},
        "held_out_occupation_kept": min(r["occupation_kept"] for r in held.values()),
        "training_bias": {a: _mean(train, "bias", a) for a in attrs},
        "training_female_share": {o: r["shares"]["gender"]["female"] for o, r in train.items()},
        "training_max_bias": {a: max(r["bias"][a] for r in train.values()) for a in attrs},
        "training_occupation_kept": min(r["occupation_kept"] for r in train.values()),
    }
    if "age" in attrs:
        result["held_out_old_share"] = _mean({o: r["shares"]["age"] for o, r in held.items()}, "old")
        result["held_out_old_share_per_occupation"] = {o: r["shares"]["age"]["old"] for o, r in held.items()}
        result["training_old_share"] = _mean({o: r["shares"]["age"] for o, r in train.items()}, "old")
    if "skin_tone" in attrs:
        result["held_out_skin_tone_shares"] = {o: r["shares"]["skin_tone"] for o, r in held.items()}
    if len(attrs) > 1:
        result["held_out_intersectional_bias"] = _mean(held, "intersectional_bias")
    return {
        **result,
        "images_per_held_out_occupation": per_seed * len(SEEDS),
        "images_per_training_occupation": train_images,
        "axis_fit_max_residual": residual,
        "seconds": round(time.time() - t0, 1),
    }


@contextmanager
def moved_rows(pipe, rule: str, scale: float, below_scale: float | None, words: tuple | None, read: str):
    """The pipeline's occupation rows moved by the rule (see `measure`) inside the block, put back after it;
    yields the axis fit's max residual."""
    import torch

    ids, coords, axes, residual = shared_axes(pipe, words)
    move = np.zeros_like(coords)
    for attr, goal in RULES[rule].items():
        gap = goal - coords[:, COLUMNS[attr]]
        move[:, COLUMNS[attr]] = np.where(gap > 0, scale if below_scale is None else below_scale, scale) * gap
    rows = pipe.text_encoder.get_input_embeddings().weight
    saved = rows[ids].detach().clone()
    if read == "regressed":
        if rule != "gender" or below_scale is not None:
            raise ValueError("--read regressed: the gender rule at one scale only")
        shift = scale * regressed_gender_move(pipe, saved.double().numpy(), words)
    else:
        shift = move @ axes
    with torch.no_grad():
        rows[ids] += torch.from_numpy(shift).to(rows.dtype)
    try:
        yield residual
    finally:
        with torch.no_grad():
            rows[ids] = saved


# fresh evaluation seeds for `spread`: set k holds seeds FRESH_SEED + 4k .. + 4k + 3, none of them fairness_dft's
FRESH_SEED = 40_000
GENDER_TARGET = {"mean": 0.15, "max": 0.30}  # the DFT issue's gender 50/50 target on the held-out occupations


def spread(pipe, scale: float, per_seed: int, sets: int, words: tuple | None, read: str) -> dict:
    """The gender rule at `scale` read on `sets` fresh sets of evaluation seeds, each like fairness_dft's (4 seeds,
    `per_seed` images each per held-out occupation): how far one held-out figure moves with the evaluation noise
    alone, and on how many sets the rule meets the gender target. A finetune that had learnt this rule exactly
    would meet the target on about that share of independent evaluations, so its pass rate bounds what a
    seed count of finetunes can show."""
    t0 = time.time()
    figures = []
    with moved_rows(pipe, "gender", scale, None, words, read):
        for k in range(sets):
            seeds = tuple(FRESH_SEED + 4 * k + i for i in range(len(SEEDS)))
            held = oracle_summary(held_out_images(pipe, None, per_seed, seeds=seeds), ["gender"])
            figures.append({
                "seeds": list(seeds),
                "bias": _mean(held, "bias", "gender"),
                "max_bias": max(r["bias"]["gender"] for r in held.values()),
                "female_share": {o: r["shares"]["gender"]["female"] for o, r in held.items()},
            })  # fmt: skip
    met = [f["bias"] <= GENDER_TARGET["mean"] and f["max_bias"] <= GENDER_TARGET["max"] for f in figures]
    biases = np.array([f["bias"] for f in figures])
    return {
        "rule": "gender",
        "read": read,
        "scale": scale,
        "images_per_held_out_occupation": per_seed * len(SEEDS),
        "bias_mean": round(float(biases.mean()), 4),
        "bias_sd": round(float(biases.std(ddof=1)), 4) if sets > 1 else None,
        "target_met": f"{sum(met)} of {sets}",
        "per_seed_set": figures,
        "seconds": round(time.time() - t0, 1),
    }


def two_sided_fit(measured: dict[float, dict]) -> dict:
    """The gender rule whose scale on each side of the goal fits the training occupations best, and its held-out figures.

    This is what a finetune that learnt the best rule of this form from its prompts alone would reach
    on occupations it never saw. The two sides can be combined from symmetric runs because a prompt
    holds one occupation word: its images depend only on its own row, moved by its own side's scale."""
    from common.bias import bias
    from testbed.shared_axis import stereotype_coordinates
    from testbed.world import OCCUPATION_BY_NAME

    def side(occupation: str) -> str:  # as `measure` splits them: the gender coordinate below the goal (0) or not
        return "below" if stereotype_coordinates(OCCUPATION_BY_NAME[occupation])[COLUMNS["gender"]] < 0 else "above"

    def gender_bias(female: float) -> float:
        return bias({"female": female, "male": 1.0 - female})

    def side_training_bias(scale: float, which: str) -> float:
        shares = measured[scale]["training_female_share"]
        return float(np.mean([gender_bias(p) for o, p in shares.items() if side(o) == which]))

    chosen = {which: min(measured, key=lambda sc: side_training_bias(sc, which)) for which in ("below", "above")}
    first = next(iter(measured.values()))
    train = [gender_bias(measured[chosen[side(o)]]["training_female_share"][o]) for o in first["training_female_share"]]
    held = {o: measured[chosen[side(o)]]["held_out_female_share"][o] for o in first["held_out_female_share"]}
    return {
        "scales_tried": sorted(measured),
        "below_goal_scale": chosen["below"],
        "above_goal_scale": chosen["above"],
        "training_bias": round(float(np.mean(train)), 4),
        "held_out_bias": round(float(np.mean([gender_bias(p) for p in held.values()])), 4),
        "held_out_max_bias": round(max(gender_bias(p) for p in held.values()), 4),
        "held_out_female_share": held,
    }


def regressed_gender_move(pipe, rows: np.ndarray, words: tuple | None) -> np.ndarray:
    """The move (rows x dim) of the token map's regression start (token_map_init regression, rank 1, the wide set)
    fitted to the training words' true gender coordinates instead of leans measured from images: the best that
    start can do with perfect leans. Only the occupation words move, as with token_map_keep shared."""
    from adaptors.trainers.trainable import prompt_span, regressed_map, varying_word_embeddings
    from testbed.shared_axis import SHARED_OCCUPATIONS, stereotype_coordinates
    from testbed.world import PROMPT_SETS, prompt_for

    occupations = PROMPT_SETS["testbed-train-wide"]
    prompts = [prompt_for(o) for o in occupations]
    table = {o.name: stereotype_coordinates(o)[0] for o in (SHARED_OCCUPATIONS if words is None else words)}
    coordinate = np.array([table[o] for o in occupations])
    basis = prompt_span(pipe, prompts).double().numpy()
    read, write = regressed_map(varying_word_embeddings(pipe, prompts) @ basis, np.stack([coordinate, -coordinate], 1), 1)
    return -np.outer(rows @ (basis @ read[:, 0]), basis @ write[:, 0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rule", choices=sorted(RULES), default="gender")
    parser.add_argument("--scales", nargs="+", type=float, default=[0.0, 1.0, 1.5])
    parser.add_argument("--below-scale", type=float, help="a different scale for words below the goal (male-leaning)")
    parser.add_argument("--train-images", type=int, default=TRAIN_IMAGES, help="images per training occupation (one seed)")
    parser.add_argument("--images", type=int, default=256, help="images per held-out occupation (split over 4 seeds)")
    parser.add_argument("--read", choices=("exact", "regressed"), default="exact",
                        help="regressed: each word's coordinate as the regression start reads it from its row, "
                             "fitted to the training words' true shares (keys regressed_scale_*)")  # fmt: skip
    parser.add_argument("--spread", type=int, metavar="SETS",
                        help="read the gender rule at each scale on SETS fresh sets of evaluation seeds instead "
                             "(keys ..._spread_SETS)")  # fmt: skip
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="shared-axes",
        help="neutral-looks: the variant whose looks carry no stereotype (keys prefixed neutral_looks_)",
    )
    args = parser.parse_args()
    from adaptors.generation import configure_threads, load_pipeline, resolve_model_path
    from testbed.shared_axis import occupation_words

    base = MODELS[args.model]
    words = occupation_words(base)
    configure_threads(1)
    pipe = load_pipeline(base, device="cpu")
    fingerprint = weights_fingerprint(resolve_model_path(base))
    result: dict = {"benchmark": "shared_axis_ceiling", **environment(1)}
    prefix = ("" if args.model == "shared-axes" else "neutral_looks_") + ("" if args.rule == "gender" else f"{args.rule}_")
    measured: dict[float, dict] = {}
    below = "" if args.below_scale is None else f"_below_{args.below_scale:g}"
    read = "" if args.read == "exact" else f"{args.read}_"
    if args.spread:
        if args.rule != "gender" or args.below_scale is not None:
            parser.error("--spread: the gender rule at one scale per side only")
        for scale in args.scales:
            key = f"{prefix}{read}scale_{scale:g}_spread_{args.spread}"
            result[key] = {**spread(pipe, scale, args.images // len(SEEDS), args.spread, words, args.read),
                           "base_weights": fingerprint}  # fmt: skip
        publish("shared_axis_ceiling", result, merge=True)
        return
    for scale in args.scales:
        measured[scale] = measure(pipe, args.rule, scale, args.images // len(SEEDS), args.below_scale, args.train_images,
                                  words, args.read)  # fmt: skip
        result[f"{prefix}{read}scale_{scale:g}{below}"] = {**measured[scale], "base_weights": fingerprint}
    if args.rule == "gender" and args.below_scale is None and args.read == "exact" and len(measured) > 1:
        result[f"{prefix}gender_two_sided_fit"] = {**two_sided_fit(measured), "base_weights": fingerprint}
    publish("shared_axis_ceiling", result, merge=True)


if __name__ == "__main__":
    main()
