"""Trainer `dft`: Shen et al.'s distributional alignment loss with (adjusted) direct finetuning.

Each iteration samples a batch per prompt through a differentiable chain (adaptors.trainers.
sampling), classifies the images, gives each image a target class by optimal transport against
the target distribution (adaptors.trainers.alignment) and minimises cross-entropy to it. Images
with no person take no target; borderline ones whose target is uncertain neither.

Semantics preservation keeps each image close to what the frozen model made from the same
noise (the classifier trunk's features and the pixels). It is switched off (`flip_weight`, 0 by
default) on images whose target differs from the frozen image's class: on a toy model a 0.2
weight there already stalled debiasing, while full weight everywhere else kept the occupation.

What is trained (`train`): LoRA on the text encoder (default), on the UNet, on both, or soft
prefix tokens. An EMA of the weights is what gets published. `prefix` is also registered as its
own method (the same trainer with `train="prefix"`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from adaptors.audit import classify, summarise
from adaptors.classifiers import AttributeClassifier
from adaptors.fairness_gain import fit_summary, require_fairness_gain
from adaptors.generation import GenerationCancelled, GenerationSpec, PromptEncoder, default_size, generate, initial_latents
from adaptors.subject import require_subject_kept, subject_kept, subject_reader
from adaptors.trainers.alignment import alignment_targets
from adaptors.trainers.checkpoint import load_checkpoint, save_checkpoint
from adaptors.trainers.registry import ProgressFn, StopFn, adaptor_id_for, register_trainer, require_known_attributes
from adaptors.trainers.sampling import sample
from adaptors.trainers.trainable import Trainable, make_trainable
from common import bias as metrics
from common.adaptor_manifest import AdaptorManifest
from common.finetune_config import DFTConfig, check_hyperparameters, check_prompts
from common.schemas import FinetuneJob

logger = logging.getLogger(__name__)


def _shares(job: FinetuneJob, classifier: AttributeClassifier) -> dict[str, np.ndarray]:
    require_known_attributes(job, classifier)
    return {
        a: np.array([job.fairness_target[a].get(c, 0.0) for c in classifier.attributes[a]], dtype=np.float64)
        for a in job.fairness_target
    }


def _features(classifier: AttributeClassifier, images: torch.Tensor) -> torch.Tensor | None:
    """Image features for the semantics term, when the classifier offers them."""
    fn = getattr(classifier, "features", None)
    return fn(images).flatten(1) if fn is not None else None


def attribute_region(classifier: AttributeClassifier, images: torch.Tensor, attrs: list[str], share: float) -> torch.Tensor:
    """Where the attributes live in each image (N x 1 x H x W, 1 inside): the most salient `share` of pixels.

    Saliency is the classifier's own input gradient of its predicted classes, smoothed, so this
    works for any differentiable classifier without a detector; it is the region-aware form of
    preservation: outside this region a flipped image must stay as it was (the occupation lives
    there), inside it may change.
    """
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = classifier.logits(x)
        score = sum(logits[a].float().max(-1).values.sum() for a in attrs)
        (grad,) = torch.autograd.grad(score, x)
    saliency = F.avg_pool2d(grad.abs().sum(1, keepdim=True), 5, stride=1, padding=2)
    flat = saliency.flatten(1)
    cut = torch.quantile(flat, 1.0 - share, dim=1, keepdim=True)
    return (flat >= cut).float().view_as(saliency)


def evaluate(pipe, classifier, prompts: list[str], target: dict, cfg: DFTConfig, trainable: Trainable, base: bool):
    """Images and audit of `eval_images` per prompt on fixed evaluation seeds (base or trained model)."""
    if base:
        with trainable.frozen():
            return evaluate_prompts(pipe, classifier, prompts, target, cfg, None)
    return evaluate_prompts(pipe, classifier, prompts, target, cfg, trainable.prompt_encoder())


def evaluate_prompts(pipe, classifier, prompts: list[str], target: dict, cfg: Any, encode_prompt: PromptEncoder | None):
    """Images and audit of `cfg.eval_images` per prompt on fixed evaluation seeds (`cfg.eval_seed` + the prompt's
    index, `cfg.eval_steps`, `cfg.guidance_scale`), encoded by `encode_prompt` (None: the pipeline as it is); the
    summary every trainer's manifest reports (fit_summary per prompt and pooled, bias)."""
    images = []
    for j, prompt in enumerate(prompts):
        spec = GenerationSpec(prompt=prompt, num_images=cfg.eval_images, seed=cfg.eval_seed + j,
                              steps=cfg.eval_steps, guidance_scale=cfg.guidance_scale)  # fmt: skip
        images.append(generate(pipe, spec, max_batch=64, encode_prompt=encode_prompt))
    images_t = torch.cat(images)
    labels = classify(classifier, images_t)  # once: the pooled and the per-prompt summaries share it
    report = summarise(labels, classifier.attributes, target)
    per_prompt = {
        prompt: summarise(labels[j * cfg.eval_images : (j + 1) * cfg.eval_images], classifier.attributes, target)
        for j, prompt in enumerate(prompts)
    }
    fit = fit_summary(
        {p: {a: r.realised[a] for a in target} for p, r in per_prompt.items()}, {a: report.realised[a] for a in target}, target
    )
    summary = {
        "realised": {a: report.realised[a] for a in target},
        "bias": {a: report.bias[a] for a in target},
        "mean_prompt_bias": {a: round(float(np.mean([r.bias[a] for r in per_prompt.values()])), 4) for a in target},
        "max_prompt_bias": {a: round(float(np.max([r.bias[a] for r in per_prompt.values()])), 4) for a in target},
        "prompt_bias": {p: r.bias for p, r in per_prompt.items()},
        "target_distance": report.target_distance,
        **fit,  # per prompt and pooled: realised, TV and KL to the target, bias; the per-prompt means
        "no_person": report.no_person,
        "images": len(images_t),
    }
    return images_t, summary


