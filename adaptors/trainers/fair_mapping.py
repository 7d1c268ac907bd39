"""Trainer `fair_mapping`: Fair Mapping (Li et al., arXiv 2311.17695), trained in text space only.

For each training prompt p and each class j of a targeted attribute, p_j names the class ("a photo
of the face of a female doctor, a person"; the base model's ClassTexts). With v = M(E(p)):
  L_text = d(v, E(p))                                         keeps the prompt's meaning
  L_fair = sum_j | w_j d(v, E(p_j)) - mean_k w_k d(v, E(p_k)) |   makes v equidistant from the groups
  L      = L_text + fair_weight * L_fair
d is the mean squared distance over every token position and width (the hidden states the UNet
reads; each class word is one token on the testbed and in CLIP's vocabulary for the generic words,
so the variants stay aligned). w_j = K * target_j: all ones for a uniform target, which is the
paper's loss; for another target the weighted distances are equal when v is nearer the groups the
target favours (an extension the paper does not have; the manifest reports how far it gets).

No images, classifier or denoiser in training: the map trains in seconds. The published adaptor is
then evaluated like every finetune (adaptors.trainers.dft.evaluate_prompts: per-prompt fit on the
evaluation prompts, the subject gate, the fairness gate) before anything is written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from adaptors.assign import augment_prompt, class_texts_for
from adaptors.classifiers import AttributeClassifier
from adaptors.generation import GenerationCancelled
from adaptors.mapping import KeywordDetector, MappingAdaptor, ResidualMap, base_embeddings, make_mapping_encoder
from adaptors.trainers.dft import evaluate_prompts, gated_metrics
from adaptors.trainers.registry import ProgressFn, StopFn, adaptor_id_for, register_trainer, require_known_attributes
from common.adaptor_manifest import AdaptorManifest
from common.finetune_config import FairMappingConfig
from common.schemas import FinetuneJob

logger = logging.getLogger(__name__)


def distance(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """d(a, b) over the last two axes (tokens x width): the mean squared difference over the tokens `mask` keeps."""
    per_token = (a - b).pow(2).mean(dim=-1)
    if mask is None:
        return per_token.mean(dim=-1)
    return (per_token * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)


class FairDistance:
    """The two losses over fixed embeddings: E(p) [P x L x D] and, per attribute, E(p_j) [P x K x L x D] aligned to
    p's tokens with the tokens compared [P x K x L], and the classes' weights w [K]."""

    def __init__(self, neutral: torch.Tensor, groups: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                 weights: dict[str, torch.Tensor]) -> None:  # fmt: skip
        self.neutral, self.groups, self.masks, self.weights = neutral, groups, masks, weights

    def __call__(self, mapped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_text, L_fair) of the mapped embeddings v [P x L x D], each a mean over prompts."""
        text = distance(mapped, self.neutral).mean()
        fair = mapped.new_zeros(())
        for attr, e in self.groups.items():
            scaled = distance(mapped.unsqueeze(1), e, self.masks[attr]) * self.weights[attr]  # P x K
            fair = fair + (scaled - scaled.mean(dim=1, keepdim=True)).abs().sum(dim=1).mean()
        return text, fair


def group_prompts(prompt: str, attr: str, classes: list[str], texts) -> list[str]:
    return [augment_prompt(prompt, {attr: c}, texts) for c in classes]


def token_alignment(neutral_ids: list[int], variant_ids: list[int], length: int, aligned: bool) -> tuple[list[int], list[float]]:
    """For each of p's token positions, the variant's position holding the same word, and whether it has one.

    The variant is p with a group's words inserted (as a span): positions before the span map to
    themselves, those after it shift by its length; positions pushed past the end are not compared.
    With `aligned` False every position maps to itself (the variant compared position by position)."""
    if not aligned:
        return list(range(length)), [1.0] * length
    start = 0
    while start < min(len(neutral_ids), len(variant_ids)) and neutral_ids[start] == variant_ids[start]:
        start += 1
    shift = max(0, len(variant_ids) - len(neutral_ids))
    index = [t if t < start else t + shift for t in range(length)]
    return [min(i, length - 1) for i in index], [1.0 if i < length else 0.0 for i in index]


