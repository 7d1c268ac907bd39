"""Trainer `invdiff`: InvDiff (Hou et al., KDD 2025), debiasing without bias labels or a target.

A model that absorbed its training data's bias fits the minority of each stereotyped caption
worst. Stage 1 measures the frozen model's noise-prediction loss on every training example at
a shared set of timesteps and infers K soft groups whose mean losses differ most
(adaptors.trainers.groups). Stage 2 trains G, a LoRA on the same UNet, so that the combined
prediction (1 - r) * eps + r * eps_G (adaptors.unet_delta, the same two-pass mix inference
uses) has a low mean and a low variance of loss across those groups: fitting the groups the base
model neglects as well as the rest. The base model stays frozen; the adaptor is the LoRA plus r.

No fairness_target: the before/after figures on the evaluation prompts are measured against a
uniform reference on every attribute the classifier reads (the manifest says so), and the same
subject and fairness gates as every finetune apply. Where the training set carries label columns,
the manifest reports how far the inferred groups agree with them (NMI); they are never trained on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from adaptors.caption_data import CaptionSet, DatasetError, read_caption_set
from adaptors.classifiers import AttributeClassifier
from adaptors.generation import GenerationCancelled, default_size
from adaptors.lora import lora_state_dict
from adaptors.profiles import get_profile
from adaptors.trainers.checkpoint import load_checkpoint, save_checkpoint
from adaptors.trainers.dft import evaluate_prompts, gated_metrics
from adaptors.trainers.groups import infer_groups, invariance_loss, normalised_mutual_information
from adaptors.trainers.registry import ProgressFn, StopFn, adaptor_id_for, register_trainer
from adaptors.trainers.trainable import TRAIN_ADAPTER, LoraTrainable, make_trainable
from adaptors.unet_delta import TwoPassMix, UnetDeltaAdaptor
from common.adaptor_manifest import AdaptorManifest
from common.finetune_config import InvDiffConfig
from common.schemas import FinetuneJob

logger = logging.getLogger(__name__)

GROUPS_FILE = "invdiff_groups.safetensors"
ENCODE_BATCH = 256
MAX_GRAD_NORM = 1.0  # the authors' clipping


def training_set(job: FinetuneJob, cfg: InvDiffConfig, checkpoint_dir: Path) -> CaptionSet:
    """The checked training set: the job's `dataset`, or the base model's own training data written by its profile."""
    if cfg.dataset:
        return read_caption_set(cfg.dataset).subset(cfg.images, cfg.seed)
    profile = get_profile(job.base_model)
    if profile is None or profile.write_training_data is None:
        raise DatasetError(f"base model {job.base_model!r} has no training data of its own; name a folder or CSV")
    folder = checkpoint_dir / "training_data"
    if not (folder / "metadata.jsonl").is_file():
        profile.write_training_data(folder, cfg.images, cfg.seed)
    return read_caption_set(folder)


def uniform_reference(classifier: AttributeClassifier) -> dict[str, dict[str, float]]:
    """What the before/after figures are measured against: every class of every attribute equally likely."""
    return {a: {c: 1.0 / len(cs) for c in cs} for a, cs in classifier.attributes.items()}


class EncodedSet:
    """A training set as the UNet sees it: VAE latents (mean, std) and caption embeddings, computed once."""

    def __init__(self, pipe, data: CaptionSet) -> None:
        size = default_size(pipe)
        images = data.images(size).to(pipe.device, pipe.vae.dtype)
        scale = pipe.vae.config.scaling_factor
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(images), ENCODE_BATCH):
                dist = pipe.vae.encode(images[i : i + ENCODE_BATCH]).latent_dist
                means.append(dist.mean * scale)
                stds.append(dist.std * scale)
            unique = sorted(set(data.captions))
            self.embeds = torch.cat([pipe.encode_prompt(unique[i : i + ENCODE_BATCH], pipe.device, 1, False)[0]
                                     for i in range(0, len(unique), ENCODE_BATCH)])  # fmt: skip
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        index = {c: i for i, c in enumerate(unique)}
        self.caption = torch.tensor([index[c] for c in data.captions], device=pipe.device)

    def __len__(self) -> int:
        return len(self.mean)


def noise_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts: the noise (epsilon models) or the velocity (v-prediction models)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


def example_losses(pipe, scheduler: DDPMScheduler, data: EncodedSet, draws: int, seed: int, should_stop: StopFn) -> np.ndarray:
    """Stage 1's loss table (N x draws): the frozen model's noise-prediction MSE per example at `draws` timesteps
    spread over the schedule, the same for every example, each with its own seeded noise."""
    total = scheduler.config.num_train_timesteps
    grid = np.linspace(0, total - 1, draws + 2)[1:-1].round().astype(int)
    gen = torch.Generator().manual_seed(seed)
    table = np.zeros((len(data), draws))
    with torch.no_grad():
        for j, step in enumerate(grid):
            if should_stop():
                raise GenerationCancelled("training stopped while measuring the base model's losses")
            for i in range(0, len(data), ENCODE_BATCH):
                x0 = data.mean[i : i + ENCODE_BATCH]
                noise = torch.randn(x0.shape, generator=gen).to(x0)
                t = torch.full((len(x0),), int(step), device=x0.device, dtype=torch.long)
                pred = pipe.unet(
                    scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=data.embeds[data.caption[i : i + len(x0)]]
                ).sample
                err = (pred.float() - noise_target(scheduler, x0, noise, t).float()).pow(2).flatten(1).mean(1)
                table[i : i + len(x0), j] = err.cpu().numpy()
    return table


def stage_groups(
    pipe, scheduler, data: EncodedSet, cfg: InvDiffConfig, checkpoint_dir: Path, should_stop: StopFn
) -> tuple[np.ndarray, np.ndarray]:
    """(loss table, soft groups), from the checkpoint folder when an earlier attempt of this job got that far."""
    path = checkpoint_dir / GROUPS_FILE
    if path.is_file():
        saved = load_file(str(path))
        if saved["weights"].shape == (len(data), cfg.groups) and saved["losses"].shape == (len(data), cfg.loss_draws):
            return saved["losses"].numpy(), saved["weights"].numpy()
    losses = example_losses(pipe, scheduler, data, cfg.loss_draws, cfg.seed, should_stop)
    weights = infer_groups(losses, cfg.groups, cfg.group_iterations, cfg.group_lr, cfg.seed)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    save_file({"losses": torch.from_numpy(losses), "weights": torch.from_numpy(weights)}, str(path))
    return losses, weights


def group_summary(losses: np.ndarray, weights: np.ndarray, labels: dict[str, list[str]]) -> dict[str, Any]:
    """The inferred groups: their sizes and mean losses, and their agreement (NMI) with any label columns."""
    hard = weights.argmax(1)
    mean_loss = losses.mean(1)
    out: dict[str, Any] = {
        "sizes": [int((hard == g).sum()) for g in range(weights.shape[1])],
        "mass": [round(float(m), 2) for m in weights.sum(0)],
        "mean_loss": [
            round(float(mean_loss[hard == g].mean()), 6) if (hard == g).any() else None for g in range(weights.shape[1])
        ],  # fmt: skip
    }
    if labels:
        out["agreement_nmi"] = {k: round(normalised_mutual_information(hard, v), 4) for k, v in labels.items()}
        out["label_shares"] = {
            k: [{c: round(float(np.mean(np.asarray(v)[hard == g] == c)), 4) for c in sorted(set(v))} if (hard == g).any() else {}
                for g in range(weights.shape[1])]
            for k, v in labels.items()
        }  # fmt: skip
    return out


def optimise(pipe, scheduler, data: EncodedSet, weights: np.ndarray, trainable: LoraTrainable, cfg: InvDiffConfig,
             checkpoint_dir: Path, progress: ProgressFn, should_stop: StopFn, config_key: dict) -> list[dict]:  # fmt: skip
    """Stage 2: the LoRA's iterations on mean + lambda * variance of the group losses of the mixed prediction,
    resumed from the checkpoint; leaves the EMA in the parameters and returns the iteration records."""
    params = trainable.params
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = EMAModel(params, decay=cfg.ema_decay)
    state = load_checkpoint(checkpoint_dir, params, ema, opt, config_key) or {"iteration": 0, "history": []}
    w_all = torch.from_numpy(weights).to(pipe.device, torch.float32)
    mixer = TwoPassMix(pipe.unet, TRAIN_ADAPTER, cfg.mix_ratio)
    mixer.install()
    try:
        for it in range(state["iteration"], cfg.iterations):
            if should_stop():
                save_checkpoint(checkpoint_dir, params, ema, opt, {**state, "config": config_key})
                raise GenerationCancelled(f"training stopped at iteration {it}/{cfg.iterations}")
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, it]).generate_state(1)[0]))
            idx = torch.randperm(len(data), generator=gen)[: cfg.batch_size].to(pipe.device)
            x0 = data.mean[idx] + data.std[idx] * torch.randn(data.mean[idx].shape, generator=gen).to(data.mean)
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(pipe.device)
            pred = pipe.unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=data.embeds[data.caption[idx]]).sample
            per_example = (
                F.mse_loss(pred.float(), noise_target(scheduler, x0, noise, t).float(), reduction="none").flatten(1).mean(1)
            )
            loss, groups = invariance_loss(per_example, w_all[idx], cfg.variance_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            ema.step(params)
            record = {"iteration": it + 1, "step": it + 1, "total": cfg.iterations, "loss": round(loss.item(), 6),
                      "group_losses": [round(float(g), 6) for g in groups],
                      "group_variance": round(float(groups.var(unbiased=False)), 8)}  # fmt: skip
            state["iteration"] = it + 1
            state["history"].append(record)
            progress(dict(record))
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
                save_checkpoint(checkpoint_dir, params, ema, opt, {**state, "config": config_key})
    finally:
        mixer.remove()
    ema.copy_to(params)
    return state["history"]


def evaluate(pipe, classifier, trainable: LoraTrainable, cfg: InvDiffConfig, prompts: list[str], reference: dict) -> tuple:
    """(before, after): each (images, summary) on the same seeds, the base model and the two-pass mix."""
    with torch.no_grad():
        with trainable.frozen():
            before = evaluate_prompts(pipe, classifier, prompts, reference, cfg, None)
        mixer = TwoPassMix(pipe.unet, TRAIN_ADAPTER, cfg.mix_ratio)
        mixer.install()
        try:
            after = evaluate_prompts(pipe, classifier, prompts, reference, cfg, None)
        finally:
            mixer.remove()
    return before, after


@register_trainer("invdiff")
def train_invdiff(
    job: FinetuneJob,
    pipe,
    classifier: AttributeClassifier,
    staging_dir: Path,
    checkpoint_dir: Path,
    progress: ProgressFn,
    should_stop: StopFn,
) -> AdaptorManifest:
    """Check the training set, infer groups, train G, evaluate against uniform, gate, write the adaptor."""
    cfg = InvDiffConfig.from_hyperparameters(dict(job.hyperparameters))
    if job.fairness_target:
        raise ValueError("fairness_target: method 'invdiff' takes none (it aims at invariance across inferred groups)")
    if not job.prompts:
        raise ValueError("prompts: method 'invdiff' needs evaluation prompts")
    staging_dir, checkpoint_dir = Path(staging_dir), Path(checkpoint_dir)
    data = training_set(job, cfg, checkpoint_dir)  # every row checked before the model does any work
    eval_prompts = list(job.eval_prompts or job.prompts)
    reference = uniform_reference(classifier)

    t0 = time.time()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    encoded = EncodedSet(pipe, data)
    losses, weights = stage_groups(pipe, scheduler, encoded, cfg, checkpoint_dir, should_stop)
    groups = group_summary(losses, weights, data.labels)
    progress({"stage": "groups", **{k: v for k, v in groups.items() if k != "label_shares"}})
    group_seconds = round(time.time() - t0, 2)
    trainable = make_trainable(pipe, "unet", cfg.rank, 0, cfg.seed, 0.0)
    assert isinstance(trainable, LoraTrainable)
    try:
        config_key = {**asdict(cfg), "examples": len(data)}
        history = optimise(pipe, scheduler, encoded, weights, trainable, cfg, checkpoint_dir, progress, should_stop,
                           config_key)  # fmt: skip
        train_seconds = round(time.time() - t0, 2)
        before, after = evaluate(pipe, classifier, trainable, cfg, eval_prompts, reference)
        measured = gated_metrics(job, cfg, classifier, eval_prompts, before, after)
        manifest = AdaptorManifest(
            id=adaptor_id_for(staging_dir, job),
            kind=UnetDeltaAdaptor.kind,
            base_model=job.base_model,
            attributes=[],
            target={},  # none: `auto` never picks it, a request names it by adaptor_id
            metrics={
                **measured,
                "reference": "uniform",
                "no_target": "InvDiff takes no fairness_target; before/after are measured against a uniform reference "
                "on every attribute the classifier reads",
                "groups": groups,
                "examples": len(data),
                "train_seconds": train_seconds,
                "group_seconds": group_seconds,
                "iterations": cfg.iterations,
                "history": history[-5:],
            },
            hyperparameters={**asdict(cfg), "method": job.method},
            prompt_set=job.prompt_set,
            prompts=list(job.prompts),
            sampler={"steps": cfg.eval_steps, "guidance_scale": cfg.guidance_scale, "scheduler": type(pipe.scheduler).__name__},
            name=job.name,
        )
        UnetDeltaAdaptor(manifest, lora_state_dict(pipe, TRAIN_ADAPTER)).save(staging_dir)
    finally:
        trainable.remove()
    logger.info("invdiff adaptor %s: groups %s, mean per-prompt TV to uniform %s -> %s", manifest.id, groups.get("sizes"),
                before[1]["mean_prompt_tv"], after[1]["mean_prompt_tv"])  # fmt: skip
    return manifest
