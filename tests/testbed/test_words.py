"""The lookalike occupation words: learnt against the frozen model, without changing the old words."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from adaptors.generation import GenerationSpec, generate
from common.settings import Settings
from testbed import PIPELINE_DIR
from testbed.architecture import build_tokenizer
from testbed.oracle import read_batch
from testbed.words import extend_vocabulary
from testbed.world import LOOKALIKE_OCCUPATIONS, OCCUPATIONS, look_of, prompt_for, prompt_set
from tests.support.models import load_testbed_pipeline


def test_every_lookalike_word_is_one_token_of_the_shipped_tokenizer():
    pipe = load_testbed_pipeline()
    for occ in LOOKALIKE_OCCUPATIONS:
        assert pipe.tokenizer.tokenize(occ.name) == [occ.name + "</w>"]
        assert look_of(occ.name) in {o.name for o in OCCUPATIONS[:12]}  # never a held-out look
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == len(build_tokenizer())
    assert len(prompt_set("testbed-train-wide")) == 12 + len(LOOKALIKE_OCCUPATIONS)


def test_extending_the_vocabulary_keeps_every_drawn_occupation_prompt_bit_for_bit():
    pipe = StableDiffusionPipeline.from_pretrained(str(PIPELINE_DIR))  # its own copy: the shared one stays intact
    old = [prompt_for(o.name) for o in OCCUPATIONS] + ["", "a photo of the face of an old female nurse, a person"]
    words = [prompt_for(o.name) for o in LOOKALIKE_OCCUPATIONS]
    before_old, before_words = pipe.encode_prompt(old, "cpu", 1, False)[0], pipe.encode_prompt(words, "cpu", 1, False)[0]
    ids = extend_vocabulary(pipe.text_encoder, pipe.tokenizer, build_tokenizer())
    assert len(ids) == len(LOOKALIKE_OCCUPATIONS)
    assert torch.equal(pipe.encode_prompt(old, "cpu", 1, False)[0], before_old)
    # the learnt words restart from their look's row: extending moved them, and nothing else
    assert not torch.allclose(pipe.encode_prompt(words, "cpu", 1, False)[0], before_words)


@pytest.mark.slow
def test_learnt_words_draw_their_look_with_their_own_gender_shares():
    """Two words per look with far-apart data shares: each keeps the look and leans its own way."""
    pipe, defaults = load_testbed_pipeline(), Settings()
    female = {}
    for name in ("receptionist", "bartender", "surgeon", "pharmacist"):
        spec = GenerationSpec(prompt=prompt_for(name), num_images=48, seed=77, steps=defaults.default_steps,
                              guidance_scale=defaults.default_guidance_scale)  # fmt: skip
        readings = read_batch(generate(pipe, spec, max_batch=48).numpy() * 2 - 1)
        assert np.mean([r.occupation == look_of(name) for r in readings]) >= 0.9
        people = [r for r in readings if r.person]
        female[name] = np.mean([r.gender == "female" for r in people])
    assert female["receptionist"] - female["bartender"] >= 0.3
    assert female["pharmacist"] - female["surgeon"] >= 0.3, female
