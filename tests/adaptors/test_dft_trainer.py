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

from adaptors.base import load_adaptor
from adaptors.generation import GenerationCancelled, GenerationSpec, generate, initial_latents
from adaptors.lora import LoraAdaptor, loaded_adapters
from adaptors.prefix import PrefixAdaptor
from adaptors.store import AdaptorStore
from adaptors.trainers import TRAINERS, get_trainer
from adaptors.trainers.alignment import alignment_targets
from adaptors.trainers.dft import LEANINGS_FILE, DFTConfig, DFTLosses, attribute_region, learning_rate, measured_leanings
from adaptors.trainers.mixing import draw_noise, draw_partners, encode_mixed, varying_positions
from adaptors.trainers.sampling import sample, step_scales
from adaptors.trainers.trainable import (
    TEXT_ENCODER_MODULES,
    UNET_MODULES,
    make_trainable,
    measured_directions,
    prompt_span,
    regressed_map,
    varying_word_embeddings,
)
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
     ({"train": "both", "text_encoder_modules": "token_map"}, "text_encoder_modules"),
     ({"text_encoder_modules": "token_map", "prompt_noise": 0.5}, "prompt_noise"),
     ({"token_map_read": "varying"}, "token_map_read"), ({"text_encoder_modules": "token_map", "token_map_read": "words"},
                                                          "token_map_read"),
     ({"lr_schedule": "linear"}, "lr_schedule"), ({"token_map_init": "measured"}, "token_map_init"),
     ({"token_map_form": "symmetric"}, "token_map_form"),
     ({"text_encoder_modules": "token_map", "token_map_init": "regression", "token_map_form": "symmetric"},
      "token_map_init"),
     ({"iterations": 0}, "iterations"), ({"text_encoder_modules": "token_map", "measure_images": -1}, "measure_images"),
     ({"text_encoder_modules": "token_map", "token_map_init": "measured", "regression_scale": 1.25}, "regression_scale"),
     ({"token_map_read": "positive"}, "token_map_read"),
     ({"text_encoder_modules": "token_map", "measure_guidance_scale": 1.0}, "measure_guidance_scale"),
     ({"text_encoder_modules": "token_map", "token_map_init": "regression", "measure_guidance_scale": 0.5},
      "measure_guidance_scale"), ({"token_map_keep": "specials"}, "token_map_keep"),
     ({"text_encoder_modules": "token_map", "token_map_keep": "bos"}, "token_map_keep"),
     ({"text_encoder_modules": "token_map", "token_map_form": "tied"}, "token_map_form"),
     ({"token_map_train": "write"}, "token_map_train"),
     ({"text_encoder_modules": "token_map", "token_map_init": "measured", "token_map_train": "write"},
      "token_map_train"),
     ({"text_encoder_modules": "token_map", "token_map_init": "random", "token_map_train": "scale"},
      "token_map_train"),
     ({"text_encoder_modules": "token_map", "token_map_init": "regression", "token_map_cross_fit": True},
      "token_map_cross_fit"),
     ({"text_encoder_modules": "token_map", "token_map_init": "regression", "token_map_train": "read"},
      "token_map_train"),
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


def test_cosine_schedule_falls_from_the_rate_to_near_zero_by_the_last_iteration():
    cfg = DFTConfig.from_hyperparameters({"lr": 0.04, "iterations": 10, "lr_schedule": "cosine"})
    rates = [learning_rate(cfg, it) for it in range(10)]
    assert rates[0] == pytest.approx(0.04) and rates[5] == pytest.approx(0.02)
    assert all(a > b for a, b in zip(rates, rates[1:])) and 0 < rates[-1] < 0.002
    assert learning_rate(DFTConfig.from_hyperparameters({"lr": 0.04, "iterations": 10}), 9) == pytest.approx(0.04)


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


