"""IDA: the adaptor kind, the directed-generation primitive it shares with `assign`, and calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptors.assign import class_texts_for_testbed, generate_directed
from adaptors.generation import GenerationSpec, generate
from adaptors.ida import IdaAdaptor
from adaptors.loading import load_adaptor
from adaptors.trainers import get_trainer
from adaptors.trainers.ida import IDAConfig
from common.adaptor_manifest import AdaptorManifest
from common.schemas import FinetuneJob

SECRETARY = "a photo of the face of a secretary, a person"
HALF = {"gender": {"female": 0.5, "male": 0.5}}


def _manifest(adaptor_id: str = "ida-test") -> AdaptorManifest:
    return AdaptorManifest(id=adaptor_id, kind="ida", base_model="testbed", attributes=["gender"], target=HALF,
                           sampler={"steps": 4, "guidance_scale": 5.0, "warmup_steps": 1})  # fmt: skip


def test_adaptor_round_trip_and_lookup(tmp_path: Path):
    weights = [{"gender": {"female": 3.0, "male": -3.0}}, {"gender": {"female": -1.5, "male": 1.5}}]
    adaptor = IdaAdaptor.build(_manifest(), [SECRETARY, "other"], weights, class_texts_for_testbed())
    adaptor.save(tmp_path / "a")
    loaded = load_adaptor(tmp_path / "a")
    assert isinstance(loaded, IdaAdaptor) and loaded.warmup_steps == 1
    assert loaded.weights_for("other") == {"gender": {"female": -1.5, "male": 1.5}}
    assert loaded.weights_for("unseen") is None and loaded.directions("unseen") is None
    rows = loaded.directions(SECRETARY)
    assert rows == [("a photo of the face of a female secretary, a person", 3.0),
                    ("a photo of the face of a male secretary, a person", -3.0)]  # fmt: skip


@pytest.mark.parametrize("tensor", [torch.zeros(1, 2), torch.zeros(2, 3), torch.tensor([[0.0, float("nan")], [0, 0]])])
def test_adaptor_refuses_bad_weights(tensor):
    manifest = _manifest()
    manifest.hyperparameters = {"prompts": ["a", "b"], "classes": {"gender": ["female", "male"]},
                                "class_texts": {"words": {"gender": {"female": "female", "male": "male"}}}}  # fmt: skip
    with pytest.raises(ValueError, match="ida adaptor"):
        IdaAdaptor(manifest, {"weights": tensor})


def test_directed_generation_with_no_directions_is_plain_generation(pipe):
    spec = GenerationSpec(SECRETARY, num_images=3, seed=4, steps=4)
    plain = generate(pipe, spec)
    assert torch.allclose(generate_directed(pipe, spec, [[]] * 3), plain, atol=1e-5)
    zero = [[("a photo of the face of a male secretary, a person", 0.0)]] * 3
    assert torch.allclose(generate_directed(pipe, spec, zero), plain, atol=1e-5)
    moved = generate_directed(pipe, spec, [[("a photo of the face of a male secretary, a person", 8.0)]] * 3)
    assert not torch.allclose(moved, plain, atol=1e-3)
    with pytest.raises(ValueError, match="directions"):
        generate_directed(pipe, spec, [[]])


def test_hyperparameters_are_checked():
    assert IDAConfig.from_hyperparameters({"solver": "policy_gradient"}).solver == "policy_gradient"
    for bad in ({"solver": "adam"}, {"step": 0}, {"images_per_iteration": 0}, {"lr": 1}):
        with pytest.raises(ValueError, match="hyperparameters"):
            IDAConfig.from_hyperparameters(bad)


def _calibrate(pipe, classifier, tmp_path: Path, name: str, **hp):
    job = FinetuneJob(method="ida", base_model="testbed", fairness_target=HALF, prompts=[SECRETARY],
                      hyperparameters={"images_per_iteration": 32, "max_iterations": 4, "steps": 6, "eval_images": 48,
                                       "kl_threshold": 0.0, **hp})  # fmt: skip
    seen: list[dict] = []
    manifest = get_trainer("ida")(job, pipe, classifier, tmp_path / name, tmp_path / f"{name}.ckpt", seen.append, lambda: False)
    return manifest, seen


def test_calibration_moves_a_biased_prompt_towards_the_target_on_held_out_seeds(pipe, classifier, tmp_path: Path):
    """secretary is ~95% female in the base model; four IDA iterations must cut the KL to 50/50."""
    manifest, seen = _calibrate(pipe, classifier, tmp_path, "ida")
    row = manifest.metrics["per_prompt"][SECRETARY]
    assert [p["iteration"] for p in seen] == [1, 2, 3, 4] and seen[-1]["total"] == 4
    assert row["kl_before"] > 0.15, row
    assert row["kl_after"] < row["kl_before"] / 2, row
    assert row["weights"]["gender"]["male"] > 0 > row["weights"]["gender"]["female"]
    assert manifest.sampler == {"steps": 6, "guidance_scale": 5.0, "warmup_steps": 0, "scheduler": "DDIMScheduler"}
    adaptor = load_adaptor(tmp_path / "ida")
    assert isinstance(adaptor, IdaAdaptor)
    assert adaptor.weights_for(SECRETARY)["gender"] == pytest.approx(row["weights"]["gender"], abs=1e-3)
    assert manifest.metrics["images_generated"] == 4 * 32 + 2 * 48


def test_policy_gradient_baseline_spends_the_same_budget(pipe, classifier, tmp_path: Path):
    manifest, seen = _calibrate(pipe, classifier, tmp_path, "pg", solver="policy_gradient", pg_samples=4)
    assert len(seen) == 4 and manifest.metrics["images_generated"] == 4 * 32 + 2 * 48
    assert manifest.hyperparameters["solver"] == "policy_gradient"
