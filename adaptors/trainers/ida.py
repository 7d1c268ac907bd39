"""Trainer `ida`: calibrate per-group guidance weights by iterative distribution alignment (He et al.).

Per prompt: generate a batch on fresh noise with the current weights, classify it, compare the
class shares with the target, move each class's weight by step x (target - share), repeat until
the KL to the target is below a threshold or the budget is spent. He et al. give no step rule;
ours is a bracket per weight: the step halves whenever that class's error changes sign, because
on a toy model the share responded so steeply to the weight that a fixed gain oscillated forever.
Each iteration draws new seeds (one fixed set of 64 noises overfitted there), and the figures
reported are measured on other, held-out seeds.

`solver: policy_gradient` is the baseline the paper compares against (REINFORCE on a Gaussian
policy over the weights, reward -KL), on the same image budget.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from adaptors.assign import class_texts_for, generate_directed
from adaptors.audit import audit
from adaptors.classifiers import AttributeClassifier
from adaptors.fairness_gain import fit_summary, prompt_fit, require_fairness_gain
from adaptors.generation import GenerationCancelled, GenerationSpec
from adaptors.ida import IdaAdaptor, ida_directions
from adaptors.trainers.registry import ProgressFn, StopFn, adaptor_id_for, register_trainer, require_known_attributes
from common import bias as metrics
from common.adaptor_manifest import AdaptorManifest
from common.finetune_config import IDAConfig
from common.schemas import FinetuneJob

logger = logging.getLogger(__name__)
Weights = dict[str, dict[str, float]]


def kl_to_target(report, target: dict[str, dict[str, float]]) -> float:
    """Sum over attributes of KL(realised || target) (natural log), the quantity IDA minimises."""
    return float(sum(metrics.kl_divergence(report.realised[a], target[a]) for a in target))


class _Sampler:
    """Generate and audit one prompt's images with given weights; counts every image for the budget."""

    def __init__(self, pipe, classifier, texts, target, cfg: IDAConfig) -> None:
        self.pipe, self.classifier, self.texts, self.target, self.cfg = pipe, classifier, texts, target, cfg
        self.images = 0

    def __call__(self, prompt: str, weights: Weights, n: int, seed: int):
        cfg = self.cfg
        spec = GenerationSpec(prompt=prompt, num_images=n, seed=seed, steps=cfg.steps, guidance_scale=cfg.guidance_scale)
        directions = [ida_directions(prompt, weights, self.texts)] * n
        images = generate_directed(self.pipe, spec, directions, self.cfg.warmup_steps, max_batch=self.cfg.max_batch)
        self.images += n
        return audit(self.classifier, images, self.target)


def calibrate_ida(sample: _Sampler, prompt: str, target: dict, cfg: IDAConfig, seed: int, report_fn) -> tuple[Weights, list]:
    weights: Weights = {a: {c: 0.0 for c in target[a]} for a in target}
    step = {a: {c: cfg.step for c in target[a]} for a in target}
    last_error: dict[str, dict[str, float]] = {}
    curve = []
    for it in range(cfg.max_iterations):
        report = sample(prompt, weights, cfg.images_per_iteration, seed + it)
        kl = kl_to_target(report, target)
        curve.append({"iteration": it + 1, "kl": round(kl, 5), "weights": _rounded(weights)})
        report_fn(curve[-1])
        if kl < cfg.kl_threshold:
            break
        for a in target:
            for c in target[a]:
                error = target[a][c] - report.realised[a].get(c, 0.0)
                if it and np.sign(error) != np.sign(last_error[a][c]):
                    step[a][c] /= 2.0  # overshot: the bracket closes
                weights[a][c] += step[a][c] * error
                last_error.setdefault(a, {})[c] = error
    return weights, curve