def gated_metrics(job, cfg, classifier, eval_prompts: list[str], before: tuple, after: tuple) -> dict[str, Any]:
    """The gates every finetune passes before anything is published, and the figures its manifest keeps.

    `before` and `after` are (images, evaluate's summary) of the base and the trained model on the same seeds.
    Raises SubjectLost (the subject is not kept in `min_subject_kept` of the images) or NoFairnessGain (mean
    per-prompt TV to the target did not fall by `min_fairness_gain`)."""
    (before_images, before_fit), (after_images, after_fit) = before, after
    reader = subject_reader(job.base_model, eval_prompts)
    kept = subject_kept(reader, before_images, after_images, eval_prompts) if reader is not None else None
    require_subject_kept(kept, cfg.min_subject_kept, {"before": before_fit["bias"], "after": after_fit["bias"]})
    require_fairness_gain(before_fit["mean_prompt_tv"], after_fit["mean_prompt_tv"], cfg.min_fairness_gain)
    return {
        "eval_prompts": eval_prompts,
        # False when no held-out prompts were given and the figures are the training prompts' own
        "eval_prompts_held_out": not set(eval_prompts) & set(job.prompts),
        "before": before_fit,
        "after": after_fit,
        "semantics": {**semantics(classifier, before_images, after_images), "subject_kept": kept},
    }


