"""GMM latent balancing: the mixture's move, the `gmm` calibration, its adaptor through the store, bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptors.assign import joint_assignment
from adaptors.generation import GenerationSpec, generate
from adaptors.gmm import GmmAdaptor, PromptMixture, generate_balanced
from adaptors.store import AdaptorStore
from adaptors.trainers import get_trainer
from adaptors.trainers.gmm import NoComponent, check_carried
from common.adaptor_matching import uncovered_class
from common.finetune_config import GMMConfig
from common.schemas import FinetuneJob
from testbed.oracle import read_batch

SENATOR = "a photo of the face of a senator, a person"
HALF = {"gender": {"female": 0.5, "male": 0.5}}
# the settings the tests calibrate at: 10 steps, moved after the 5th (as 9 of 20 by default), a small pool
SMALL = {"images": 128, "steps": 10, "at_step": 4, "eval_requests": 1, "eval_images": 4}


def _toy(classes: list[dict[str, str]]) -> PromptMixture:
    """Components at +-3 along the first of 2 latent dimensions, unit covariance, the identity as basis."""
    k = len(classes)
    means = torch.tensor([[3.0 * (1 if i % 2 else -1), 0.0] for i in range(k)])
    return PromptMixture(center=torch.zeros(2), basis=torch.eye(2), means=means,
                         precisions_cholesky=torch.eye(2).repeat(k, 1, 1), log_weights=torch.log(torch.full((k,), 1 / k)),
                         latent_means=means.clone(), classes=classes)  # fmt: skip


def test_move_replaces_the_component_mean_and_keeps_the_residual():
    mixture = _toy([{"gender": "female"}, {"gender": "male"}])
    latents = torch.tensor([[-3.2, 0.5], [3.1, -0.4]])
    post = mixture.posterior(latents)
    assert post[0, 0] > 0.99 and post[1, 1] > 0.99
    moved = mixture.move(latents, [{"gender": "male"}, {"gender": "male"}])
    assert torch.allclose(moved[0], torch.tensor([2.8, 0.5]), atol=1e-3)  # female -> male, its own residual kept
    assert torch.allclose(moved[1], latents[1], atol=1e-3)  # already in a component of its class: barely moved
    with pytest.raises(ValueError, match="no component carries"):
        mixture.move(latents, [{"gender": "female"}, {"age": "old"}])


def test_a_class_no_component_carries_is_named():
    mixture = _toy([{"gender": "male", "age": "young"}, {"gender": "male", "age": "old"}])
    with pytest.raises(NoComponent) as info:
        check_carried(mixture, HALF, SENATOR, [("male", "young")] * 3)
    assert info.value.error()["param"] == "fairness_target.gender.female"
    check_carried(mixture, {"gender": {"female": 0.0, "male": 1.0}}, SENATOR, [])  # a zero share needs none
    manifest = {"hyperparameters": {"prompts": [SENATOR], "component_classes": [mixture.classes]}}
    assert uncovered_class(manifest, SENATOR, {"age": {"young": 0.5, "old": 0.5}}) is None  # the components carry age
    assert uncovered_class(manifest, SENATOR, HALF) == "fairness_target.gender.female"
    assert uncovered_class(manifest, "another prompt", HALF) == "fairness_target.gender"


@pytest.mark.parametrize("hp, field", [({"components": 0}, "components"), ({"images": 3}, "images"),
                                       ({"at_step": 19}, "at_step"), ({"dims": 0}, "dims"),
                                       ({"covariance": "tied"}, "covariance")])  # fmt: skip
def test_bad_hyperparameters_are_refused_naming_the_field(hp, field):
    with pytest.raises(ValueError, match=f"hyperparameters.{field}"):
        GMMConfig.from_hyperparameters(hp)


@pytest.mark.slow
def test_calibration_publishes_a_gmm_adaptor_that_round_trips_and_delivers_the_assigned_counts(pipe, classifier, tmp_path: Path):
    """Senator is ~95% male: the calibration must still find components of women, publish through the store
    (hashed, verified), and moved latents must land on the assigned gender over several seeds (oracle-read)."""
    job = FinetuneJob(method="gmm", base_model="testbed", fairness_target=HALF, prompts=[SENATOR], hyperparameters=SMALL)
    store = AdaptorStore(tmp_path / "store")
    staging = store.staging_dir("gmm-senator")
    seen: list[dict] = []
    manifest = get_trainer("gmm")(job, pipe, classifier, staging, tmp_path / "ckpt", seen.append, lambda: False)
    published = store.publish(staging)
    assert published.kind == "gmm" and set(published.files) == {"gmm.safetensors"}
    assert published.sampler == {"steps": 10, "guidance_scale": 5.0, "scheduler": "DDIMScheduler"}
    row = manifest.metrics["per_prompt"][SENATOR]
    assert {"female", "male"} <= set(row["components"]), row
    assert set(row["within_one"]) == {"latent", "assign"} and row["cost_vs_none"]["latent"] < 1.5, row
    assert [p["step"] for p in seen] == [1, 2]

    adaptor = store.load("gmm-senator")
    assert isinstance(adaptor, GmmAdaptor) and adaptor.at_step == 4 and adaptor.mixture_for("other") is None
    mixture = adaptor.mixture_for(SENATOR)
    hits, total = 0, 0
    for seed in (1, 2, 3):
        spec = GenerationSpec(SENATOR, num_images=8, seed=seed, steps=10)
        assignment = joint_assignment(8, HALF, seed)
        images = generate_balanced(pipe, spec, assignment, mixture, adaptor.at_step)
        readings = read_batch(images.numpy() * 2 - 1)
        got = sum(1 for r in readings if r.person and r.gender == "female")
        assert abs(got - 4) <= 1, (seed, [r.gender for r in readings])
        hits += sum(r.person and r.gender == a["gender"] for r, a in zip(readings, assignment))
        total += 8
        assert all(r.occupation == "senator" for r in readings)
    assert hits >= 0.85 * total, hits
    # moving nothing (every image assigned the class it already has) changes little: the plain image is the start
    plain = generate(pipe, GenerationSpec(SENATOR, num_images=4, seed=9, steps=10))
    kept = [{"gender": r.gender} for r in read_batch(plain.numpy() * 2 - 1)]
    same = generate_balanced(pipe, GenerationSpec(SENATOR, num_images=4, seed=9, steps=10), kept, mixture, 4)
    assert float((same - plain).abs().mean()) < 0.1