def calibrate_policy_gradient(
    sample: _Sampler, prompt: str, target: dict, cfg: IDAConfig, seed: int, report_fn
) -> tuple[Weights, list]:
    """REINFORCE with a normalised-advantage baseline: same images per iteration as IDA, split over draws."""
    keys = [(a, c) for a in target for c in target[a]]
    mean = np.zeros(len(keys))
    rng = np.random.default_rng(seed)
    per_draw = max(1, cfg.images_per_iteration // cfg.pg_samples)
    curve = []
    for it in range(cfg.max_iterations):
        noise = rng.normal(0.0, cfg.pg_sigma, size=(cfg.pg_samples, len(keys)))
        rewards, kls = [], []
        for s in range(cfg.pg_samples):
            w = _unflatten(keys, mean + noise[s])
            kl = kl_to_target(sample(prompt, w, per_draw, seed + 1000 * it + s), target)
            kls.append(kl)
            rewards.append(-kl)
        r = np.array(rewards)
        advantage = (r - r.mean()) / (r.std() + 1e-8)
        mean = mean + (advantage[:, None] * noise).mean(0)
        curve.append({"iteration": it + 1, "kl": round(float(np.mean(kls)), 5), "weights": _rounded(_unflatten(keys, mean))})
        report_fn(curve[-1])
        if float(np.mean(kls)) < cfg.kl_threshold:
            break
    return _unflatten(keys, mean), curve


def _pooled(rows: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The mean of equally sized prompts' realised shares."""
    return {a: {c: sum(r[a][c] for r in rows) / len(rows) for c in rows[0][a]} for a in rows[0]}


def _unflatten(keys, values) -> Weights:
    out: Weights = {}
    for (a, c), v in zip(keys, values):
        out.setdefault(a, {})[c] = float(v)
    return out


def _rounded(weights: Weights) -> Weights:
    return {a: {c: round(v, 4) for c, v in ws.items()} for a, ws in weights.items()}


@register_trainer("ida")
def train_ida(
    job: FinetuneJob,
    pipe,
    classifier: AttributeClassifier,
    staging_dir: Path,
    checkpoint_dir: Path,
    progress: ProgressFn,
    should_stop: StopFn,
) -> AdaptorManifest:
    """Calibrate every prompt of the job; held-out-seed shares before and after go into the manifest."""
    cfg = IDAConfig.from_hyperparameters(dict(job.hyperparameters))
    require_known_attributes(job, classifier)
    target = {a: {c: float(job.fairness_target[a].get(c, 0.0)) for c in classifier.attributes[a]} for a in job.fairness_target}
    texts = class_texts_for(job.base_model)
    sample = _Sampler(pipe, classifier, texts, target, cfg)
    solve = calibrate_ida if cfg.solver == "ida" else calibrate_policy_gradient
    t0 = time.time()
    all_weights, per_prompt = [], {}
    total = len(job.prompts) * cfg.max_iterations
    for p, prompt in enumerate(job.prompts):

        def report(point: dict, p: int = p, prompt: str = prompt) -> None:
            if should_stop():
                raise GenerationCancelled(f"calibration stopped at prompt {p + 1}/{len(job.prompts)}")
            progress({"step": p * cfg.max_iterations + point["iteration"], "total": total, "prompt": prompt, **point})

        with torch.no_grad():
            weights, curve = solve(sample, prompt, target, cfg, cfg.seed + 10_000 * p, report)
            before = sample(prompt, {a: {c: 0.0 for c in target[a]} for a in target}, cfg.eval_images, cfg.eval_seed + p)
            after = sample(prompt, weights, cfg.eval_images, cfg.eval_seed + p)
        all_weights.append(weights)
        per_prompt[prompt] = {
            "iterations": len(curve),
            "kl_curve": [c["kl"] for c in curve],
            "weights": _rounded(weights),
            "kl_before": round(kl_to_target(before, target), 5),
            "kl_after": round(kl_to_target(after, target), 5),
            "realised_before": {a: before.realised[a] for a in target},
            "realised_after": {a: after.realised[a] for a in target},
            "bias_before": {a: before.bias[a] for a in target},
            "bias_after": {a: after.bias[a] for a in target},
            "tv_before": prompt_fit(before.realised, target)["tv"],
            "tv_after": prompt_fit(after.realised, target)["tv"],
        }
    fit = {
        side: fit_summary(
            {p: row[f"realised_{side}"] for p, row in per_prompt.items()},
            _pooled([row[f"realised_{side}"] for row in per_prompt.values()]),
            target,
        )  # fmt: skip
        for side in ("before", "after")
    }
    require_fairness_gain(fit["before"]["mean_prompt_tv"], fit["after"]["mean_prompt_tv"], cfg.min_fairness_gain)
    manifest = AdaptorManifest(
        id=adaptor_id_for(staging_dir, job),
        kind=IdaAdaptor.kind,
        base_model=job.base_model,
        attributes=list(target),
        target={a: dict(job.fairness_target[a]) for a in job.fairness_target},
        metrics={
            "per_prompt": per_prompt,
            # calibrated and measured on the same prompts, on held-out seeds: `auto` reads each prompt's own fit
            "eval_prompts": list(job.prompts),
            "eval_prompts_held_out": False,
            "before": fit["before"],
            "after": fit["after"],
            "seconds": round(time.time() - t0, 2),
            "images_generated": sample.images,
            "held_out_seed": cfg.eval_seed,
        },
        hyperparameters={**asdict(cfg), "method": "ida"},
        prompt_set=job.prompt_set,
        prompts=list(job.prompts),
        sampler={
            "steps": cfg.steps,
            "guidance_scale": cfg.guidance_scale,
            "warmup_steps": cfg.warmup_steps,
            "scheduler": type(pipe.scheduler).__name__,
        },
        name=job.name,
    )
    IdaAdaptor.build(manifest, list(job.prompts), all_weights, texts).save(staging_dir)
    return manifest