def test_prompt_mixing_interpolates_token_embeddings(pipe):
    """Weight 0 is the prompt as the pipeline encodes it, weight 1 the partner, 0.5 something between."""
    with torch.no_grad():
        plain = pipe.encode_prompt([DOCTOR, NURSE], pipe.device, 1, False)[0]
        ends = encode_mixed(pipe, [DOCTOR, DOCTOR], [NURSE, NURSE], [0.0, 1.0])
        half = encode_mixed(pipe, [DOCTOR], [NURSE], [0.5])
    assert torch.allclose(ends, plain, atol=1e-5)
    assert (half - plain[0]).abs().max() > 1e-3 and (half - plain[1]).abs().max() > 1e-3
    rng = np.random.default_rng(0)
    lengths = {DOCTOR: 13, NURSE: 13, "short": 5}
    assert draw_partners([DOCTOR, NURSE], list(lengths), lengths, 0.0, rng) == [(DOCTOR, 0.0), (NURSE, 0.0)]
    drawn = draw_partners([DOCTOR] * 20 + ["short"], list(lengths), lengths, 1.0, rng)
    assert {q for q, _ in drawn[:20]} == {NURSE} and drawn[20] == ("short", 0.0)  # same token length only
    with pytest.raises(ValueError, match="prompt_mixing"):
        DFTConfig.from_hyperparameters({"train": "prefix", "prompt_mixing": 0.5})


def test_prompt_noise_moves_only_the_tokens_that_vary_across_the_prompt_set(pipe):
    varying = varying_positions(pipe, [DOCTOR, NURSE])
    assert len(varying) == 1  # the occupation word
    noise = draw_noise(pipe, 3, varying, 0.5, np.random.default_rng(0))
    assert noise.shape[0] == 3 and np.abs(noise[:, varying]).min() > 0
    assert not np.delete(noise, varying, axis=1).any()
    with torch.no_grad():
        plain = encode_mixed(pipe, [DOCTOR], [DOCTOR], [0.0])
        moved = encode_mixed(pipe, [DOCTOR], [DOCTOR], [0.0], noise[:1])
    assert torch.allclose(moved[:, : int(varying[0])], plain[:, : int(varying[0])], atol=1e-6)  # causal: before it, unchanged
    assert (moved - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="prompt_noise"):
        DFTConfig.from_hyperparameters({"prompt_noise": -1})


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


def test_a_measured_start_reports_its_measuring_and_a_resumed_job_reads_it_back(pipe, classifier, tmp_path: Path):
    """The base images a measured start reads are the first work of such a job: each prompt's batch is a progress
    point, a cancel stops between them, and the leans are kept beside the checkpoint, so a job resumed after a
    crash neither generates them again nor starts from other ones."""
    job = _job(text_encoder_modules="token_map", token_map_init="regression", rank=1, measure_images=2)
    ckpt = tmp_path / "out.ckpt"
    seen: list[dict] = []
    with pytest.raises(GenerationCancelled, match="measuring"):
        _run(job, pipe, classifier, tmp_path, stop=lambda: len(seen) >= 1, seen=seen)
    assert [(p["phase"], p["step"], p["total"]) for p in seen] == [("measuring base images", 1, 2)]
    assert not (ckpt / LEANINGS_FILE).exists()  # half a measurement is not kept

    first: list[dict] = []
    with pytest.raises(GenerationCancelled):
        _run(job, pipe, classifier, tmp_path, stop=lambda: any("iteration" in p for p in first), seen=first)
    assert [p["step"] for p in first if p.get("phase")] == [1, 2] and [p["iteration"] for p in first if "iteration" in p] == [1]
    stored = json.loads((ckpt / LEANINGS_FILE).read_text())["leanings"]

    resumed: list[dict] = []
    _run(job, pipe, classifier, tmp_path, seen=resumed)
    assert not any(p.get("phase") for p in resumed) and [p["iteration"] for p in resumed] == [2]
    assert json.loads((ckpt / LEANINGS_FILE).read_text())["leanings"] == stored
    _run(_job(text_encoder_modules="token_map", token_map_init="regression", rank=1, measure_images=2, seed=1), pipe,
         classifier, tmp_path, seen=(other := []))  # fmt: skip
    assert [p["step"] for p in other if p.get("phase")] == [1, 2]  # other settings: measured anew


