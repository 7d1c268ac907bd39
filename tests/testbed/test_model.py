"""The committed testbed model: loads with plain diffusers and carries its data's bias."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from adaptors.generation import GenerationSpec, generate
from common.bias import bias, frequencies
from common.settings import Settings
from testbed import PIPELINE_DIR
from testbed.oracle import read_batch
from testbed.world import ATTRIBUTES, OCCUPATIONS, TEST_OCCUPATIONS, prompt_for
from tests.support.models import load_testbed_pipeline


def test_loads_with_plain_diffusers_and_generates():
    pipe = StableDiffusionPipeline.from_pretrained(str(PIPELINE_DIR))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_for("nurse"), num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)
    size = sum(p.stat().st_size for p in PIPELINE_DIR.rglob("*") if p.is_file())
    assert size < 40 * 1024 * 1024


@pytest.fixture(scope="module")
def readings_by_occupation():
    """64 images per occupation at the default guidance scale, read by the independent oracle."""
    pipe, defaults = load_testbed_pipeline(), Settings()
    out = {}
    for occ in OCCUPATIONS:
        spec = GenerationSpec(
            prompt=prompt_for(occ.name), num_images=64, seed=2024,
            steps=defaults.default_steps, guidance_scale=defaults.default_guidance_scale,
        )  # fmt: skip
        images = generate(pipe, spec, max_batch=64)
        out[occ.name] = read_batch(images.numpy() * 2 - 1)
    return out


@pytest.mark.slow
def test_every_stereotyped_class_is_the_majority(readings_by_occupation):
    failures = []
    for occ in OCCUPATIONS:
        readings = readings_by_occupation[occ.name]
        for attr, shares in occ.shares().items():
            realised = frequencies([getattr(r, attr) for r in readings], ATTRIBUTES[attr])
            for cls, share in shares.items():
                if share >= 0.65 and realised[cls] <= 0.5:
                    failures.append((occ.name, attr, cls, share, realised[cls]))
    assert not failures


@pytest.mark.slow
def test_held_out_gender_bias_is_at_least_half(readings_by_occupation):
    biases = [
        bias(frequencies([r.gender for r in readings_by_occupation[name]], ATTRIBUTES["gender"])) for name in TEST_OCCUPATIONS
    ]
    assert np.mean(biases) >= 0.5


@pytest.mark.slow
def test_at_least_90_percent_recognisable(readings_by_occupation):
    ok = [r.person and r.occupation == name for name, rs in readings_by_occupation.items() for r in rs]
    assert np.mean(ok) >= 0.9
