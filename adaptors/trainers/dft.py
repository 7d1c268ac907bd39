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

import functools
import json
import logging
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from adaptors.audit import classify, summarise
from adaptors.classifiers import AttributeClassifier
from adaptors.generation import GenerationCancelled, GenerationSpec, default_size, generate, initial_latents
from adaptors.subject import require_subject_kept, subject_kept, subject_reader
from adaptors.trainers import ProgressFn, StopFn, adaptor_id_for, register_trainer, require_known_attributes
from adaptors.trainers.alignment import alignment_targets
from adaptors.trainers.checkpoint import load_checkpoint, save_checkpoint
from adaptors.trainers.mixing import draw_noise, draw_partners, encode_mixed, token_lengths, varying_positions
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
    images = []
    for j, prompt in enumerate(prompts):
        spec = GenerationSpec(prompt=prompt, num_images=cfg.eval_images, seed=cfg.eval_seed + j,
                              steps=cfg.eval_steps, guidance_scale=cfg.guidance_scale)  # fmt: skip
        if base:
            with trainable.frozen():
                images.append(generate(pipe, spec, max_batch=64))
        else:
            images.append(generate(pipe, spec, max_batch=64, encode_prompt=trainable.prompt_encoder()))
    images_t = torch.cat(images)
    labels = classify(classifier, images_t)  # once: the pooled and the per-prompt summaries share it
    report = summarise(labels, classifier.attributes, target)
    per_prompt = []
    for j, prompt in enumerate(prompts):
        rows = labels[j * cfg.eval_images : (j + 1) * cfg.eval_images]
        per_prompt.append({"prompt": prompt, "bias": summarise(rows, classifier.attributes, target).bias})
    summary = {
        "realised": {a: report.realised[a] for a in target},
        "bias": {a: report.bias[a] for a in target},
        "mean_prompt_bias": {a: round(float(np.mean([p["bias"][a] for p in per_prompt])), 4) for a in target},
        "max_prompt_bias": {a: round(float(np.max([p["bias"][a] for p in per_prompt])), 4) for a in target},
        "prompt_bias": {p["prompt"]: p["bias"] for p in per_prompt},
        "target_distance": report.target_distance,
        "no_person": report.no_person,
        "images": len(images_t),
    }
    return images_t, summary