def test_training_only_the_write_keeps_the_regression_starts_read(pipe, classifier, tmp_path: Path):
    """`token_map_train: write` publishes the start's read unchanged and a trained write: what a held-out word
    is moved by stays the regression's reading of it. `scale` trains only how far the start's map moves."""
    hp = {"text_encoder_modules": "token_map", "token_map_init": "regression", "rank": 1, "measure_images": 2,
          "lr": 0.05, "ema_decay": 0.0}  # fmt: skip
    a = "text_encoder.embeddings.token_embedding.lora_embedding_A"
    b = "text_encoder.embeddings.token_embedding.lora_embedding_B"
    published = {}
    runs = (("start", {"iterations": 0}), ("write", {"token_map_train": "write"}), ("scale", {"token_map_train": "scale"}),
            ("both", {}))  # fmt: skip
    for name, extra in runs:
        _run(_job(**hp, **extra), pipe, classifier, tmp_path, name)
        published[name] = load_adaptor(tmp_path / name).tensors
    start, write, scale, both = (published[name] for name, _ in runs)
    assert torch.equal(write[a], start[a]) and not torch.allclose(write[b], start[b])
    assert not torch.allclose(both[a], start[a])
    # `scale`: the same read, and the same write up to one factor, which training moved off 1
    assert torch.equal(scale[a], start[a])
    factor = (scale[b] * start[b]).sum() / (start[b] * start[b]).sum()
    assert torch.allclose(scale[b], factor * start[b], atol=1e-6) and abs(factor.item() - 1) > 1e-3


def test_cross_fit_reads_from_every_other_prompt_and_trains_the_scale_on_the_rest(pipe, classifier, tmp_path: Path):
    """The published read is the regression on the even prompts' words and leans alone; the odd prompts, which
    the read never saw, are what DFT learns the scale on (so the scale is learnt as held-out words need it)."""
    prompts = [DOCTOR, NURSE, "a photo of the face of a pilot, a person", "a photo of the face of a teacher, a person"]
    hp = {"text_encoder_modules": "token_map", "token_map_init": "regression", "rank": 1, "measure_images": 2,
          "token_map_train": "scale", "token_map_cross_fit": True, "lr": 0.05}  # fmt: skip
    seen: list[dict] = []
    _run(_job(prompts=prompts, **hp), pipe, classifier, tmp_path, seen=seen)
    leanings = np.asarray(json.loads((tmp_path / "out.ckpt" / LEANINGS_FILE).read_text())["leanings"])
    expected = make_trainable(pipe, "text_encoder", 1, 5, 0, 0.1, "token_map", prompts=prompts[::2],
                              leanings=leanings[::2], token_map_init="regression")  # fmt: skip
    try:
        table = pipe.text_encoder.get_input_embeddings().weight
        read = (expected.read_matrix() @ table.T).detach()
    finally:
        expected.remove()
    published = load_adaptor(tmp_path / "out").tensors["text_encoder.embeddings.token_embedding.lora_embedding_A"]
    assert torch.allclose(published, read.to(published.dtype), atol=1e-5 * read.abs().max().item())
    with pytest.raises(ValueError, match="at least 4"):
        _run(_job(prompts=prompts[:3], **hp), pipe, classifier, tmp_path, "short")


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


@pytest.mark.parametrize("modules, projections", [("cross_attention_kv", {"to_k", "to_v"}),
                                                   ("cross_attention_out", {"to_v", "to_out"})])  # fmt: skip
def test_cross_attention_modules_train_only_the_projections_they_name(pipe, classifier, tmp_path, modules, projections):
    _run(_job(train="unet", unet_modules=modules, iterations=1, lr=0.05), pipe, classifier, tmp_path)
    keys = list(load_adaptor(tmp_path / "out").tensors)
    assert keys and all(k.startswith("unet.") and ".attn2.to_" in k for k in keys)
    assert {k.split(".attn2.")[1].split(".")[0] for k in keys} == projections
    assert not any(loaded_adapters(pipe).values())


def test_last_outputs_trains_only_the_last_layers_residual_writes_and_stock_diffusers_loads_it(pipe, classifier, tmp_path):
    spec = GenerationSpec(DOCTOR, num_images=2, seed=3, steps=3)
    before = generate(pipe, spec)
    _run(_job(text_encoder_modules="last_outputs", rank=1, iterations=1, lr=0.05), pipe, classifier, tmp_path)
    tensors = load_adaptor(tmp_path / "out").tensors
    last = pipe.text_encoder.config.num_hidden_layers - 1
    assert all(k.startswith("text_encoder.") for k in tensors)
    assert {k.split(".lora")[0].split("encoder.layers.")[1] for k in tensors} == {f"{last}.self_attn.out_proj", f"{last}.mlp.fc2"}
    assert all(min(v.shape) == 1 for v in tensors.values())  # rank 1
    pipe.load_lora_weights(str(tmp_path / "out"), adapter_name="plain")
    assert not torch.allclose(generate(pipe, spec), before, atol=1e-4)