def semantics(classifier, before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """How close the finetuned images stay to the base model's from the same seeds."""
    out = {"pixel_mse": round(F.mse_loss(after, before).item(), 5)}
    with torch.no_grad():
        fa, fb = _features(classifier, after), _features(classifier, before)
    if fa is not None:
        out["feature_cosine"] = round(F.cosine_similarity(fa, fb).mean().item(), 4)
    return out


class DFTLosses:
    """One iteration's losses (alignment, preservation, person) and their diagnostics, apart from sampling so a test
    can feed it chosen images."""

    def __init__(self, cfg: DFTConfig, shares: dict[str, np.ndarray], classifier: AttributeClassifier) -> None:
        self.cfg, self.shares, self.classifier = cfg, shares, classifier

    def losses(self, images, frozen, groups: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """`images` (differentiable) and `frozen` (the base model's from the same noise) hold `groups` prompts' images
        in equal consecutive blocks."""
        logits = self.classifier.logits(images)
        probs = {a: torch.softmax(logits[a].float(), -1) for a in self.shares}
        person = (torch.sigmoid(logits["person"].detach()) > 0.5).cpu().numpy()
        frozen_pred = self.classifier.predict(frozen)
        labels, dropped = self.targets(probs, person, groups, rng)
        align = self.alignment(logits, labels, images)
        flips = self.flips(labels, probs, frozen_pred)
        preserve = self.preservation(images, frozen, flips)
        person_loss = self.keep_person(logits, (frozen_pred.person > 0.5).cpu().numpy(), images)
        loss = align + preserve + self.cfg.person_weight * person_loss
        info = {
            "loss": round(loss.item(), 5),
            "align": round(align.item(), 5),
            "preserve": round(preserve.item(), 5),
            "person": round(person_loss.item(), 5),
            "no_person": int((~person).sum()),
            "no_target": dropped,
            "flips": int(flips.sum()),
            **self.batch_figures(probs, person, groups),
        }
        return loss, info

    def targets(self, probs, person: np.ndarray, groups: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int]:
        """Each image's target class per attribute by optimal transport within its prompt's block (-1: none, for
        images with no person or an uncertain target), and how many were left without one."""
        n = len(person)
        per = n // groups
        labels = {a: np.full(n, -1, dtype=np.int64) for a in self.shares}
        dropped = 0
        for g in range(groups):
            rows = np.arange(g * per, (g + 1) * per)
            rows = rows[person[rows]]
            if len(rows) == 0:
                continue
            targets = alignment_targets({a: probs[a][rows].detach().cpu().numpy() for a in self.shares}, self.shares,
                                        draws=self.cfg.target_draws, confidence=self.cfg.confidence, rng=rng)  # fmt: skip
            dropped += targets.dropped()
            for a in self.shares:
                labels[a][rows] = targets.labels[a]
        return labels, dropped

    def alignment(self, logits, labels: dict[str, np.ndarray], images: torch.Tensor) -> torch.Tensor:
        """Cross-entropy to the targets, at `ce_temperature`, summed over attributes."""
        align = images.new_zeros(())
        for a in self.shares:
            lab = torch.from_numpy(labels[a]).to(images.device)
            valid = lab >= 0
            if valid.any():
                align = align + F.cross_entropy(logits[a].float()[valid] / self.cfg.ce_temperature, lab[valid])
        return align

    def flips(self, labels: dict[str, np.ndarray], probs, frozen_pred) -> np.ndarray:
        """Images meant to change class: their target says so, or (no target) they already have. Preserving the frozen
        image there would pull the model back to the bias it is trained away from."""
        flips = np.zeros(len(next(iter(labels.values()))), dtype=bool)
        for a in self.shares:
            base_class = frozen_pred.probs[a].argmax(-1).cpu().numpy()
            current = probs[a].detach().argmax(-1).cpu().numpy()
            flips |= np.where(labels[a] >= 0, labels[a] != base_class, current != base_class)
        return flips

    def preservation(self, images: torch.Tensor, frozen: torch.Tensor, flips: np.ndarray) -> torch.Tensor:
        """Semantics preservation: pixels and classifier features close to the frozen image, weighted down
        (`flip_weight`) on flipped images, whose attribute's region (`region_share`) is spared instead."""
        cfg, classifier = self.cfg, self.classifier
        flip_t = torch.from_numpy(flips).to(images.device)
        weight = torch.where(flip_t, cfg.flip_weight, 1.0).to(images)
        sq = (images - frozen) ** 2
        everywhere = cfg.preserve_region == "all" and cfg.region_share > 0
        if everywhere:  # every image keeps what lies outside its attribute's region, flipped or not
            sq = sq * (1 - attribute_region(classifier, frozen, list(self.shares), cfg.region_share))
        pixel = cfg.preserve_pixel_weight * sq.flatten(1).mean(1)
        preserve = pixel
        feats = _features(classifier, images) if cfg.preserve_feature_weight > 0 else None
        if feats is not None:
            with torch.no_grad():
                ref = _features(classifier, frozen)
            preserve = preserve + cfg.preserve_feature_weight * (1 - F.cosine_similarity(feats, ref))
        preserve = weight * preserve
        if everywhere:
            preserve = preserve + torch.where(flip_t, pixel, 0.0)
        elif cfg.region_share > 0 and flips.any():
            outside = 1 - attribute_region(classifier, frozen[flip_t], list(self.shares), cfg.region_share)
            region = cfg.preserve_pixel_weight * (outside * sq[flip_t]).flatten(1).mean(1)
            preserve = preserve.index_add(0, torch.nonzero(flip_t).flatten(), region)
        return preserve.mean()

    def keep_person(self, logits, frozen_person: np.ndarray, images: torch.Tensor) -> torch.Tensor:
        """Every image whose frozen image shows a person must still show one."""
        keep = torch.from_numpy(frozen_person).to(images.device)
        if not keep.any():
            return images.new_zeros(())
        person_logit = logits["person"].float()[keep]
        return F.binary_cross_entropy_with_logits(person_logit, torch.ones_like(person_logit))

    def batch_figures(self, probs, person: np.ndarray, groups: int) -> dict[str, dict]:
        """The batch's class shares and bias, per prompt and averaged (pooled over prompts that lean opposite ways the
        batch would look fair when no prompt is)."""
        per = len(person) // groups
        batch_bias, batch_share, prompt_bias = {}, {}, {}
        for a in self.shares:
            names = self.classifier.attributes[a]
            classes = probs[a].detach().argmax(-1).cpu().numpy()
            predicted = [names[i] for i in classes[person]]
            freqs = metrics.frequencies(predicted, names) if predicted else {}
            batch_share[a] = {c: round(v, 3) for c, v in freqs.items()}
            per_prompt = []
            for g in range(groups):
                rows = slice(g * per, (g + 1) * per)
                found = [names[i] for i in classes[rows][person[rows]]]
                per_prompt.append(round(metrics.bias(metrics.frequencies(found, names)), 4) if found else None)
            prompt_bias[a] = per_prompt
            known = [b for b in per_prompt if b is not None]
            batch_bias[a] = round(float(np.mean(known)), 4) if known else None
        return {"batch_bias": batch_bias, "batch_share": batch_share, "prompt_bias": prompt_bias}


def train_dft(
    job: FinetuneJob,
    pipe,
    classifier: AttributeClassifier,
    staging_dir: Path,
    checkpoint_dir: Path,
    progress: ProgressFn,
    should_stop: StopFn,
) -> AdaptorManifest:
    cfg = check_hyperparameters(job.method, dict(job.hyperparameters))  # `dft`, or `prefix` with its own rule
    assert isinstance(cfg, DFTConfig)
    shares = _shares(job, classifier)
    target = {a: dict(d) for a, d in job.fairness_target.items()}
    eval_prompts = list(job.eval_prompts or job.prompts)
    staging_dir, checkpoint_dir = Path(staging_dir), Path(checkpoint_dir)
    check_prompts(cfg, list(job.prompts))
    trainable = make_trainable(pipe, cfg.train, cfg.rank, cfg.num_tokens, cfg.seed, cfg.init_scale,
                               cfg.text_encoder_modules, cfg.unet_modules)  # fmt: skip
    run = DFTRun(job, pipe, classifier, cfg, shares, target, eval_prompts, trainable, staging_dir, checkpoint_dir,
                 progress, should_stop)  # fmt: skip
    try:
        t0 = time.time()
        history = optimise(run)
        train_seconds = round(time.time() - t0, 2)
        return export_adaptor(run, history, train_seconds)
    finally:
        trainable.remove()


@dataclass
class DFTRun:
    """Everything one finetune works with, named once."""

    job: FinetuneJob
    pipe: Any
    classifier: AttributeClassifier
    cfg: DFTConfig
    shares: dict[str, np.ndarray]
    target: dict[str, dict[str, float]]
    eval_prompts: list[str]
    trainable: Trainable
    staging_dir: Path
    checkpoint_dir: Path
    progress: ProgressFn
    should_stop: StopFn


def optimise(run: DFTRun) -> list[dict[str, Any]]:
    """The training iterations, resumed from the checkpoint if there is one; leaves the EMA in the trainable's
    parameters and returns the history of iteration records."""
    cfg, job, params = run.cfg, run.job, run.trainable.params
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMAModel(params, decay=cfg.ema_decay)
    config_key = {**asdict(cfg), "prompts": list(job.prompts), "target": run.target}
    state = load_checkpoint(run.checkpoint_dir, params, ema, opt, config_key) or {"iteration": 0, "history": []}
    losses = DFTLosses(cfg, run.shares, run.classifier)
    for it in range(state["iteration"], cfg.iterations):
        if run.should_stop():
            save_checkpoint(run.checkpoint_dir, params, ema, opt, {**state, "config": config_key})
            raise GenerationCancelled(f"training stopped at iteration {it}/{cfg.iterations}")
        record = train_step(run, losses, opt, ema, it)
        state["iteration"] = it + 1
        state["history"].append(record)
        run.progress(dict(record))
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            save_checkpoint(run.checkpoint_dir, params, ema, opt, {**state, "config": config_key})
    ema.copy_to(params)  # what is published and evaluated is the EMA
    return state["history"]


def train_step(run: DFTRun, losses: DFTLosses, opt: torch.optim.Optimizer, ema: EMAModel, it: int) -> dict[str, Any]:
    """One step: sample this iteration's prompts through the chain (and the frozen model from the same noise),
    take the losses' gradient, step and average; returns the iteration's record."""
    cfg, job, pipe, trainable, params = run.cfg, run.job, run.pipe, run.trainable, run.trainable.params
    rng = np.random.default_rng([cfg.seed, it])
    k = min(cfg.prompts_per_iteration, len(job.prompts))
    start = (it * k) % len(job.prompts)
    prompts = [job.prompts[(start + j) % len(job.prompts)] for j in range(k)]
    batch = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    n = len(batch)
    steps = cfg.steps + int(rng.integers(-cfg.steps_jitter, cfg.steps_jitter + 1))
    size = default_size(pipe)
    latents = initial_latents(pipe, cfg.seed, range(it * n, (it + 1) * n), size, size)
    empty = [""] * n
    with torch.no_grad(), trainable.frozen():
        frozen = sample(pipe, trainable.encode(batch), trainable.encode_negative(empty), latents, steps, cfg.guidance_scale)
    images = sample(pipe, trainable.encode(batch), trainable.encode_negative(empty), latents, steps,
                    cfg.guidance_scale, adjusted=cfg.adjusted)  # fmt: skip
    loss, info = losses.losses(images, frozen, k, rng)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
    skipped = not np.isfinite(grad_norm)
    if not skipped:
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        ema.step(params)
    return {"iteration": it + 1, "step": it + 1, "total": cfg.iterations, **info,
            "grad_norm": round(grad_norm, 6) if not skipped else None, "skipped": skipped,
            "sampling_steps": steps}  # fmt: skip


def export_adaptor(run: DFTRun, history: list[dict[str, Any]], train_seconds: float) -> AdaptorManifest:
    """Evaluate base and trained model on the evaluation prompts, apply the subject gate (SubjectLost: nothing is
    written), and write the adaptor and its manifest to the staging folder."""
    cfg, job, pipe, classifier, target, eval_prompts = run.cfg, run.job, run.pipe, run.classifier, run.target, run.eval_prompts
    with torch.no_grad():
        before_images, before = evaluate(pipe, classifier, eval_prompts, target, cfg, run.trainable, base=True)
        after_images, after = evaluate(pipe, classifier, eval_prompts, target, cfg, run.trainable, base=False)
    measured = gated_metrics(job, cfg, classifier, eval_prompts, (before_images, before), (after_images, after))
    manifest = AdaptorManifest(
        id=adaptor_id_for(run.staging_dir, job),
        kind="pending",
        base_model=job.base_model,
        attributes=list(target),
        target=target,
        metrics={
            **measured,
            "train_seconds": train_seconds,
            "iterations": cfg.iterations,
            "history": history[-5:],
        },
        hyperparameters={**asdict(cfg), "method": job.method},
        prompt_set=job.prompt_set,
        prompts=list(job.prompts),
        sampler={"steps": cfg.eval_steps, "guidance_scale": cfg.guidance_scale, "scheduler": type(pipe.scheduler).__name__},
        name=job.name,
    )
    run.trainable.export(manifest).save(run.staging_dir)
    logger.info("%s adaptor %s: mean per-prompt TV to target %s -> %s", job.method, manifest.id,
                before["mean_prompt_tv"], after["mean_prompt_tv"])  # fmt: skip
    return manifest


@register_trainer("dft")
def dft(job, pipe, classifier, staging_dir, checkpoint_dir, progress, should_stop) -> AdaptorManifest:
    return train_dft(job, pipe, classifier, staging_dir, checkpoint_dir, progress, should_stop)


@register_trainer("prefix")
def prefix(job, pipe, classifier, staging_dir, checkpoint_dir, progress, should_stop) -> AdaptorManifest:
    """Soft prefix tokens only: `dft` with train='prefix' fixed (common.finetune_config.check_hyperparameters)."""
    return train_dft(job, pipe, classifier, staging_dir, checkpoint_dir, progress, should_stop)