def semantics(classifier, before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """How close the finetuned images stay to the base model's from the same seeds."""
    out = {"pixel_mse": round(F.mse_loss(after, before).item(), 5)}
    with torch.no_grad():
        fa, fb = _features(classifier, after), _features(classifier, before)
    if fa is not None:
        out["feature_cosine"] = round(F.cosine_similarity(fa, fb).mean().item(), 4)
    return out


class DFTLosses:
    """One iteration's losses (alignment, preservation) and their diagnostics, apart from sampling so a test can
    feed it chosen images."""

    def __init__(self, cfg: DFTConfig, shares: dict[str, np.ndarray], classifier: AttributeClassifier) -> None:
        self.cfg, self.shares, self.classifier = cfg, shares, classifier

    def losses(self, images, frozen, groups: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, classifier = self.cfg, self.classifier
        n = images.shape[0]
        per = n // groups
        logits = classifier.logits(images)
        probs = {a: torch.softmax(logits[a].float(), -1) for a in self.shares}
        person = (torch.sigmoid(logits["person"].detach()) > 0.5).cpu().numpy()
        frozen_pred = classifier.predict(frozen)
        frozen_person = (frozen_pred.person > 0.5).cpu().numpy()
        labels = {a: np.full(n, -1, dtype=np.int64) for a in self.shares}
        dropped = 0
        distribution = images.new_zeros(())
        for g in range(groups):
            rows = np.arange(g * per, (g + 1) * per)
            rows = rows[person[rows]]
            if len(rows) == 0:
                continue
            targets = alignment_targets({a: probs[a][rows].detach().cpu().numpy() for a in self.shares}, self.shares,
                                        draws=cfg.target_draws, confidence=cfg.confidence, rng=rng)  # fmt: skip
            dropped += targets.dropped()
            for a in self.shares:
                labels[a][rows] = targets.labels[a]
                if cfg.distribution_weight > 0:
                    mean = probs[a][rows].mean(0)
                    distribution = distribution + ((mean - torch.as_tensor(self.shares[a], dtype=mean.dtype)) ** 2).sum()
        align = images.new_zeros(())
        flips = np.zeros(n, dtype=bool)
        for a in self.shares:
            lab = torch.from_numpy(labels[a]).to(images.device)
            valid = lab >= 0
            if valid.any():
                align = align + F.cross_entropy(logits[a].float()[valid] / cfg.ce_temperature, lab[valid])
            base_class = frozen_pred.probs[a].argmax(-1).cpu().numpy()
            current = probs[a].detach().argmax(-1).cpu().numpy()
            # an image changes class if its target says so, or (no target) if it already has: preserving
            # the frozen image there would pull the model back to the bias it is trained away from
            flips |= np.where(labels[a] >= 0, labels[a] != base_class, current != base_class)
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
        preserve = preserve.mean()
        keep_person = torch.from_numpy(frozen_person).to(images.device)
        person_loss = images.new_zeros(())
        if keep_person.any():
            person_logit = logits["person"].float()[keep_person]
            person_loss = F.binary_cross_entropy_with_logits(person_logit, torch.ones_like(person_logit))
        loss = align + preserve + cfg.person_weight * person_loss + cfg.distribution_weight * distribution
        # bias is per prompt, then averaged: pooled over prompts that lean opposite ways it looks fair when none is
        batch_bias, batch_share, prompt_bias = {}, {}, {}
        for a in self.shares:
            names = classifier.attributes[a]
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
        info = {
            "loss": round(loss.item(), 5),
            "align": round(align.item(), 5),
            "preserve": round(preserve.item(), 5),
            "person": round(person_loss.item(), 5),
            "distribution": round(float(distribution), 5),
            "no_person": int((~person).sum()),
            "no_target": dropped,
            "flips": int(flips.sum()),
            "batch_bias": batch_bias,
            "batch_share": batch_share,
            "prompt_bias": prompt_bias,
        }
        return loss, info


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
    leanings = None
    if cfg.token_map_init != "random":
        leanings = stored_leanings(checkpoint_dir, pipe, classifier, list(job.prompts), shares, cfg, progress, should_stop)
    fit_prompts = list(job.prompts)
    check_prompts(cfg, fit_prompts)
    if cfg.token_map_cross_fit:  # the read from every other prompt, the scale trained on the others
        assert leanings is not None
        fit_prompts, leanings = fit_prompts[::2], leanings[::2]
        job = replace(job, prompts=list(job.prompts)[1::2])
    trainable = make_trainable(pipe, cfg.train, cfg.rank, cfg.num_tokens, cfg.seed, cfg.init_scale,
                               cfg.text_encoder_modules, cfg.unet_modules, fit_prompts, cfg.token_map_read,
                               cfg.token_map_form, leanings, cfg.token_map_init, cfg.regression_scale,
                               cfg.token_map_keep, cfg.token_map_train)  # fmt: skip
    try:
        return _train(job, pipe, classifier, cfg, shares, target, eval_prompts, trainable,
                      staging_dir, checkpoint_dir, progress, should_stop)  # fmt: skip
    finally:
        trainable.remove()


LEANINGS_FILE = "measured_leanings.json"


def stored_leanings(
    folder: Path,
    pipe,
    classifier,
    prompts: list[str],
    shares: dict[str, np.ndarray],
    cfg: DFTConfig,
    progress: ProgressFn,
    should_stop: StopFn,
) -> np.ndarray:
    """`measured_leanings`, kept beside the checkpoint: a resumed job reads them back instead of generating its
    base images again (on real SD, prompts x `measure_images` images: the longest part of a short job).

    The file records what the measurement depends on, so one made with other settings is measured anew."""
    key = {"prompts": prompts, "shares": {a: v.tolist() for a, v in shares.items()}, "seed": cfg.seed,
           "images": cfg.measure_images or cfg.images_per_prompt, "steps": cfg.steps, "init": cfg.token_map_init,
           "guidance_scale": cfg.measure_guidance_scale or cfg.guidance_scale}  # fmt: skip
    path = folder / LEANINGS_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return np.asarray(saved["leanings"], dtype=np.float64)
    leanings = measured_leanings(pipe, classifier, prompts, shares, cfg, progress, should_stop)
    folder.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps({"key": key, "leanings": leanings.tolist()}))
    os.replace(staging, path)
    return leanings


def measured_leanings(
    pipe,
    classifier,
    prompts: list[str],
    shares: dict[str, np.ndarray],
    cfg: DFTConfig,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> np.ndarray:
    """prompts x classes: how far each training prompt's base images (`measure_images` at the training steps)
    lean from the target, per targeted class. A prompt with no person found counts as on target, so it pulls
    the measured rule nowhere.

    For `token_map_init: measured` a lean is the class's share minus the target's. For `regression` it is the
    log-ratio of the two (centred over the attribute's classes), with half an image added to every count: at a
    strong guidance scale the share is a steep sigmoid of how far a word leans, so the share saturates (a word
    drawn 20% female comes out 5%) and a linear read fitted to it cannot say which saturated words lean further,
    while the log-odds keep growing with the lean, so moving a word by its fitted log-odds is one rule to the middle."""
    rows = []
    n = cfg.measure_images or cfg.images_per_prompt
    for j, prompt in enumerate(prompts):
        if should_stop is not None and should_stop():
            raise GenerationCancelled(f"training stopped while measuring the base model's images ({j}/{len(prompts)})")
        spec = GenerationSpec(prompt=prompt, num_images=n, seed=cfg.seed + j, steps=cfg.steps,
                              guidance_scale=cfg.measure_guidance_scale or cfg.guidance_scale)  # fmt: skip
        with torch.no_grad():
            images = classify(classifier, generate(pipe, spec, max_batch=64))
        row = []
        for a, want in shares.items():
            labels = [image.label(a) for image in images]
            if not any(labels):
                row.append(np.zeros_like(want))
                continue
            got = np.array(list(metrics.frequencies(labels, classifier.attributes[a]).values()))  # `shares`' order
            if cfg.token_map_init == "regression":
                found = sum(1 for label in labels if label)
                odds = np.log((got * found + 0.5) / (found + 0.5 * len(want))) - np.log(np.maximum(want, 1e-3))
                row.append(odds - odds.mean())
            else:
                row.append(got - want)
        rows.append(np.concatenate(row))
        if progress is not None:  # the first minutes of a measured job, before any iteration
            progress({"phase": "measuring base images", "step": j + 1, "total": len(prompts), "prompt": prompt})
    return np.stack(rows)


def learning_rate(cfg: DFTConfig, iteration: int) -> float:
    """The rate of this (0-based) iteration's step."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * iteration / cfg.iterations))
    return cfg.lr


def _train(job, pipe, classifier, cfg, shares, target, eval_prompts, trainable, staging_dir, checkpoint_dir,
           progress, should_stop) -> AdaptorManifest:  # fmt: skip
    t0 = time.time()
    params = trainable.params
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMAModel(params, decay=cfg.ema_decay)
    config_key = {**asdict(cfg), "prompts": list(job.prompts), "target": target}
    state = load_checkpoint(checkpoint_dir, params, ema, opt, config_key) or {"iteration": 0, "history": []}
    size = default_size(pipe)
    step = DFTLosses(cfg, shares, classifier)
    k = min(cfg.prompts_per_iteration, len(job.prompts))
    augment = cfg.prompt_mixing > 0 or cfg.prompt_noise > 0
    lengths = dict(zip(job.prompts, token_lengths(pipe, list(job.prompts)), strict=True)) if augment else {}
    varying = varying_positions(pipe, list(job.prompts)) if augment else None

    for it in range(state["iteration"], cfg.iterations):
        if should_stop():
            save_checkpoint(checkpoint_dir, params, ema, opt, {**state, "config": config_key})
            raise GenerationCancelled(f"training stopped at iteration {it}/{cfg.iterations}")
        rng = np.random.default_rng([cfg.seed, it])
        start = (it * k) % len(job.prompts)
        prompts = [job.prompts[(start + j) % len(job.prompts)] for j in range(k)]
        batch = [p for p in prompts for _ in range(cfg.images_per_prompt)]
        n = len(batch)
        steps = cfg.steps + int(rng.integers(-cfg.steps_jitter, cfg.steps_jitter + 1))
        latents = initial_latents(pipe, cfg.seed, range(it * n, (it + 1) * n), size, size)
        empty = [""] * n
        encode = trainable.encode
        if augment:
            mixes = draw_partners(prompts, list(job.prompts), lengths, cfg.prompt_mixing, rng)
            partners = [q for q, _ in mixes for _ in range(cfg.images_per_prompt)]
            weights = [w for _, w in mixes for _ in range(cfg.images_per_prompt)]
            noise = draw_noise(pipe, k, varying, cfg.prompt_noise, rng).repeat(cfg.images_per_prompt, axis=0)
            encode = functools.partial(encode_mixed, pipe, partners=partners, weights=weights, noise=noise)
        with torch.no_grad(), trainable.frozen():
            frozen = sample(pipe, encode(batch), trainable.encode_negative(empty), latents, steps, cfg.guidance_scale)
        images = sample(pipe, encode(batch), trainable.encode_negative(empty), latents, steps,
                        cfg.guidance_scale, adjusted=cfg.adjusted)  # fmt: skip
        loss, info = step.losses(images, frozen, k, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        skipped = not np.isfinite(grad_norm)
        if not skipped:
            for group in opt.param_groups:  # from the iteration alone, so a resumed job continues the schedule
                group["lr"] = learning_rate(cfg, it)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            ema.step(params)
        record = {"iteration": it + 1, "step": it + 1, "total": cfg.iterations, **info,
                  "grad_norm": round(grad_norm, 6) if not skipped else None, "skipped": skipped,
                  "sampling_steps": steps}  # fmt: skip
        state["iteration"] = it + 1
        state["history"].append(record)
        progress(dict(record))
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            save_checkpoint(checkpoint_dir, params, ema, opt, {**state, "config": config_key})

    ema.copy_to(params)  # what is published and evaluated is the EMA
    train_seconds = round(time.time() - t0, 2)
    with torch.no_grad():
        before_images, before = evaluate(pipe, classifier, eval_prompts, target, cfg, trainable, base=True)
        after_images, after = evaluate(pipe, classifier, eval_prompts, target, cfg, trainable, base=False)
    reader = subject_reader(job.base_model, eval_prompts)
    kept = subject_kept(reader, before_images, after_images, eval_prompts) if reader is not None else None
    measured = {"before": before["bias"], "after": after["bias"]}
    require_subject_kept(kept, cfg.min_subject_kept, measured)
    manifest = AdaptorManifest(
        id=adaptor_id_for(staging_dir, job),
        kind="pending",
        base_model=job.base_model,
        attributes=list(target),
        target=target,
        metrics={
            "eval_prompts": eval_prompts,
            # False when no held-out prompts were given and the figures are the training prompts' own
            "eval_prompts_held_out": not set(eval_prompts) & set(job.prompts),
            "before": before,
            "after": after,
            "semantics": {**semantics(classifier, before_images, after_images), "subject_kept": kept},
            "train_seconds": train_seconds,
            "iterations": cfg.iterations,
            "history": state["history"][-5:],
        },
        hyperparameters={**asdict(cfg), "method": job.method},
        prompt_set=job.prompt_set,
        prompts=list(job.prompts),
        sampler={"steps": cfg.eval_steps, "guidance_scale": cfg.guidance_scale, "scheduler": type(pipe.scheduler).__name__},
        name=job.name,
    )
    trainable.export(manifest).save(staging_dir)
    logger.info("%s adaptor %s: bias %s -> %s", job.method, manifest.id, before["bias"], after["bias"])
    return manifest


@register_trainer("dft")
def dft(job, pipe, classifier, staging_dir, checkpoint_dir, progress, should_stop) -> AdaptorManifest:
    return train_dft(job, pipe, classifier, staging_dir, checkpoint_dir, progress, should_stop)


@register_trainer("prefix")
def prefix(job, pipe, classifier, staging_dir, checkpoint_dir, progress, should_stop) -> AdaptorManifest:
    """Soft prefix tokens only: `dft` with train='prefix' fixed (common.finetune_config.check_hyperparameters)."""
    return train_dft(job, pipe, classifier, staging_dir, checkpoint_dir, progress, should_stop)