@pytest.mark.parametrize(
    "form, init, keep",
    [
        ("free", "random", "none"),
        ("symmetric", "random", "none"),
        ("centred", "measured", "none"),
        ("free", "random", "specials"),
    ],
)
def test_token_map_is_one_map_for_every_word_published_as_a_lora_that_stock_diffusers_loads(
    pipe, classifier, tmp_path, form, init, keep
):
    """The token map trained on the doctor and nurse prompts also changes the encoding of a word neither
    has (a per-word embedding LoRA could not: the word's row gets no gradient), and the published LoRA
    reproduces the trained model's images, switched by the worker's code and loaded by plain diffusers."""
    held_out = "a photo of the face of a senator, a person"
    spec = GenerationSpec(held_out, num_images=2, seed=3, steps=3)
    before = generate(pipe, spec)
    with torch.no_grad():
        base_encoding = pipe.encode_prompt([held_out], pipe.device, 1, False)[0]
    job = _job(text_encoder_modules="token_map", token_map_form=form, token_map_init=init, token_map_keep=keep, rank=2,
               iterations=2, lr=0.05)  # fmt: skip
    _run(job, pipe, classifier, tmp_path)
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks  # training left no hook behind
    adaptor = load_adaptor(tmp_path / "out")
    assert isinstance(adaptor, LoraAdaptor) and not any(loaded_adapters(pipe).values())
    assert {k.split(".lora")[0] for k in adaptor.tensors} == {"text_encoder.embeddings.token_embedding",
                                                              "text_encoder.encoder.layers.0.self_attn.q_proj"}  # fmt: skip
    assert all(not v.any() for k, v in adaptor.tensors.items() if "q_proj" in k)  # the loader's format key only
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    a = adaptor.tensors["text_encoder.embeddings.token_embedding.lora_embedding_A"]
    b = adaptor.tensors["text_encoder.embeddings.token_embedding.lora_embedding_B"]
    word = pipe.tokenizer.get_vocab()["senator</w>"]
    change = (b @ a[:, word]).norm() / table[word].norm()
    assert change > 1e-3, change  # the held-out word moves
    specials = pipe.tokenizer.all_special_ids
    assert (a[:, specials].abs().max() == 0) == (keep == "specials")  # kept tokens are published unmoved
    adaptor.attach(pipe)
    adaptor.activate(pipe)
    with torch.no_grad():
        moved = pipe.encode_prompt([held_out], pipe.device, 1, False)[0]
    assert not torch.allclose(moved, base_encoding, atol=1e-5)
    adapted = generate(pipe, spec)
    adaptor.deactivate(pipe)
    assert torch.equal(generate(pipe, spec), before)
    adaptor.detach(pipe)
    pipe.load_lora_weights(str(tmp_path / "out"), adapter_name="plain")
    assert torch.allclose(generate(pipe, spec), adapted, atol=1e-4)


def test_token_map_reads_only_directions_the_training_prompts_span(pipe):
    trainable = make_trainable(pipe, "text_encoder", 2, 5, 0, 0.1, "token_map", prompts=[DOCTOR, NURSE])
    try:
        with torch.no_grad():
            trainable.read.normal_()
        basis = trainable.basis
        assert basis.shape[1] < basis.shape[0]  # two prompts span fewer directions than the embedding has
        table = pipe.text_encoder.get_input_embeddings().weight.detach()
        doctor = table[pipe.tokenizer.get_vocab()["doctor</w>"]]
        outside = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0))
        outside = outside - basis @ (basis.T @ outside)
        read = trainable.read_matrix()
        assert (read @ outside).abs().max() < 1e-5 * outside.norm()  # nothing the prompts lack is read
        assert (read @ doctor).abs().max() > 1e-3 * doctor.norm()
    finally:
        trainable.remove()
    with pytest.raises(ValueError, match="prompts"):
        make_trainable(pipe, "text_encoder", 2, 5, 0, 0.1, "token_map")