def build_losses(pipe, prompts: list[str], target: dict[str, dict[str, float]], classes: dict[str, list[str]],
                 texts, aligned: bool = True) -> FairDistance:  # fmt: skip
    """The fixed embeddings of the prompts and of their group variants (aligned to the prompts' tokens), and each
    class's weight K * target."""
    tokenizer = pipe.tokenizer
    with torch.no_grad():
        neutral = base_embeddings(pipe, prompts).float()
        length = neutral.shape[1]
        groups, masks, weights = {}, {}, {}
        for attr in target:
            k = len(classes[attr])
            variants = [v for p in prompts for v in group_prompts(p, attr, classes[attr], texts)]
            e = base_embeddings(pipe, variants).float()
            ids = tokenizer(variants).input_ids
            base_ids = tokenizer(prompts).input_ids
            rows = [token_alignment(base_ids[i // k], ids[i], length, aligned) for i in range(len(variants))]
            index = torch.tensor([r[0] for r in rows], device=e.device)
            e = torch.gather(e, 1, index.unsqueeze(-1).expand(-1, -1, e.shape[-1]))
            groups[attr] = e.view(len(prompts), k, length, e.shape[-1])
            masks[attr] = torch.tensor([r[1] for r in rows], device=e.device).view(len(prompts), k, length)
            weights[attr] = torch.tensor([k * target[attr].get(c, 0.0) for c in classes[attr]], device=e.device)
    return FairDistance(neutral, groups, masks, weights)


def fit_map(losses: FairDistance, cfg: FairMappingConfig, progress: ProgressFn, should_stop: StopFn) -> tuple[ResidualMap, list]:
    """Adam on the map's parameters, full batch; returns the map and the loss curve (every iteration's losses)."""
    torch.manual_seed(cfg.seed)
    module = ResidualMap(losses.neutral.shape[-1], cfg.depth).to(losses.neutral.device)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    every = max(1, cfg.iterations // 50)
    curve = []
    for it in range(cfg.iterations):
        if should_stop():
            raise GenerationCancelled(f"training stopped at iteration {it}/{cfg.iterations}")
        text, fair = losses(module(losses.neutral))
        loss = text + cfg.fair_weight * fair
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        record = {"iteration": it + 1, "step": it + 1, "total": cfg.iterations, "loss": round(loss.item(), 6),
                  "text": round(text.item(), 6), "fair_distance": round(fair.item(), 6)}  # fmt: skip
        curve.append(record)
        if (it + 1) % every == 0 or it + 1 == cfg.iterations:
            progress(dict(record))
    return module.eval().requires_grad_(False), curve


@register_trainer("fair_mapping")
def train_fair_mapping(
    job: FinetuneJob,
    pipe,
    classifier: AttributeClassifier,
    staging_dir: Path,
    checkpoint_dir: Path,
    progress: ProgressFn,
    should_stop: StopFn,
) -> AdaptorManifest:
    """Train the map on the job's prompts, evaluate base and mapped on the evaluation prompts, gate, write the adaptor.

    The map trains in seconds, so nothing is checkpointed: a stopped job starts over."""
    cfg = FairMappingConfig.from_hyperparameters(dict(job.hyperparameters))
    require_known_attributes(job, classifier)
    classes = {a: list(classifier.attributes[a]) for a in job.fairness_target}
    target = {a: {c: float(job.fairness_target[a].get(c, 0.0)) for c in classes[a]} for a in job.fairness_target}
    texts = class_texts_for(job.base_model)
    detector = KeywordDetector.build(texts, target, cfg.keywords())
    named = [p for p in job.prompts if detector.find(p)]
    if named:
        raise ValueError(f"prompts: {named[0]!r} names a group ({detector.find(named[0])}); the map trains on neutral prompts")
    eval_prompts = list(job.eval_prompts or job.prompts)

    t0 = time.time()
    losses = build_losses(pipe, list(job.prompts), target, classes, texts)
    with torch.no_grad():
        start_text, start_fair = losses(losses.neutral)
    module, curve = fit_map(losses, cfg, progress, should_stop)
    train_seconds = round(time.time() - t0, 2)

    encoder = make_mapping_encoder(pipe, module.to(pipe.text_encoder.dtype), detector)
    with torch.no_grad():
        before_images, before = evaluate_prompts(pipe, classifier, eval_prompts, target, cfg, None)
        after_images, after = evaluate_prompts(pipe, classifier, eval_prompts, target, cfg, encoder)
    measured = gated_metrics(job, cfg, classifier, eval_prompts, (before_images, before), (after_images, after))
    manifest = AdaptorManifest(
        id=adaptor_id_for(staging_dir, job),
        kind=MappingAdaptor.kind,
        base_model=job.base_model,
        attributes=list(target),
        target=target,
        metrics={
            **measured,
            "train_seconds": train_seconds,
            "iterations": cfg.iterations,
            "fair_distance": {"start": round(start_fair.item(), 6), "end": curve[-1]["fair_distance"]},
            "text_distance": {"start": round(start_text.item(), 6), "end": curve[-1]["text"]},
            "history": curve[-5:],
        },
        hyperparameters={**asdict(cfg), "method": job.method},
        prompt_set=job.prompt_set,
        prompts=list(job.prompts),
        sampler={"steps": cfg.eval_steps, "guidance_scale": cfg.guidance_scale, "scheduler": type(pipe.scheduler).__name__},
        name=job.name,
    )
    MappingAdaptor.build(manifest, module.float(), detector).save(staging_dir)
    logger.info("fair_mapping adaptor %s: mean per-prompt TV to target %s -> %s (fair distance %.4g -> %.4g)", manifest.id,
                before["mean_prompt_tv"], after["mean_prompt_tv"], start_fair.item(), curve[-1]["fair_distance"])  # fmt: skip
    return manifest
