"""The generation core: per-image seeds, chunking, devices, cancellation."""

import pytest
import torch

from adaptors.generation import GenerationCancelled, GenerationSpec, generate, image_seed, resolve_device
from tests.support.models import load_testbed_pipeline

PROMPT = "a photo of the face of a chef, a person"


def test_image_i_is_the_same_whatever_the_batch():
    pipe = load_testbed_pipeline()
    whole = generate(pipe, GenerationSpec(PROMPT, num_images=6, seed=5, steps=6), max_batch=6)
    chunked = generate(pipe, GenerationSpec(PROMPT, num_images=6, seed=5, steps=6), max_batch=4)
    tail = generate(pipe, GenerationSpec(PROMPT, num_images=2, seed=5, steps=6, start_index=4), max_batch=8)
    assert torch.allclose(whole, chunked, atol=1e-4)
    assert torch.allclose(whole[4:], tail, atol=1e-4)
    other = generate(pipe, GenerationSpec(PROMPT, num_images=1, seed=6, steps=6))
    assert (other[0] - whole[0]).abs().max() > 0.05


def test_seeds_do_not_collide_like_seed_plus_index():
    assert image_seed(7, 1) != image_seed(8, 0)
    assert image_seed(7, 1) == image_seed(7, 1)


def test_cpu_is_fp32():
    device, dtype = resolve_device("cpu")
    assert device.type == "cpu" and dtype == torch.float32


def test_progress_and_cancel_between_steps():
    pipe = load_testbed_pipeline()
    seen = []

    def on_step(step, total):
        seen.append((step, total))
        if step == 3:
            raise GenerationCancelled

    with pytest.raises(GenerationCancelled):
        generate(pipe, GenerationSpec(PROMPT, num_images=2, steps=10), on_step=on_step)
    assert seen == [(1, 10), (2, 10), (3, 10)]


def test_unknown_local_model_is_a_clear_error(tmp_path):
    from adaptors.generation import load_pipeline

    with pytest.raises(FileNotFoundError, match="cannot load base model"):
        load_pipeline(str(tmp_path / "nothing-here"))


def test_hub_id_offline_fails_fast_with_a_hint():
    from adaptors.generation import load_pipeline

    with pytest.raises(FileNotFoundError, match="offline"):
        load_pipeline("nobody/not-a-cached-model", offline=True)