def test_token_map_reading_only_the_varying_words_leaves_the_template_and_the_empty_prompt_alone(pipe):
    trainable = make_trainable(pipe, "text_encoder", 2, 5, 0, 0.1, "token_map", prompts=[DOCTOR, NURSE], token_map_read="varying")
    try:
        with torch.no_grad():
            trainable.read.normal_()
        span = prompt_span(pipe, [DOCTOR, NURSE])
        assert trainable.basis.shape[1] < span.shape[1]  # fewer directions than the whole span
        table = pipe.text_encoder.get_input_embeddings().weight.detach()
        ids = pipe.tokenizer([DOCTOR, ""], padding="max_length", truncation=True, return_tensors="pt").input_ids
        template = [t for t in set(ids[0].tolist()) if t != pipe.tokenizer.get_vocab()["doctor</w>"]]
        read = trainable.read_matrix()
        assert (read @ table[template].T).abs().max() < 1e-4 * table[template].norm(dim=1).max()
        doctor = table[pipe.tokenizer.get_vocab()["doctor</w>"]]
        assert (read @ doctor).abs().max() > 1e-2 * doctor.norm()
        with torch.no_grad():
            mapped = pipe.text_encoder.get_input_embeddings()(ids)
        unmapped = table[ids]
        assert torch.allclose(mapped[1], unmapped[1], atol=1e-5)  # the empty prompt, whole
        assert not torch.allclose(mapped[0], unmapped[0], atol=1e-3)  # the doctor prompt: its word moved
    finally:
        trainable.remove()
    with pytest.raises(ValueError, match="prompts"):
        make_trainable(pipe, "text_encoder", 2, 5, 0, 0.1, "token_map", prompts=[DOCTOR, DOCTOR], token_map_read="varying")


