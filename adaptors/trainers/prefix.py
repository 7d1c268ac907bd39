"""Trainer `prefix`: fit soft prefix tokens so generated class shares match a fairness target.

Each iteration samples a batch per prompt with a few differentiable DDIM steps (the UNet sees the
latent detached and runs under activation checkpointing, so memory stays flat), classifies the
decoded images, assigns each image a target class by optimal transport (the cheapest relabelling
that realises the target counts in the batch, Shen et al.'s distributional alignment), and
minimises cross-entropy to those labels. Images whose assigned class equals what the frozen
model made from the same noise are pulled towards that frozen image (semantics preservation:
without it, "doctor" drifts into another occupation). Only the K prefix vectors are trained.

Also a script: `python -m adaptors.trainers.prefix --help`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from adaptors.audit import audit
from adaptors.classifiers import AttributeClassifier
from adaptors.generation import GenerationCancelled, GenerationSpec, default_size, generate, initial_latents
from adaptors.prefix import PREFIX_KEY, PrefixAdaptor, init_prefix, make_prompt_encoder
from adaptors.trainers import ProgressFn, StopFn, register_trainer
from common import bias as metrics
from common.adaptor_manifest import STAGING_PREFIX, AdaptorManifest, valid_adaptor_id
from common.schemas import FinetuneJob

logger = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "prefix_checkpoint.safetensors"
CHECKPOINT_STATE = "prefix_checkpoint.json"


@dataclass
class PrefixConfig:
    """Hyperparameters (job.hyperparameters overrides any of them); defaults take ~1-2 min on the testbed CPU."""

    num_tokens: int = 5
    iterations: int = 30
    steps: int = 5
    guidance_scale: float = 5.0
    batch_size: int = 8
    prompts_per_iteration: int = 2
    lr: float = 0.02
    preserve_weight: float = 0.5
    person_weight: float = 0.1
    checkpoint_every: int = 10
    seed: int = 0
    eval_images: int = 16
    eval_seed: int = 10_000
    init_scale: float = 0.1

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any]) -> PrefixConfig:
        names = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(hp) - set(names))
        if unknown:
            raise ValueError(f"hyperparameters: unknown for method 'prefix': {unknown}; known: {sorted(names)}")
        cfg = cls()
        for key, value in hp.items():
            default = getattr(cfg, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"hyperparameters.{key}: must be a number")
            if isinstance(default, int) and float(value) != int(value):
                raise ValueError(f"hyperparameters.{key}: must be an integer")
            setattr(cfg, key, type(default)(value))
        for key in ("num_tokens", "iterations", "steps", "batch_size", "prompts_per_iteration", "checkpoint_every"):
            if getattr(cfg, key) < 1:
                raise ValueError(f"hyperparameters.{key}: must be >= 1")
        return cfg


def largest_remainder(shares: np.ndarray, n: int) -> np.ndarray:
    """Integer counts summing to n, closest to shares * n (Hamilton's method)."""
    raw = shares / shares.sum() * n
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def assign_targets(probs: torch.Tensor, shares: np.ndarray) -> torch.Tensor:
    """The relabelling of a batch to the target counts that costs least in -log p (exact OT)."""
    import ot

    n = probs.shape[0]
    counts = largest_remainder(shares, n).astype(np.float64)
    cost = -np.log(probs.detach().double().cpu().numpy().clip(1e-12))
    plan = ot.emd(np.ones(n), counts, cost)
    return torch.from_numpy(plan.argmax(axis=1)).long()


def _sample_images(pipe, cond: torch.Tensor, uncond: torch.Tensor | None, latents: torch.Tensor, cfg: PrefixConfig):
    """Decoded images in [0, 1]; differentiable in `cond` through every step (latent input detached)."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.steps, device=latents.device)
    x = latents * scheduler.init_noise_sigma
    emb = cond if uncond is None else torch.cat([uncond, cond])

    def eps_fn(inp: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return pipe.unet(inp, t, encoder_hidden_states=e).sample

    for t in scheduler.timesteps:
        xin = x.detach()
        xin = scheduler.scale_model_input(xin if uncond is None else torch.cat([xin, xin]), t)
        if emb.requires_grad:
            eps = checkpoint(eps_fn, xin, t, emb, use_reentrant=False)
        else:
            eps = eps_fn(xin, t, emb)
        if uncond is not None:
            e_u, e_c = eps.chunk(2)
            eps = e_u + cfg.guidance_scale * (e_c - e_u)
        x = scheduler.step(eps, t, x).prev_sample
    decoded = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def _save_checkpoint(folder: Path, prefix: torch.Tensor, opt: torch.optim.Adam, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"prefix": prefix.detach().cpu().contiguous()}
    adam = opt.state.get(prefix, {})
    if adam:
        tensors["exp_avg"] = adam["exp_avg"].detach().cpu().contiguous()
        tensors["exp_avg_sq"] = adam["exp_avg_sq"].detach().cpu().contiguous()
        state = {**state, "adam_step": float(adam["step"])}
    tmp_w, tmp_s = folder / (CHECKPOINT_WEIGHTS + ".tmp"), folder / (CHECKPOINT_STATE + ".tmp")
    save_file(tensors, str(tmp_w))
    tmp_s.write_text(json.dumps(state))
    os.replace(tmp_w, folder / CHECKPOINT_WEIGHTS)  # weights first: the state names a finished iteration
    os.replace(tmp_s, folder / CHECKPOINT_STATE)


def _load_checkpoint(folder: Path, prefix: torch.Tensor, opt: torch.optim.Adam, config: dict) -> dict | None:
    if not (folder / CHECKPOINT_STATE).is_file() or not (folder / CHECKPOINT_WEIGHTS).is_file():
        return None
    state = json.loads((folder / CHECKPOINT_STATE).read_text())
    if state.get("config") != config:
        logger.warning("ignoring checkpoint in %s: it was made with other hyperparameters", folder)
        return None
    tensors = load_file(str(folder / CHECKPOINT_WEIGHTS))
    with torch.no_grad():
        prefix.copy_(tensors["prefix"].to(prefix.device, prefix.dtype))
    if "exp_avg" in tensors:
        opt.state[prefix] = {
            "step": torch.tensor(state["adam_step"]),
            "exp_avg": tensors["exp_avg"].to(prefix.device),
            "exp_avg_sq": tensors["exp_avg_sq"].to(prefix.device),
        }
    logger.info("resuming prefix training from %s at iteration %d", folder, state["iteration"])
    return state


def _realised(pipe, classifier, prompts, target, cfg: PrefixConfig, encoder) -> dict[str, Any] | None:
    """Audit `eval_images` fresh-seed images per prompt (with or without the prefix); None when 0."""
    if cfg.eval_images <= 0:
        return None
    images = []
    for j, prompt in enumerate(prompts):
        spec = GenerationSpec(
            prompt=prompt,
            num_images=cfg.eval_images,
            seed=cfg.eval_seed + j,
            steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
        )
        images.append(generate(pipe, spec, max_batch=max(cfg.batch_size, 8), encode_prompt=encoder))
    report = audit(classifier, torch.cat(images), {a: target[a] for a in target})
    return {
        "realised": {a: report.realised[a] for a in target},
        "bias": {a: report.bias[a] for a in target},
        "target_distance": report.target_distance,
        "no_person": report.no_person,
        "images": int(sum(len(x) for x in images)),
    }


def adaptor_id_for(staging_dir: Path, job: FinetuneJob) -> str:
    """The id the caller chose (`.staging-<id>`), else one derived from the job's name."""
    name = Path(staging_dir).name
    if name.startswith(STAGING_PREFIX) and valid_adaptor_id(name[len(STAGING_PREFIX) :]):
        return name[len(STAGING_PREFIX) :]
    if valid_adaptor_id(name):
        return name
    slug = re.sub(r"[^a-z0-9_-]+", "-", (job.name or "prefix").lower()).strip("-_")[:40] or "prefix"
    return f"{slug}-{uuid.uuid4().hex[:8]}"


@register_trainer("prefix")
def train_prefix(
    job: FinetuneJob,
    pipe,
    classifier: AttributeClassifier,
    staging_dir: Path,
    checkpoint_dir: Path,
    progress: ProgressFn,
    should_stop: StopFn,
) -> AdaptorManifest:
    cfg = PrefixConfig.from_hyperparameters(dict(job.hyperparameters))
    if not job.prompts:
        raise ValueError("prompts: the prefix trainer needs at least one prompt")
    target = {a: dict(d) for a, d in job.fairness_target.items()}
    for attr in target:
        if attr not in classifier.attributes:
            raise ValueError(f"fairness_target.{attr}: the classifier does not know this attribute")
    shares = {a: np.array([target[a].get(c, 0.0) for c in classifier.attributes[a]]) for a in target}
    staging_dir, checkpoint_dir = Path(staging_dir), Path(checkpoint_dir)
    device = pipe.device
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)

    prefix = init_prefix(pipe, cfg.num_tokens, cfg.seed, cfg.init_scale).to(device).requires_grad_(True)
    opt = torch.optim.Adam([prefix], lr=cfg.lr)
    config_key = {**asdict(cfg), "prompts": list(job.prompts), "target": target}
    state = _load_checkpoint(checkpoint_dir, prefix, opt, config_key) or {"iteration": 0, "history": []}
    encoder = make_prompt_encoder(pipe, prefix)
    size = default_size(pipe)

    if "before" not in state:
        with torch.no_grad():
            state["before"] = _realised(pipe, classifier, job.prompts, target, cfg, None)

    for it in range(state["iteration"], cfg.iterations):
        if should_stop():
            _save_checkpoint(checkpoint_dir, prefix, opt, {**state, "config": config_key})
            raise GenerationCancelled(f"prefix training stopped at iteration {it}/{cfg.iterations}")
        k = min(cfg.prompts_per_iteration, len(job.prompts))
        start = (it * k) % len(job.prompts)
        prompts = [job.prompts[(start + j) % len(job.prompts)] for j in range(k)]
        batch = [p for p in prompts for _ in range(cfg.batch_size)]
        n = len(batch)
        latents = initial_latents(pipe, cfg.seed, range(it * n, (it + 1) * n), size, size)
        uncond = None
        if cfg.guidance_scale > 1.0:
            uncond = pipe.encode_prompt([""] * n, device, 1, False)[0].detach()
        with torch.no_grad():
            frozen_cond = pipe.encode_prompt(batch, device, 1, False)[0]
            frozen = _sample_images(pipe, frozen_cond, uncond, latents, cfg)
            frozen_pred = classifier.predict(frozen)

        images = _sample_images(pipe, encoder(batch), uncond, latents, cfg)
        logits = classifier.logits(images)
        align = images.new_zeros(())
        keep = torch.ones(n, dtype=torch.bool)
        batch_biases = []
        for attr in target:
            probs = torch.softmax(logits[attr].float(), dim=-1)
            labels = torch.empty(n, dtype=torch.long)
            for g in range(k):  # the target holds per prompt
                rows = slice(g * cfg.batch_size, (g + 1) * cfg.batch_size)
                labels[rows] = assign_targets(probs[rows], shares[attr])
            labels = labels.to(probs.device)
            align = align + F.cross_entropy(logits[attr].float(), labels)
            keep &= (labels == frozen_pred.probs[attr].argmax(-1).to(labels.device)).cpu()
            names = classifier.attributes[attr]
            predicted = [names[i] for i in probs.argmax(-1).tolist()]
            batch_biases.append(metrics.bias(metrics.frequencies(predicted, names)))
        align = align / len(target)
        keep = keep.to(images.device)
        preserve = F.mse_loss(images[keep], frozen[keep]) if keep.any() else images.new_zeros(())
        person = F.binary_cross_entropy_with_logits(logits["person"].float(), torch.ones_like(logits["person"]))
        loss = align + cfg.preserve_weight * preserve + cfg.person_weight * person
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        record = {
            "iteration": it + 1,
            "step": it + 1,  # the job store's progress field
            "total": cfg.iterations,
            "loss": round(loss.item(), 6),
            "batch_bias": round(float(np.mean(batch_biases)), 6),
        }
        state["iteration"] = it + 1
        state["history"].append(record)
        logger.debug("prefix iteration %d/%d loss %.4f", it + 1, cfg.iterations, record["loss"])
        progress(dict(record))
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            _save_checkpoint(checkpoint_dir, prefix, opt, {**state, "config": config_key})

    final = prefix.detach().float().cpu().clone()
    with torch.no_grad():
        after = _realised(pipe, classifier, job.prompts, target, cfg, make_prompt_encoder(pipe, final.to(device)))
    manifest = AdaptorManifest(
        id=adaptor_id_for(staging_dir, job),
        kind=PrefixAdaptor.kind,
        base_model=job.base_model,
        attributes=list(target),
        target=target,
        metrics={"before": state["before"], "after": after, "history": state["history"][-5:]},
        hyperparameters=asdict(cfg),
        prompt_set=job.prompt_set,
        sampler={
            "steps": cfg.steps,
            "guidance_scale": cfg.guidance_scale,
            "scheduler": type(pipe.scheduler).__name__,
        },
        name=job.name,
    )
    PrefixAdaptor(manifest, {PREFIX_KEY: final}).save(staging_dir)
    if state["before"] and after:
        logger.info("prefix adaptor %s: bias %s -> %s", manifest.id, state["before"]["bias"], after["bias"])
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fit fairness prefix tokens for a base model (writes an adaptor).")
    parser.add_argument("--model", default="testbed", help="'testbed', a diffusers folder or a cached hub id")
    parser.add_argument("--classifier", default="auto", help="'auto' (testbed) or a classifier folder")
    parser.add_argument("--target", required=True, help='JSON, e.g. {"gender": {"female": 0.5, "male": 0.5}}')
    parser.add_argument("--prompts", nargs="+", required=True)
    parser.add_argument("--output", required=True, help="adaptor folder to write (name it .staging-<id> for an id)")
    parser.add_argument("--checkpoint-dir", default=None, help="resumable state (default: <output>.ckpt)")
    parser.add_argument("--hparams", default="{}", help="JSON of PrefixConfig overrides")
    parser.add_argument("--name", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> AdaptorManifest:
    from adaptors.base import load_adaptor
    from adaptors.classifiers import load_classifier
    from adaptors.generation import load_pipeline
    from common.schemas import validate_target

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device=args.device)
    classifier = load_classifier(args.classifier, args.model, device=pipe.device)
    if classifier is None:
        raise SystemExit(f"no attribute classifier for {args.model!r}: pass --classifier")
    job = FinetuneJob(
        method="prefix",
        base_model=args.model,
        fairness_target=validate_target(json.loads(args.target), classifier.attributes),
        prompts=list(args.prompts),
        hyperparameters=json.loads(args.hparams),
        name=args.name,
    )
    output = Path(args.output)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else output.with_name(output.name + ".ckpt")
    manifest = train_prefix(job, pipe, classifier, output, ckpt, lambda p: logger.info("progress %s", p), lambda: False)
    load_adaptor(output)  # reload to check what was written
    logger.info("wrote %s: %s", output, json.dumps(manifest.metrics["after"]))
    return manifest


if __name__ == "__main__":
    main()
