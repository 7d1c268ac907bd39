"""Why a text-encoder LoRA debiases the training occupations and not the held-out ones. One JSON object.

Trains fairness_dft's gender_te_lora (the default `dft` text-encoder LoRA, gender 50/50, the 12
training occupations) and, for all 16 occupations, reads two things off the text
encoder. Its gender axis for an occupation X is the difference between the encodings of
"a female X" and "a male X" prompts; the base prompt's coordinate on that axis (-0.5 at the male
prompt, +0.5 at the female one) says how much of the occupation's gender prior the text side
holds in a shared, readable form, and the LoRA's movement along it says which way the finetune
pushed. Both are set beside the oracle's female share before and after (64 images each). If the
prior a finetune must undo is held by the UNet's reading of each occupation's own token rather
than along a shared text direction, a rule learnt on 12 occupations has nothing to carry over.

    python benchmarks/dft_text_axis.py [--model shared-axes]

`--model shared-axes` runs the same on the shared-axis variant (testbed.shared_axis), training
fairness_dft's shared_axes_gender_te_lora_wide (the 48-word set: there same-look words differ
in their shares), and writes dft_text_axis_shared_axes.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fairness_dft import RUNS, held_out_images, oracle_summary, train  # noqa: E402
from benchmarks.results_io import environment, publish  # noqa: E402

IMAGES, SEED = 64, 20_200
MODELS = {  # --model: (the fairness_dft run trained, the result's name)
    "testbed": ("gender_te_lora", "dft_text_axis"),
    "shared-axes": ("shared_axes_gender_te_lora_wide", "dft_text_axis_shared_axes"),
}


def text_axis(pipe, occupations: list[str]):
    """(encodings of the plain prompts, female-minus-male axis, the axis midpoint), each occupations x L x D."""
    import torch

    from adaptors.prefix import tokenize_for_prefix
    from testbed.world import attribute_prompt, prompt_for

    def encode(prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return pipe.text_encoder(tokenize_for_prefix(pipe, prompts, 0))[0]

    female = encode([attribute_prompt(o, {"gender": "female"}) for o in occupations])
    male = encode([attribute_prompt(o, {"gender": "male"}) for o in occupations])
    return encode([prompt_for(o) for o in occupations]), female - male, (female + male) / 2


def _coordinate(vectors, axis) -> np.ndarray:
    """Per occupation, the projection of `vectors` on its own axis, in units of the axis length."""
    return ((vectors * axis).flatten(1).sum(1) / axis.flatten(1).pow(2).sum(1)).numpy()


def main() -> None:
    from adaptors.base import load_adaptor
    from adaptors.generation import configure_threads, load_pipeline
    from testbed.world import TEST_OCCUPATIONS, TRAIN_OCCUPATIONS

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="testbed")
    run, name = MODELS[parser.parse_args().model]
    configure_threads(1)
    occupations = list(TRAIN_OCCUPATIONS) + list(TEST_OCCUPATIONS)
    pipe = load_pipeline(RUNS[run].base, device="cpu")
    before_images = held_out_images(pipe, None, IMAGES, tuple(occupations), (SEED,))
    encoded, axis, middle = text_axis(pipe, occupations)
    with tempfile.TemporaryDirectory() as tmp:
        trained = train(run, Path(tmp), {})
        adaptor = load_adaptor(Path(tmp) / run)
    adaptor.attach(pipe)
    adaptor.activate(pipe)
    tuned, _, _ = text_axis(pipe, occupations)
    after_images = held_out_images(pipe, adaptor, IMAGES, tuple(occupations), (SEED,))
    before, after = oracle_summary(before_images, ["gender"]), oracle_summary(after_images, ["gender"])

    base_coord = _coordinate(encoded - middle, axis)
    moved = _coordinate(tuned - encoded, axis)
    relative = ((tuned - encoded).flatten(1).norm(dim=1) / encoded.flatten(1).norm(dim=1)).numpy()
    share_before = np.array([before[o]["shares"]["gender"]["female"] for o in occupations])
    share_after = np.array([after[o]["shares"]["gender"]["female"] for o in occupations])
    wanted = np.sign(0.5 - share_before)  # the direction debiasing must move each occupation
    rows = {
        o: {
            "held_out": o in TEST_OCCUPATIONS,
            "female_share_before": round(float(share_before[i]), 4),
            "female_share_after": round(float(share_after[i]), 4),
            "text_gender_coordinate": round(float(base_coord[i]), 4),
            "lora_move_along_gender_axis": round(float(moved[i]), 4),
            "lora_relative_change": round(float(relative[i]), 4),
        }
        for i, o in enumerate(occupations)
    }

    def group(held_out: bool) -> dict:
        idx = np.array([rows[o]["held_out"] == held_out for o in occupations])
        return {
            "corr_text_coordinate_vs_female_share": round(float(np.corrcoef(base_coord[idx], share_before[idx])[0, 1]), 4),
            "moved_the_debiasing_way": int((np.sign(moved[idx]) == wanted[idx]).sum()),
            "occupations": int(idx.sum()),
            "mean_abs_move": round(float(np.abs(moved[idx]).mean()), 4),
            "mean_relative_change": round(float(relative[idx].mean()), 4),
            "mean_bias_before": round(float(np.abs(2 * share_before[idx] - 1).mean()), 4),
            "mean_bias_after": round(float(np.abs(2 * share_after[idx] - 1).mean()), 4),
        }

    result = {
        "benchmark": name,
        **environment(1),
        "run": run,
        "images_per_occupation": IMAGES,
        "hyperparameters": trained["hyperparameters"],
        "train_seconds": trained["seconds"],
        "training": group(False),
        "held_out": group(True),
        "per_occupation": rows,
    }
    publish(name, result)


if __name__ == "__main__":
    main()
