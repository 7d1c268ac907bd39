"""The LoRA soup: its change to each layer is the mean of its members' changes, and it loads as a plain LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptors.generation import load_pipeline
from adaptors.soup import _layer_factors, average_loras
from tests.adaptors.conftest import pipeline_path
from tests.adaptors.mixin import make_lora, manifest_for, run


def _changes(adaptor) -> dict[str, torch.Tensor]:
    return {p: adaptor.tensors[up] @ adaptor.tensors[down] for p, (down, up) in _layer_factors(adaptor.tensors).items()}


def test_each_layer_changes_by_the_mean_of_the_members_changes():
    members = [make_lora(str(pipeline_path()), f"m{s}", s) for s in (1, 2, 3)]
    soup = average_loras(members, manifest_for("soup", "lora"))
    changes = [_changes(m) for m in members]
    got = _changes(soup)
    assert set(got) == set(changes[0]) and len(got) > 0
    for layer, change in got.items():
        expected = sum(c[layer] for c in changes) / len(changes)
        assert torch.allclose(change, expected, atol=1e-6), layer
    ranks = {m.tensors[down].shape[0] for m in members for down, _ in _layer_factors(m.tensors).values()}
    assert {soup.tensors[down].shape[0] for down, _ in _layer_factors(soup.tensors).values()} == {3 * r for r in ranks}


def test_a_soup_of_one_adaptor_twice_generates_what_it_does_and_loads_in_plain_diffusers(pipe, tmp_path: Path):
    member = make_lora(str(pipeline_path()), "m", 1)
    member.attach(pipe)
    member.activate(pipe)
    expected = run(pipe, member)
    assert (expected - run(load_pipeline(str(pipeline_path()), device="cpu"))).abs().max() > 0.1
    soup = average_loras([member, make_lora(str(pipeline_path()), "m2", 1)], manifest_for("soup", "lora"))
    soup.save(tmp_path)
    plain = load_pipeline(str(pipeline_path()), device="cpu")
    plain.load_lora_weights(str(tmp_path))
    # rank 2r sums in another order than rank r: float rounding, carried through the sampler, not a change
    assert torch.allclose(run(plain), expected, atol=5e-3)


def test_mismatched_members_are_refused_with_a_reason():
    one = make_lora(str(pipeline_path()), "a", 1)
    with pytest.raises(ValueError, match="at least two"):
        average_loras([one], manifest_for("soup", "lora"))
    unet_only = make_lora(str(pipeline_path()), "u", 2, components=("unet",))
    with pytest.raises(ValueError, match="same layers"):
        average_loras([one, unet_only], manifest_for("soup", "lora"))
    other_base = make_lora(str(pipeline_path()), "b", 3)
    other_base.manifest.base_model = "testbed-shared-axes"
    with pytest.raises(ValueError, match="different base models"):
        average_loras([one, other_base], manifest_for("soup", "lora"))