def test_token_map_reading_the_positive_span_leaves_the_negative_prompt_alone_and_reads_the_template(pipe):
    trainable = make_trainable(pipe, "text_encoder", 2, 5, 0, 0.1, "token_map", prompts=[DOCTOR, NURSE],
                               token_map_read="positive")  # fmt: skip
    try:
        with torch.no_grad():
            trainable.read.normal_()
        table = pipe.text_encoder.get_input_embeddings().weight.detach()
        ids = pipe.tokenizer([DOCTOR, ""], padding="max_length", truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            mapped = pipe.text_encoder.get_input_embeddings()(ids)
        assert torch.allclose(mapped[1], table[ids[1]], atol=1e-5)  # the empty prompt, whole
        photo = table[pipe.tokenizer.get_vocab()["photo</w>"]]  # a template word, which `varying` would not read
        assert (trainable.read_matrix() @ photo).abs().max() > 1e-2 * photo.norm()
    finally:
        trainable.remove()


@pytest.mark.parametrize("keep", ["specials", "shared"])
def test_a_token_map_that_keeps_tokens_moves_neither_them_nor_the_empty_prompt_whatever_it_reads(pipe, keep):
    """Kept tokens are masked where the map writes, not taken out of what it reads: the read still has the
    words' whole span (unlike `token_map_read: positive`), and BOS, EOS and padding, hence the empty negative
    prompt, come out as they went in. "shared" also keeps the template's words, so only the occupation moves."""
    trainable = make_trainable(pipe, "text_encoder", 2, 5, 0, 0.1, "token_map", prompts=[DOCTOR, NURSE], token_map_keep=keep)
    try:
        with torch.no_grad():
            trainable.read.normal_()
        table = pipe.text_encoder.get_input_embeddings().weight.detach()
        assert torch.equal(trainable.basis, prompt_span(pipe, [DOCTOR, NURSE]))  # reads what `keep: none` reads
        ids = pipe.tokenizer([DOCTOR, ""], padding="max_length", truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            moved = (pipe.text_encoder.get_input_embeddings()(ids) - table[ids]).norm(dim=-1)
        assert (trainable.read_matrix() @ table[pipe.tokenizer.bos_token_id]).abs().max() > 1e-3  # BOS is read...
        assert moved[1].max() == 0  # ...but the empty prompt is unchanged, every position
        doctor = ids[0] == pipe.tokenizer.get_vocab()["doctor</w>"]
        photo = ids[0] == pipe.tokenizer.get_vocab()["photo</w>"]
        specials = torch.isin(ids[0], torch.tensor(pipe.tokenizer.all_special_ids))
        assert moved[0][doctor].min() > 1e-3 and moved[0][specials].max() == 0
        assert (moved[0][photo].min() > 1e-3) == (keep == "specials")  # the template moves unless kept
    finally:
        trainable.remove()


def test_symmetric_token_map_takes_the_directions_it_learns_out_of_every_token(pipe):
    trainable = make_trainable(pipe, "text_encoder", 2, 5, 0, 0.1, "token_map", prompts=[DOCTOR, NURSE],
                               token_map_form="symmetric")  # fmt: skip
    try:
        assert trainable.params == [trainable.directions]  # one matrix: what it reads is where it writes
        start = trainable.write_matrix() @ trainable.read_matrix()
        assert torch.allclose(start, start.T, atol=1e-6) and torch.linalg.eigvalsh(start.double()).max() < 1e-6
        with torch.no_grad():
            trainable.directions.zero_()
            trainable.directions[0, 0] = 1.0
        u = trainable.basis[:, 0]  # a unit direction in the prompts' span
        ids = pipe.tokenizer([DOCTOR, NURSE], padding="max_length", truncation=True, return_tensors="pt").input_ids
        table = pipe.text_encoder.get_input_embeddings().weight.detach()
        with torch.no_grad():
            mapped = pipe.text_encoder.get_input_embeddings()(ids)
        unmapped = table[ids]
        assert (mapped @ u).abs().max() < 1e-5  # nothing of u is left in any token
        expected = unmapped - (unmapped @ u)[..., None] * u
        assert torch.allclose(mapped, expected, atol=1e-5)  # and nothing else moved
        assert (unmapped @ u).abs().max() > 1e-2  # (the tokens did have some of it)
    finally:
        trainable.remove()


def test_regression_start_moves_the_words_and_leaves_the_negative_prompt_as_it_was(pipe):
    """The regressed start on the positive span reads the training words and not the empty prompt's tokens: the
    negative prompt, which classifier-free guidance steers away from, is unchanged, while the prompts' words move."""
    lean = np.array([[-0.4, 0.4], [0.45, -0.45], [-0.3, 0.3]])
    prompts = [DOCTOR, NURSE, "a photo of the face of a pilot, a person"]
    trainable = make_trainable(pipe, "text_encoder", 1, 5, 0, 0.1, "token_map", prompts=prompts, leanings=lean,
                               token_map_init="regression", token_map_read="positive")  # fmt: skip
    try:
        ids = pipe.tokenizer(prompts + [""], padding="max_length", truncation=True, return_tensors="pt").input_ids
        table = pipe.text_encoder.get_input_embeddings().weight.detach()
        with torch.no_grad():
            mapped = pipe.text_encoder.get_input_embeddings()(ids)
        assert torch.allclose(mapped[-1], table[ids[-1]], atol=1e-6)  # the empty prompt
        assert (mapped[:-1] - table[ids[:-1]]).abs().max() > 1e-3  # the words
    finally:
        trainable.remove()
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks


def test_regression_start_is_the_fitted_map_with_factors_of_equal_length(pipe):
    """The start applies regressed_map's rule exactly, but split so that read and write have the same length:
    as fitted the read is hundreds of times the write, and Adam's steps, about the rate for every entry, then
    rewrote the write within a few iterations."""
    lean = np.array([[-0.4, 0.4], [0.45, -0.45], [-0.3, 0.3]])
    prompts = [DOCTOR, NURSE, "a photo of the face of a pilot, a person"]
    trainable = make_trainable(pipe, "text_encoder", 1, 5, 0, 0.1, "token_map", prompts=prompts, leanings=lean,
                               token_map_init="regression", regression_scale=1.25)  # fmt: skip
    try:
        basis = trainable.basis.double()
        words = varying_word_embeddings(pipe, prompts) @ basis.numpy()
        read, write = regressed_map(words, lean, 1)
        expected = -1.25 * (basis @ torch.as_tensor(write)) @ (basis @ torch.as_tensor(read)).T  # dim x dim
        got = (trainable.write_matrix() @ trainable.read_matrix()).double()
        assert torch.allclose(got, expected, atol=1e-6 * expected.abs().max().item())
        # what the balancing is for: here ~8, on the neutral-looks wide set with log-odds leans ~600
        assert np.linalg.norm(read) / np.linalg.norm(write) > 5
        assert torch.isclose(trainable.read[0].norm(), trainable.write[:, 0].norm(), rtol=1e-4)
    finally:
        trainable.remove()


def test_centred_token_map_puts_every_token_at_the_learnt_coordinate(pipe):
    trainable = make_trainable(pipe, "text_encoder", 1, 5, 0, 0.1, "token_map", prompts=[DOCTOR, NURSE],
                               token_map_form="centred")  # fmt: skip
    try:
        assert trainable.params == [trainable.directions, trainable.centre]
        with torch.no_grad():
            trainable.directions.zero_()
            trainable.directions[1, 0] = 1.0
            trainable.centre.fill_(0.05)
        u = trainable.basis[:, 1]
        ids = pipe.tokenizer([DOCTOR, ""], padding="max_length", truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            mapped = pipe.text_encoder.get_input_embeddings()(ids)
        assert torch.allclose(mapped @ u, torch.full(ids.shape, 0.05), atol=1e-5)  # the empty prompt's tokens too
    finally:
        trainable.remove()


def test_measured_leanings_are_each_prompts_share_minus_the_target(pipe, classifier):
    cfg = DFTConfig.from_hyperparameters({"images_per_prompt": 8, "steps": 6})
    leanings = measured_leanings(pipe, classifier, [DOCTOR, NURSE], {"gender": np.array([0.5, 0.5])}, cfg)
    assert leanings.shape == (2, 2) and np.allclose(leanings.sum(1), 0)  # female and male shares, each minus 0.5
    assert leanings[0, 0] < 0 < leanings[1, 0]  # the testbed's doctors come out male, its nurses female


def test_leans_measured_without_guidance_are_the_same_sign_and_less_saturated(pipe, classifier):
    """Guidance multiplies a prompt's log-odds: at 5 the testbed's doctors are all men and the lean sits at what
    the image count can show; the conditional model alone (scale 1) still leans the same way, by less."""
    hp = {"text_encoder_modules": "token_map", "token_map_init": "regression", "steps": 6, "measure_images": 32}
    shares = {"gender": np.array([0.5, 0.5])}
    guided = measured_leanings(pipe, classifier, [DOCTOR, NURSE], shares, DFTConfig.from_hyperparameters(hp))
    plain = measured_leanings(pipe, classifier, [DOCTOR, NURSE], shares,
                              DFTConfig.from_hyperparameters({**hp, "measure_guidance_scale": 1.0}))  # fmt: skip
    assert np.all(np.sign(plain[:, 0]) == np.sign(guided[:, 0])) and guided[0, 0] < 0 < guided[1, 0]
    assert np.all(np.abs(plain[:, 0]) < np.abs(guided[:, 0]) - 0.3), (plain, guided)


def test_measured_directions_find_the_axis_the_words_vary_along_with_their_lean():
    rng = np.random.default_rng(0)
    axis = np.eye(6)[2]
    looks = rng.normal(size=(3, 6))
    lean = np.array([0.4, -0.4, 0.1, -0.1, 0.3, -0.3])  # each look's two words lean both ways equally
    words = np.repeat(looks, 2, axis=0) + lean[:, None] * axis
    directions, found = measured_directions(words, np.stack([lean, -lean], 1))
    assert found == 1 and abs(directions[:, 0] @ axis) > 1 - 1e-9


def test_the_regressed_map_moves_a_new_word_by_its_own_lean_where_taking_the_axis_out_moves_its_look_too():
    """Words are a look plus a share times one axis, and the looks lean along the axis a little. Taking the
    measured axis out also takes out each look's component along it; the regressed read ignores the looks, so
    a word the fit never saw (a new share on a known look) lands at the middle."""
    rng = np.random.default_rng(0)
    dim = 12
    axis = rng.normal(size=dim)
    looks = rng.normal(size=(5, dim)) * 0.5 + 0.4 * axis
    shares = np.array([-0.4, -0.1, 0.15, 0.35])  # each look's four words average the middle
    words = (looks[:, None] + shares[:, None] * axis).reshape(-1, dim)
    lean = np.tile(shares, 5)
    read, write = regressed_map(words, np.stack([lean, -lean], 1), rank=2, ridge=1e-9)
    assert read.shape == (dim, 1) and write.shape == (dim, 1)  # two classes that mirror each other: one direction
    readout = np.linalg.pinv(np.concatenate([looks, axis[None]]).T)[-1]  # a row's share along the axis
    new_word = looks[2] + 0.3 * axis
    assert abs((new_word - (new_word @ read) @ write.T) @ readout) < 1e-6
    u = (words - words.mean(0)).T @ lean
    u /= np.linalg.norm(u)
    assert abs((new_word - (new_word @ u) * u) @ readout) > 0.1


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
