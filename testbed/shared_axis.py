"""A second testbed model whose text encoder holds occupation stereotypes on shared directions.

Why it exists: Shen et al.'s text-encoder LoRA generalises to occupations it never saw because
CLIP was pretrained on the whole web, so "how male an occupation word reads" lies on directions
that every occupation word shares. The main testbed's text encoder was trained from scratch on
16 occupations, each with a fixed look and fixed shares, so its UNet can read an occupation's
gender from the occupation's identity; a text-encoder finetune that debiases the 12 training
words barely moves the 4 held-out ones (benchmarks/dft_text_axis.py and fairness_dft.py measure it).

Here every occupation word's embedding row is composed, not free:
    row(word) = look[word's look] + (p_female - 0.5) * g + (p_young - 0.5) * a + (darkness - mean) * s
with one learnt vector per look and one shared direction per attribute (g, a, s), and the
diffusion model trains on all 64 occupation words: the 16 drawn ones, the 36 lookalikes of the
training looks and 12 of the held-out looks (testbed.world.HELD_OUT_LOOKALIKES, which no finetune
prompt set holds). Every look has four words with different shares, so no look fixes its
shares and the route from a word to its stereotype is the shared directions, as in a
pretrained encoder. A first version gave the held-out looks one word each; there the look
vector took up the stereotype (with the gender coordinate removed, "librarian" still came out
86% female), and a text-encoder finetune that learnt the shared rule could not undo it. The
saved pipeline is a plain StableDiffusionPipeline (the composition is folded into the rows).

    python -m testbed.train shared --out testbed/weights

A third variant, `neutral looks` (NEUTRAL_LOOK_OCCUPATIONS), keeps the drawn occupations' shares
and gives each look's three lookalike words shares that bring the look's mean to the same value
for every look (50% female, 70% young, every skin tone a quarter). On the shared-axis model each
look's words average a stereotype of their own (the pilot look's four words 25% female), so its
UNet reads part of the stereotype from the look, which no edit along the shared directions can
remove (benchmarks/shared_axis_ceiling.py: 0.22 left on the training occupations with the gender
coordinate taken out). With neutral looks the stereotype lives on the shared directions only, the
premise under which Shen et al.'s text-encoder finetune generalises; whether a finetune learns that
rule from its prompts is then what the held-out figures measure.

    python -m testbed.train neutral --diffusion-steps 5000
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils import parametrize
from transformers import CLIPTextModel, CLIPTokenizer

from common.settings import TESTBED_NEUTRAL_LOOKS, TESTBED_SHARED_AXES
from testbed.architecture import build_tokenizer
from testbed.world import ATTRIBUTES, HELD_OUT_LOOKALIKES, LOOKALIKE_OCCUPATIONS, OCCUPATIONS, Occupation, look_index

SHARED_OCCUPATIONS: tuple[Occupation, ...] = OCCUPATIONS + LOOKALIKE_OCCUPATIONS + HELD_OUT_LOOKALIKES

# what every look's four words average in the neutral-looks variant
NEUTRAL_P_FEMALE, NEUTRAL_P_YOUNG = 0.5, 0.7
NEUTRAL_SKIN_TONE = (0.25, 0.25, 0.25, 0.25)
# how far a look's three lookalikes spread around what they must average (one below, one at, one
# above, in a different order per attribute so the attributes do not move together across words)
_SPREAD = {"gender": (0.25, (-1, 0, 1)), "age": (0.12, (1, -1, 0)), "skin_tone": (0.08, (0, 1, -1))}
_DARKER = np.array([-1.0, -1 / 3, 1 / 3, 1.0])  # a zero-sum shift of a skin-tone mix towards the dark tones


def _neutral_lookalikes(drawn: Occupation, words: list[Occupation]) -> list[Occupation]:
    """The three lookalikes of `drawn`'s look with shares that bring the look's mean to the neutral one."""
    out = []
    for k, word in enumerate(words):
        (gs, gt), (ys, yt), (ss, st) = (_SPREAD[a] for a in ("gender", "age", "skin_tone"))
        p_female = (4 * NEUTRAL_P_FEMALE - drawn.p_female) / 3 + gs * gt[k]
        p_young = (4 * NEUTRAL_P_YOUNG - drawn.p_young) / 3 + ys * yt[k]
        skin = (4 * np.asarray(NEUTRAL_SKIN_TONE) - np.asarray(drawn.skin_tone)) / 3 + ss * st[k] * _DARKER
        out.append(Occupation(word.name, word.background, word.shirt, float(p_female),
                              tuple(float(v) for v in skin), float(p_young)))  # fmt: skip
    return out


def _neutral_look_table() -> tuple[Occupation, ...]:
    lookalikes = SHARED_OCCUPATIONS[len(OCCUPATIONS) :]
    table = list(OCCUPATIONS)
    for drawn in OCCUPATIONS:
        words = [w for w in lookalikes if look_index(w.name) == look_index(drawn.name)]
        table += _neutral_lookalikes(drawn, words)
    order = {o.name: i for i, o in enumerate(SHARED_OCCUPATIONS)}
    return tuple(sorted(table, key=lambda o: order[o.name]))


# the same 64 words as SHARED_OCCUPATIONS, in the same order; only the lookalikes' shares differ
NEUTRAL_LOOK_OCCUPATIONS: tuple[Occupation, ...] = _neutral_look_table()


def occupation_words(base_model: str) -> tuple[Occupation, ...] | None:
    """The word table the shared-axis model of this name (as FAIRDIFF_BASE_MODEL takes it) was built from;
    None for any other model, whose words share no axes."""
    return {TESTBED_SHARED_AXES: SHARED_OCCUPATIONS, TESTBED_NEUTRAL_LOOKS: NEUTRAL_LOOK_OCCUPATIONS}.get(base_model)


def shared_tokenizer() -> CLIPTokenizer:
    """The main vocabulary plus the held-out looks' lookalike words, which only this model knows."""
    return build_tokenizer(extra_words=[o.name for o in HELD_OUT_LOOKALIKES])


