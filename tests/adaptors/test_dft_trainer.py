"""The `dft` trainer (and `prefix`, the same trainer on prefix tokens): targets, gradients, resume, output.

Tiny settings pin the plumbing in seconds; `test_a_short_finetune_moves_the_distribution` is a
real (small) finetune whose effect is measured by the classifier on fixed seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptors.generation import GenerationCancelled, GenerationSpec, generate, initial_latents
from adaptors.loading import load_adaptor
from adaptors.lora import LoraAdaptor, loaded_adapters
from adaptors.prefix import PrefixAdaptor
from adaptors.store import AdaptorStore
from adaptors.trainers import TRAINERS, get_trainer
from adaptors.trainers.alignment import alignment_targets
from adaptors.trainers.dft import DFTConfig, DFTLosses, attribute_region
from adaptors.trainers.sampling import sample, step_scales
from adaptors.trainers.trainable import TEXT_ENCODER_MODULES, UNET_MODULES, make_trainable
from common.finetune_config import TEXT_ENCODER_MODULE_CHOICES, UNET_MODULE_CHOICES
from common.schemas import FinetuneJob

DOCTOR = "a photo of the face of a doctor, a person"
NURSE = "a photo of the face of a nurse, a person"
TARGET = {"gender": {"female": 0.5, "male": 0.5}}
# the plumbing's settings: 2 evaluation steps draw images too rough for the subject gate to judge (test_subject_gate)
TINY = {"iterations": 2, "steps": 2, "images_per_prompt": 2, "prompts_per_iteration": 1, "eval_images": 2, "eval_steps": 2,
        "checkpoint_every": 1, "rank": 2, "min_subject_kept": 0, "min_fairness_gain": 0}  # fmt: skip


def _job(method: str = "dft", target: dict | None = None, prompts: list[str] | None = None, **hp) -> FinetuneJob:
    return FinetuneJob(method=method, base_model="testbed", fairness_target=target or TARGET,
                       prompts=prompts or [DOCTOR, NURSE], hyperparameters={**TINY, **hp}, name="Fair doctors")  # fmt: skip


def _run(job, pipe, classifier, tmp_path: Path, name: str = "out", stop=lambda: False, seen=None):
    return get_trainer(job.method)(job, pipe, classifier, tmp_path / name, tmp_path / f"{name}.ckpt",
                                   (seen if seen is not None else []).append, stop)  # fmt: skip


def test_the_torch_free_config_accepts_exactly_the_module_names_the_trainable_maps():
    assert tuple(TEXT_ENCODER_MODULES) == TEXT_ENCODER_MODULE_CHOICES and tuple(UNET_MODULES) == UNET_MODULE_CHOICES


def test_registered():
    assert {"dft", "prefix"} <= set(TRAINERS)
    with pytest.raises(KeyError, match="nope"):
        get_trainer("nope")


@pytest.mark.parametrize(
    "bad, field",
    [({"learning_rate": 1}, "hyperparameters: unknown"), ({"iterations": "3"}, "iterations"), ({"iterations": 0}, "iterations"),
     ({"rank": 2.5}, "rank"), ({"train": "vae"}, "train"), ({"adjusted": 1}, "adjusted"), ({"confidence": 1.5}, "confidence"),
     ({"steps": 4, "steps_jitter": 4}, "steps_jitter"), ({"ce_temperature": 0}, "ce_temperature"),
     ({"text_encoder_modules": "mlp"}, "text_encoder_modules"), ({"unet_modules": "all"}, "unet_modules"),
     ({"preserve_region": "none"}, "preserve_region"),
     # knobs the research measured no gain for are not the product's: unknown, so a request naming one is refused
     ({"text_encoder_modules": "token_map"}, "text_encoder_modules"), ({"text_encoder_modules": "last_layer"},
                                                                       "text_encoder_modules"),
     ({"unet_modules": "cross_attention_out"}, "unet_modules"), ({"prompt_noise": 0.5}, "hyperparameters: unknown"),
     ({"prompt_mixing": 0.5}, "hyperparameters: unknown"), ({"token_map_read": "span"}, "hyperparameters: unknown"),
     ({"lr_schedule": "cosine"}, "hyperparameters: unknown"),
     # values that would crash the worker after minutes, or train with something other than was asked
     ({"weight_decay": -1}, "weight_decay"), ({"steps_jitter": -2}, "steps_jitter"), ({"eval_images": 0}, "eval_images"),
     ({"eval_steps": 0}, "eval_steps"), ({"guidance_scale": 0.5}, "guidance_scale"), ({"lr": -1}, "lr"),
     ({"preserve_pixel_weight": -3}, "preserve_pixel_weight"), ({"max_grad_norm": -1}, "max_grad_norm"),
     ({"ema_decay": 1.0}, "ema_decay"), ({"ce_temperature": float("nan")}, "ce_temperature: must be a finite"),
     ({"lr": float("inf")}, "lr: must be a finite"), ({"min_subject_kept": 1.5}, "min_subject_kept"),
     ({"target_draws": -1}, "target_draws")],
)  # fmt: skip
def test_hyperparameters_are_checked(bad, field):
    with pytest.raises(ValueError, match=field):
        DFTConfig.from_hyperparameters(bad)


def test_learning_rate_default_depends_on_what_is_trained():
    assert DFTConfig.from_hyperparameters({}).lr == pytest.approx(1e-2)
    assert DFTConfig.from_hyperparameters({"train": "prefix"}).lr == pytest.approx(2e-2)
    assert DFTConfig.from_hyperparameters({"lr": 1e-4, "adjusted": False}).lr == pytest.approx(1e-4)


SHARES = {"gender": np.array([0.5, 0.5])}


def test_alignment_relabels_the_least_confident_images():
    probs = {"gender": np.array([[0.95, 0.05], [0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])}
    targets = alignment_targets(probs, SHARES, draws=0)
    assert targets.labels["gender"].tolist() == [0, 0, 1, 1]  # the two least female become male


def test_alignment_drops_an_uncertain_target():
    """With drawn counts the middle image of three flips between classes: it gets no target."""
    probs = {"gender": np.array([[0.99, 0.01], [0.5, 0.5], [0.01, 0.99]])}
    targets = alignment_targets(probs, SHARES, draws=200, confidence=0.8, rng=np.random.default_rng(0))
    assert targets.labels["gender"].tolist() == [0, -1, 1]
    assert targets.dropped() == 1 and targets.certainty["gender"][0] > 0.8


@pytest.mark.parametrize("females, confidence, flips", [(3, 0.8, 0), (2, 0.8, 1), (3, 0.5, 1)])
def test_alignment_stops_pushing_near_the_target_at_confidence_0_8(females, confidence, flips):
    """8 saturated images, 50/50: at C 0.8 a batch of 3 female gets no image to flip (drawn counts below 4
    are too likely), at 2 female one; C 0.5 flips one at 3. This is why the push fades before 50/50."""
    rng = np.random.default_rng(0)
    p_female = np.r_[np.linspace(0.999, 0.98, females), np.linspace(0.02, 0.001, 8 - females)]
    probs = {"gender": np.stack([p_female, 1 - p_female], 1)}
    labels = alignment_targets(probs, SHARES, draws=100, confidence=confidence, rng=rng).labels["gender"]
    assert int(((labels == 0) & (np.arange(8) >= females)).sum()) == flips  # male images told to become female
    assert not ((labels == 1) & (np.arange(8) < females)).any()  # no female image told to become male


def test_alignment_is_joint_and_follows_non_uniform_targets():
    rng = np.random.default_rng(1)
    n = 16
    gender = rng.dirichlet([1, 1], n)
    age = rng.dirichlet([1, 1], n)
    shares = {"gender": np.array([0.5, 0.5]), "age": np.array([0.75, 0.25])}
    targets = alignment_targets({"gender": gender, "age": age}, shares, draws=0)
    assert np.bincount(targets.labels["gender"], minlength=2).tolist() == [8, 8]
    assert np.bincount(targets.labels["age"], minlength=2).tolist() == [12, 4]
    # jointly: old images split evenly between the genders (product of the marginals)
    old = targets.labels["age"] == 1
    assert np.bincount(targets.labels["gender"][old], minlength=2).tolist() == [2, 2]


@pytest.mark.parametrize("region, spared", [("all", True), ("flipped", False)])
def test_preserve_region_all_lets_every_image_change_inside_the_attribute_region(pipe, classifier, region, spared):
    """With `preserve_region: all` a change confined to the attribute's region costs no preservation on
    any image, flipped or not; with "flipped" the images that keep their class pay for it in full."""
    frozen = generate(pipe, GenerationSpec(prompt=DOCTOR, num_images=4, seed=3, steps=4))
    inside = attribute_region(classifier, frozen, ["gender"], 0.3)
    moved = frozen + 0.05 * inside * torch.randn(frozen.shape, generator=torch.Generator().manual_seed(0))
    cfg = DFTConfig.from_hyperparameters({"preserve_region": region, "preserve_feature_weight": 0.0, "person_weight": 0.0})
    _, info = DFTLosses(cfg, {"gender": np.array([0.5, 0.5])}, classifier).losses(moved, frozen, 1, np.random.default_rng(0))
    assert info["flips"] < 4  # some image keeps its class, so "flipped" has an image to charge
    assert (info["preserve"] == 0.0) is spared
    assert (moved != frozen).flatten(1).any(1).all()


def test_step_scales_are_standardised(pipe):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    scales = step_scales(scheduler, scheduler.timesteps)
    assert scales.log().mean().exp().item() == pytest.approx(1.0, abs=1e-5)
    t = int(scheduler.timesteps[3])
    abar, beta = scheduler.alphas_cumprod[t].double(), scheduler.betas[t].double()
    raw = step_scales(scheduler, scheduler.timesteps[3:4])  # one step: standardised to exactly 1
    assert raw.item() == pytest.approx(1.0)
    c = abar.sqrt() * (1 - abar).sqrt() / beta
    cs = [float(scheduler.alphas_cumprod[int(s)].sqrt() * (1 - scheduler.alphas_cumprod[int(s)]).sqrt() / scheduler.betas[int(s)])
          for s in scheduler.timesteps]  # fmt: skip
    assert scales[3].item() == pytest.approx(float(c) / float(np.exp(np.mean(np.log(cs)))), rel=1e-4)


def test_gradients_reach_the_lora_and_the_adjustment_changes_only_them(pipe):
    trainable = make_trainable(pipe, "text_encoder", rank=2, num_tokens=5, seed=0, init_scale=0.1)
    with torch.no_grad():  # B starts at 0: give it a value so the gradient wrt A is not trivially 0
        for p in trainable.params:
            p.add_(torch.randn_like(p) * 0.01)
    latents = initial_latents(pipe, 0, range(2), 32, 32)
    grads, images = {}, {}
    for adjusted in (True, False):
        for p in trainable.params:
            p.grad = None
        out = sample(pipe, trainable.encode([DOCTOR] * 2), trainable.encode_negative([""] * 2), latents, 3, 5.0, adjusted)
        out.mean().backward()
        grads[adjusted] = torch.cat([p.grad.flatten() for p in trainable.params])
        images[adjusted] = out.detach()
    assert torch.equal(images[True], images[False])
    assert torch.isfinite(grads[True]).all() and grads[True].abs().sum() > 0
    assert not torch.allclose(grads[True], grads[False])
    trainable.remove()
    assert not any(loaded_adapters(pipe).values())


def test_plain_dft_also_differentiates_the_denoiser_in_its_latent_input(pipe):
    """At one step the rescaling is exactly 1, so the two variants differ only in the detached input: the weights
    get the same gradient, the starting latents a different one (plain adds the denoiser's Jacobian)."""
    trainable = make_trainable(pipe, "text_encoder", rank=2, num_tokens=5, seed=0, init_scale=0.1)
    with torch.no_grad():
        for p in trainable.params:
            p.add_(torch.randn_like(p) * 0.01)
    grads = {}
    for adjusted in (True, False):
        for p in trainable.params:
            p.grad = None
        latents = initial_latents(pipe, 0, range(2), 32, 32).requires_grad_(True)
        sample(pipe, trainable.encode([DOCTOR] * 2), None, latents, 1, 1.0, adjusted).mean().backward()
        grads[adjusted] = (torch.cat([p.grad.flatten() for p in trainable.params]), latents.grad.clone())
    assert torch.allclose(grads[True][0], grads[False][0], rtol=1e-4, atol=1e-9)
    assert not torch.allclose(grads[True][1], grads[False][1], rtol=1e-3)
    trainable.remove()


def test_stop_then_resume_equals_an_uninterrupted_run(pipe, classifier, tmp_path: Path):
    store = AdaptorStore(tmp_path / "store")
    staging = store.staging_dir("fair-doc")
    seen: list[dict] = []
    with pytest.raises(GenerationCancelled):
        get_trainer("dft")(_job(), pipe, classifier, staging, tmp_path / "ckpt", seen.append, lambda: len(seen) >= 1)
    assert [p["iteration"] for p in seen] == [1] and seen[0]["total"] == 2
    assert {"loss", "align", "preserve", "batch_bias", "no_person", "no_target", "grad_norm"} <= set(seen[0])
    assert json.loads((tmp_path / "ckpt" / "trainer_checkpoint.json").read_text())["iteration"] == 1
    assert not (staging / "manifest.json").exists() and store.list() == []
    assert not any(loaded_adapters(pipe).values()), "a stopped job leaves the pipeline as it was"

    resumed: list[dict] = []
    manifest = get_trainer("dft")(_job(), pipe, classifier, staging, tmp_path / "ckpt", resumed.append, lambda: False)
    assert [p["iteration"] for p in resumed] == [2]
    assert manifest.id == "fair-doc" and manifest.kind == "lora" and manifest.target == TARGET
    assert set(manifest.metrics) >= {"before", "after", "semantics", "eval_prompts"}
    published = store.publish(staging)
    adaptor = store.load(published.id)
    assert isinstance(adaptor, LoraAdaptor) and adaptor.components() == ["text_encoder"]

    whole: list[dict] = []
    _run(_job(), pipe, classifier, tmp_path, "straight", seen=whole)
    assert [p["iteration"] for p in whole] == [1, 2]
    assert whole[1]["loss"] == pytest.approx(resumed[0]["loss"], abs=1e-4)
    straight = load_adaptor(tmp_path / "straight").tensors
    assert all(torch.allclose(straight[k], adaptor.tensors[k], atol=1e-5) for k in straight)


def test_training_leaves_the_pipeline_as_it_was_and_plain_diffusers_loads_the_lora(pipe, classifier, tmp_path: Path):
    spec = GenerationSpec(DOCTOR, num_images=2, seed=3, steps=3)
    before = generate(pipe, spec)
    _run(_job(train="both", iterations=1, lr=0.05), pipe, classifier, tmp_path)
    assert not any(loaded_adapters(pipe).values())
    assert torch.allclose(generate(pipe, spec), before, atol=1e-6)

    adaptor = load_adaptor(tmp_path / "out")
    assert adaptor.components() == ["text_encoder", "unet"]
    pipe.load_lora_weights(str(tmp_path / "out"), adapter_name="plain")  # stock diffusers, no fairdiff code
    assert not torch.allclose(generate(pipe, spec), before, atol=1e-4)


@pytest.mark.parametrize("modules, projections", [("cross_attention_kv", {"to_k", "to_v"})])
def test_cross_attention_modules_train_only_the_projections_they_name(pipe, classifier, tmp_path, modules, projections):
    _run(_job(train="unet", unet_modules=modules, iterations=1, lr=0.05), pipe, classifier, tmp_path)
    keys = list(load_adaptor(tmp_path / "out").tensors)
    assert keys and all(k.startswith("unet.") and ".attn2.to_" in k for k in keys)
    assert {k.split(".attn2.")[1].split(".")[0] for k in keys} == projections
    assert not any(loaded_adapters(pipe).values())


def test_prefix_method_trains_prefix_tokens(pipe, classifier, tmp_path: Path):
    manifest = _run(_job("prefix", num_tokens=3, iterations=1, lr=0.5), pipe, classifier, tmp_path)
    adaptor = load_adaptor(tmp_path / "out")
    assert isinstance(adaptor, PrefixAdaptor) and adaptor.num_tokens == 3 and manifest.kind == "prefix_tokens"
    with pytest.raises(ValueError, match="hyperparameters.train"):
        _run(_job("prefix", train="text_encoder"), pipe, classifier, tmp_path, "other")


def test_an_unknown_attribute_is_refused(pipe, classifier, tmp_path: Path):
    with pytest.raises(ValueError, match="fairness_target.hat"):
        _run(_job(target={"hat": {"yes": 0.5, "no": 0.5}}), pipe, classifier, tmp_path)


def test_a_short_finetune_moves_the_distribution(pipe, classifier, tmp_path: Path):
    """secretary is ~95% female in the base model; 16 iterations of 50/50 DFT must bring it closer to 50/50.

    Measured by the classifier on 48 fixed evaluation seeds the training never sampled.
    """
    secretary = "a photo of the face of a secretary, a person"
    job = _job(prompts=[secretary], iterations=16, steps=6, images_per_prompt=12, prompts_per_iteration=1,
               eval_images=48, eval_steps=10, lr=0.003, rank=8, ema_decay=0.0, checkpoint_every=100,
               ce_temperature=1.0)  # fmt: skip
    seen: list[dict] = []
    manifest = _run(job, pipe, classifier, tmp_path, seen=seen)
    before = manifest.metrics["before"]["realised"]["gender"]["female"]
    after = manifest.metrics["after"]["realised"]["gender"]["female"]
    assert before > 0.85
    assert abs(after - 0.5) <= abs(before - 0.5) - 0.1, (before, after, [p["batch_share"] for p in seen])
    assert min(p["batch_share"]["gender"]["female"] for p in seen) < 0.6  # the training batches crossed towards male
    assert manifest.metrics["semantics"]["feature_cosine"] > 0.5
