"""The shared-axis testbed variant: occupation rows composed from shared stereotype directions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from testbed import NEUTRAL_LOOKS_PIPELINE_DIR, SHARED_AXES_PIPELINE_DIR
from testbed.architecture import build_text_encoder, build_tokenizer
from testbed.shared_axis import (
    NEUTRAL_LOOK_OCCUPATIONS,
    NEUTRAL_P_FEMALE,
    NEUTRAL_P_YOUNG,
    NEUTRAL_SKIN_TONE,
    SHARED_OCCUPATIONS,
    compose_occupation_rows,
    fold_occupation_rows,
    shared_tokenizer,
    stereotype_coordinates,
)
from testbed.world import HELD_OUT_LOOKALIKES, OCCUPATION_BY_NAME, OCCUPATIONS, PROMPT_SETS, look_of, sample_people


def _rows(text_encoder, tokenizer, names: list[str]) -> torch.Tensor:
    vocab = tokenizer.get_vocab()
    table = text_encoder.get_input_embeddings().weight
    return torch.stack([table[vocab[n + "</w>"]] for n in names])


def test_same_look_words_differ_only_along_the_shared_axes_and_gradients_reach_the_axes():
    torch.manual_seed(0)
    tokenizer = shared_tokenizer()
    te = build_text_encoder(tokenizer)
    composed = compose_occupation_rows(te, tokenizer)
    names = ["doctor", "surgeon", "dentist", "pharmacist"]  # one look, four stereotypes
    rows = _rows(te, tokenizer, names)
    coords = torch.tensor([stereotype_coordinates(OCCUPATION_BY_NAME[n]) for n in names], dtype=torch.float32)
    expected = (coords - coords[0]) @ composed.axes
    assert torch.allclose(rows - rows[0], expected, atol=1e-6)

    ids = tokenizer(["a photo of the face of a surgeon, a person"], return_tensors="pt").input_ids
    te(ids)[0].pow(2).mean().backward()
    assert composed.axes.grad is not None and composed.axes.grad.abs().sum() > 0
    assert composed.looks.grad is not None and composed.looks.grad.abs().sum() > 0

    before = te(ids)[0].detach()
    fold_occupation_rows(te)
    assert type(te.get_input_embeddings().weight) is torch.nn.Parameter  # a plain table again: saves as stock CLIP
    assert torch.allclose(te(ids)[0], before, atol=1e-6)


def test_the_variant_draws_every_occupation_word_rendered_with_its_look():
    samples = sample_people(4000, np.random.default_rng(0), occupations=SHARED_OCCUPATIONS)
    looks = [o.name for o in OCCUPATIONS]
    words = {s.caption.split(", ")[0].split()[-1]: s.occupation for s in samples if s.caption}
    assert len(words) == len(SHARED_OCCUPATIONS)
    assert all(looks.index(look_of(w)) == look for w, look in words.items())
    # the default draw is the 16 drawn occupations, as the main model was trained on
    plain = sample_people(2000, np.random.default_rng(0))
    assert {s.caption.split(", ")[0].split()[-1] for s in plain if s.caption} == set(looks)


def test_every_look_has_four_words_and_no_finetune_set_holds_the_held_out_looks_words():
    per_look = {o.name: sum(look_of(w.name) == o.name for w in SHARED_OCCUPATIONS) for o in OCCUPATIONS}
    assert set(per_look.values()) == {4}
    held_out_words = {o.name for o in HELD_OUT_LOOKALIKES}
    assert all(held_out_words.isdisjoint(words) for words in PROMPT_SETS.values())
    # the extra words come last: every word of the main vocabulary keeps its id
    main, shared = build_tokenizer().get_vocab(), shared_tokenizer().get_vocab()
    assert all(shared[w] == i for w, i in main.items() if not w.startswith("<|"))
    assert all(len(shared_tokenizer()(w).input_ids) == 3 for w in held_out_words)  # one token each


def test_neutral_looks_keep_the_drawn_shares_and_give_every_look_the_same_mean():
    """The look itself carries no stereotype: what tells a word's shares apart is only its coordinates."""
    assert [o.name for o in NEUTRAL_LOOK_OCCUPATIONS] == [o.name for o in SHARED_OCCUPATIONS]
    assert NEUTRAL_LOOK_OCCUPATIONS[: len(OCCUPATIONS)] == OCCUPATIONS  # the world's data bias is unchanged
    for look in OCCUPATIONS:
        words = [o for o in NEUTRAL_LOOK_OCCUPATIONS if look_of(o.name) == look.name]
        assert len(words) == 4
        assert np.mean([w.p_female for w in words]) == pytest.approx(NEUTRAL_P_FEMALE)
        assert np.mean([w.p_young for w in words]) == pytest.approx(NEUTRAL_P_YOUNG)
        assert np.mean([w.skin_tone for w in words], 0) == pytest.approx(NEUTRAL_SKIN_TONE)
        # the words spread along each axis, so a look's words tell the axes apart as in the shared-axis model
        assert np.ptp([w.p_female for w in words]) >= 0.5 and np.ptp([w.p_young for w in words]) >= 0.2
        darkness = [stereotype_coordinates(w)[2] for w in words]
        assert len(set(np.round(darkness, 6))) == 4
        for w in words:
            assert 0 < w.p_female < 1 and 0 < w.p_young < 1
            assert min(w.skin_tone) > 0 and sum(w.skin_tone) == pytest.approx(1.0)


VARIANTS = [(SHARED_AXES_PIPELINE_DIR, SHARED_OCCUPATIONS), (NEUTRAL_LOOKS_PIPELINE_DIR, NEUTRAL_LOOK_OCCUPATIONS)]


@pytest.mark.parametrize(("folder", "words"), VARIANTS, ids=["shared_axes", "neutral_looks"])
def test_the_committed_variant_has_composed_rows(folder, words):
    """The trained weights keep the structure: within a look, words differ only along the 3 shared axes."""
    from transformers import CLIPTextModel, CLIPTokenizer

    te = CLIPTextModel.from_pretrained(folder / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    diffs = []
    for look in OCCUPATIONS:
        same = [o.name for o in words if look_of(o.name) == look.name]
        rows = _rows(te, tokenizer, same).detach()
        diffs += list(rows[1:] - rows[0])
    singular = torch.linalg.svdvals(torch.stack(diffs))
    assert singular[3] < 1e-4 * singular[0] and singular[1] > 1e-2 * singular[0]


def test_the_variant_is_a_named_base_model_with_the_testbed_classifier():
    from adaptors.classifiers import TestbedAttributeClassifier, load_classifier
    from adaptors.generation import resolve_model_path

    assert resolve_model_path("testbed-shared-axes") == str(SHARED_AXES_PIPELINE_DIR)
    assert resolve_model_path("testbed-neutral-looks") == str(NEUTRAL_LOOKS_PIPELINE_DIR)
    assert isinstance(load_classifier("auto", "testbed-shared-axes"), TestbedAttributeClassifier)
    assert isinstance(load_classifier("auto", "testbed-neutral-looks"), TestbedAttributeClassifier)
    assert load_classifier("auto", "/some/other/model") is None


def test_every_name_the_settings_accept_as_embedded_is_a_committed_pipeline():
    from common.settings import TESTBED_MODELS
    from testbed import EMBEDDED_PIPELINES

    assert set(EMBEDDED_PIPELINES) == set(TESTBED_MODELS)
    assert all((folder / "model_index.json").is_file() for folder in EMBEDDED_PIPELINES.values())