def stereotype_coordinates(occ: Occupation) -> tuple[float, float, float]:
    """Centred gender, age and skin-tone shares of an occupation: where it sits on the shared axes."""
    tones = np.arange(len(ATTRIBUTES["skin_tone"]))
    darkness = float(np.dot(occ.skin_tone, tones)) / (len(tones) - 1)
    return occ.p_female - 0.5, occ.p_young - 0.5, darkness - 0.5


class ComposedOccupationRows(torch.nn.Module):
    """Parametrization of the embedding table: occupation rows = look vector + shares x shared axes."""

    def __init__(self, token_ids: list[int], looks: list[int], coords: np.ndarray, dim: int, std: float = 0.02) -> None:
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long))
        self.register_buffer("look_index", torch.tensor(looks, dtype=torch.long))
        self.register_buffer("coords", torch.tensor(coords, dtype=torch.float32))
        self.looks = torch.nn.Parameter(torch.randn(len(OCCUPATIONS), dim) * std)
        # the axes start at the scale of a row, so a share difference is visible from the first step
        self.axes = torch.nn.Parameter(torch.randn(coords.shape[1], dim) * std * 2.0)

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        rows = self.looks[self.look_index] + self.coords @ self.axes
        return table.index_put((self.token_ids,), rows.to(table.dtype))


def compose_occupation_rows(
    text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, table: tuple[Occupation, ...] = SHARED_OCCUPATIONS
) -> ComposedOccupationRows:
    """Make every occupation word's row a composition (in place); the returned module holds its parameters."""
    vocab = tokenizer.get_vocab()
    ids, looks, coords = [], [], []
    for occ in table:
        ids.append(vocab[occ.name + "</w>"])
        looks.append(look_index(occ.name))
        coords.append(stereotype_coordinates(occ))
    embedding = text_encoder.get_input_embeddings()
    composed = ComposedOccupationRows(ids, looks, np.asarray(coords), embedding.weight.shape[1])
    parametrize.register_parametrization(embedding, "weight", composed)
    return composed


def fold_occupation_rows(text_encoder: CLIPTextModel) -> None:
    """Replace the parametrization by the plain rows it produces, so the model saves as a stock CLIP encoder."""
    parametrize.remove_parametrizations(text_encoder.get_input_embeddings(), "weight", leave_parametrized=True)
