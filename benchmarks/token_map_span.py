"""Does a linear map on the token embeddings, fitted on the training words, carry the rule to held-out words? One JSON object.

The `token_map` finetune (adaptors.trainers.trainable.TokenMapTrainable) learns one linear map for every
token; its read is confined to the span of the training prompts' token embeddings. This benchmark checks,
with no training and no images, what that confinement is for: on a shared-axis model the exact gender rule
is known (each occupation word moves by minus its gender coordinate along the gender axis; the prompt's
other tokens stay), so the least-squares map that applies it to the training prompts' tokens can be
computed in closed form, free, confined to their span, or confined to the words that vary between them
(`token_map_read: varying`), and set against the rule on the held-out words. `projection_of_the_axis` is
the symmetric map (`token_map_form: symmetric`) that takes the unit gender axis out of every token, and
`measured_axis_cosine` how close to that axis `token_map_init: measured` starts it.
`relative_error` is |map change - rule change| / |rule change| per held-out word; `gender_move` is the map's
change of the word's gender coordinate (the rule's is minus the coordinate).

    python benchmarks/token_map_span.py [--model neutral-looks|shared-axes]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fairness_dft import WIDE  # noqa: E402
from benchmarks.results_io import environment, publish, weights_fingerprint  # noqa: E402
from benchmarks.shared_axis_ceiling import MODELS, shared_axes  # noqa: E402


def fitted_map_figures(pipe, words: tuple) -> dict:
    from adaptors.trainers.trainable import measured_directions, prompt_span, varying_word_embeddings
    from testbed.world import PROMPT_SETS, TEST_OCCUPATIONS, prompt_set

    prompts = list(prompt_set(WIDE))
    ids, coords, axes, _ = shared_axes(pipe, words)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().double().numpy()
    row_of = {o.name: ids[i] for i, o in enumerate(words)}
    rule = {o.name: -coords[i, 0] * axes[0] for i, o in enumerate(words)}  # the gender coordinate taken out
    tokens = pipe.tokenizer(prompts + [""], padding="max_length", truncation=True, return_tensors="np").input_ids
    seen = np.unique(tokens)
    change_of = {row_of[name]: rule[name] for name in rule}
    x = table[seen]
    y = np.stack([change_of.get(int(t), np.zeros(table.shape[1])) for t in seen])  # every other token stays
    basis = prompt_span(pipe, prompts).double().numpy()
    varying = prompt_span(pipe, prompts, varying_only=True).double().numpy()  # token_map_read: varying
    fits = {"free": np.linalg.pinv(x) @ y, "confined_to_span": basis @ np.linalg.pinv(x @ basis) @ y,
            "confined_to_varying": varying @ np.linalg.pinv(x @ varying) @ y}  # fmt: skip
    # the symmetric token map's form (token_map_form: symmetric) at its best guess: the unit gender axis, as the
    # span can read it, taken out of every token; not a fit, so its training error is what the form costs
    axis = basis @ (basis.T @ axes[0])
    axis /= np.linalg.norm(axis)
    fits["projection_of_the_axis"] = -np.outer(axis, axis)
    out: dict = {"training_tokens": len(seen), "embedding_dim": int(table.shape[1]), "span_dim": int(basis.shape[1]),
                 "varying_dim": int(varying.shape[1])}  # fmt: skip
    readout = np.linalg.pinv(axes)[:, 0]  # the gender coordinate of a change
    for name, fit in fits.items():
        held = {o: table[row_of[o]] @ fit for o in TEST_OCCUPATIONS}
        error = {o: np.linalg.norm(d - rule[o]) / np.linalg.norm(rule[o]) for o, d in held.items()}
        out[name] = {
            "training_relative_error": round(float(np.linalg.norm(x @ fit - y) / np.linalg.norm(y)), 4),
            "relative_error": {o: round(float(e), 3) for o, e in error.items()},
            "gender_move": {o: round(float(d @ readout), 3) for o, d in held.items()},
        }
    out["rule_gender_move"] = {o: round(float(rule[o] @ readout), 3) for o in TEST_OCCUPATIONS}
    # where `token_map_init: measured` starts the symmetric map, from the training words' true shares (the
    # finetune measures them from the base model's images): how close its first direction is to the axis
    share_of = {o.name: o.p_female for o in words}
    leaning = np.array([[share_of[o] - 0.5] for o in PROMPT_SETS[WIDE]])  # in prompt_set(WIDE)'s order
    found, _ = measured_directions(varying_word_embeddings(pipe, prompts) @ basis, leaning)
    out["measured_axis_cosine"] = round(float(abs((basis @ found[:, 0]) @ axis)), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="neutral-looks")
    args = parser.parse_args()
    from adaptors.generation import load_pipeline, resolve_model_path
    from testbed.shared_axis import occupation_words

    base = MODELS[args.model]
    pipe = load_pipeline(base, device="cpu")
    figures = fitted_map_figures(pipe, occupation_words(base))
    key = args.model.replace("-", "_")
    result = {"benchmark": "token_map_span", **environment(1),
              key: {**figures, "base_weights": weights_fingerprint(resolve_model_path(base))}}  # fmt: skip
    publish("token_map_span", result, merge=True)


if __name__ == "__main__":
    main()
