"""Trainer `gmm`: calibrate GMM latent balancing (Pal et al.) per prompt; no weights change.

Per prompt: generate N images recording each latent after step t*, read every finished image's
classes with the attribute reader, fit a Gaussian mixture per class the reader saw (on the
latents' principal components; K components per class at most, fewer for a class with few
images), and keep each component's mean in the whole latent, which is what the `latent` strategy
moves an image's latent by. Then held-out requests are served side by side by the `latent`
strategy and by `assign`, read by the same reader, so `auto` can compare their within-one rates
for this prompt and sampler. A class of the job's target that no component carries refuses the
calibration (nothing is published), naming the class.

Why a mixture per class rather than one EM over all latents: on a biased prompt the minority
class holds the majority of no component (testbed senator, 4% women, 256 images: K = 4 or 8,
any step from 1 to 8, no component named female), so it could never be served.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from adaptors.assign import class_texts_for, generate_assigned, joint_assignment, joint_shares
from adaptors.audit import ImageAttributes, classify
from adaptors.classifiers import AttributeClassifier
from adaptors.fairness_gain import FinetuneRefused
from adaptors.generation import GenerationCancelled, GenerationSpec, generate
from adaptors.gmm import GmmAdaptor, PromptMixture, generate_balanced
from adaptors.trainers.registry import ProgressFn, StopFn, adaptor_id_for, register_trainer, require_known_attributes
from common.adaptor_manifest import AdaptorManifest
from common.finetune_config import GMMConfig
from common.schemas import FinetuneJob
from common.settings import get_settings

logger = logging.getLogger(__name__)

MIN_CLASS_IMAGES = 3  # a class seen in fewer calibration images gets no component (its mean would be one image)
IMAGES_PER_COMPONENT = 10  # a class gets at most one component per this many of its images
REG_COVAR = 1e-3


class NoComponent(FinetuneRefused):
    """A class the job's target asks for is carried by no component: requests for it could not be served."""

    error_type = "no_component"

    def __init__(self, prompt: str, attribute: str, cls: str, seen: int) -> None:
        self.param = f"fairness_target.{attribute}.{cls}"
        super().__init__(
            f"{self.param}: no mixture component carries it for the prompt {prompt!r} ({seen} of the calibration's "
            f"images read as it, {MIN_CLASS_IMAGES} needed); calibrate with more images or leave the class out; "
            "nothing was published"
        )

    def error(self) -> dict:
        return {**super().error(), "param": self.param}


def record(pipe, spec: GenerationSpec, at_step: int, max_batch: int, on_step) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, N x D latents after step `at_step`) of one plain generation."""
    kept: list[torch.Tensor] = []

    def hook(step: int, latents: torch.Tensor, rows) -> None:
        if step == at_step:
            kept.append(latents.detach().float().cpu().reshape(len(latents), -1))

    images = generate(pipe, spec, max_batch=max_batch, on_step=on_step, on_latents=hook)
    return images, torch.cat(kept)


def joint_labels(per_image: list[ImageAttributes], attributes: list[str]) -> list[tuple[str, ...] | None]:
    """Each image's classes over `attributes` (None: no person found, so it names no component)."""
    return [tuple(str(img.label(a)) for a in attributes) if img.person else None for img in per_image]


def fit_mixture(latents: np.ndarray, labels: list[tuple[str, ...] | None], attributes: list[str], cfg: GMMConfig,
                ) -> PromptMixture:  # fmt: skip
    """Principal components of all latents, then a mixture per class over them; components named by their class."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    dims = max(1, min(cfg.dims, latents.shape[0] - 1, latents.shape[1]))
    pca = PCA(n_components=dims, random_state=cfg.seed).fit(latents)
    z = pca.transform(latents)
    means, precisions, log_weights, latent_means, classes = [], [], [], [], []
    for cls in sorted({lab for lab in labels if lab is not None}):
        rows = np.array([i for i, lab in enumerate(labels) if lab == cls])
        if len(rows) < MIN_CLASS_IMAGES:
            continue
        k = max(1, min(cfg.components, len(rows) // IMAGES_PER_COMPONENT))
        gmm = GaussianMixture(k, covariance_type=cfg.covariance, reg_covar=REG_COVAR, random_state=cfg.seed).fit(z[rows])
        member = gmm.predict(z[rows])
        for c in range(k):
            mine = rows[member == c]
            mean = latents[mine].mean(0) if len(mine) else pca.inverse_transform(gmm.means_[c : c + 1])[0]
            prec = gmm.precisions_cholesky_[c]
            means.append(gmm.means_[c])
            precisions.append(np.diag(prec) if prec.ndim == 1 else prec)
            log_weights.append(np.log(gmm.weights_[c] * len(rows) / len(latents)))
            latent_means.append(mean)
            classes.append(dict(zip(attributes, cls)))
    if not classes:
        raise ValueError("prompts: no calibration image showed a person, so no component could be named")

    def t(x) -> torch.Tensor:
        return torch.tensor(np.asarray(x), dtype=torch.float32)

    return PromptMixture(t(pca.mean_), t(pca.components_), t(means), t(precisions), t(log_weights), t(latent_means), classes)


def check_carried(mixture: PromptMixture, target: dict, prompt: str, labels: list) -> None:
    """Every class (joint class, for several attributes) with a positive share in `target` has a component."""
    attrs = list(target)
    for combo, share in joint_shares(target).items():
        if share > 0 and not mixture.carriers(dict(zip(attrs, combo))):
            # name the first attribute's class that is missing on its own, else the joint class's first attribute
            for a, c in zip(attrs, combo):
                if not mixture.carriers({a: c}):
                    raise NoComponent(prompt, a, c, sum(1 for lab in labels if lab and lab[attrs.index(a)] == c))
            raise NoComponent(prompt, attrs[0], combo[0], sum(1 for lab in labels if lab and tuple(lab) == combo))


def within(per_image: list[ImageAttributes], assignment: list[dict[str, str]], slack: int) -> bool:
    """Every targeted class's read count (images with a person) within `slack` of its assigned count."""
    for attr in assignment[0]:
        for cls in {a[attr] for a in assignment} | {img.label(attr) for img in per_image if img.person}:
            want = sum(1 for a in assignment if a[attr] == cls)
            got = sum(1 for img in per_image if img.person and img.label(attr) == cls)
            if abs(want - got) > slack:
                return False
    return True


def side_by_side(pipe, classifier, prompt: str, target: dict, mixture: PromptMixture, cfg: GMMConfig, texts, seed: int,
                 ) -> dict:  # fmt: skip
    """Held-out requests served by `none`, `latent` and `assign`; within-one, exact and seconds per image each."""
    settings = get_settings()
    ways = ("none", "latent", "assign")
    hits = {w: {"within_one": 0, "exact": 0} for w in ways}
    seconds = dict.fromkeys(ways, 0.0)
    for r in range(cfg.eval_requests):
        spec = GenerationSpec(prompt, num_images=cfg.eval_images, seed=seed + r, steps=cfg.steps,
                              guidance_scale=cfg.guidance_scale)  # fmt: skip
        assignment = joint_assignment(cfg.eval_images, target, spec.seed)
        for way in ways:
            t0 = time.perf_counter()
            if way == "none":
                images = generate(pipe, spec, max_batch=cfg.max_batch)
            elif way == "latent":
                images = generate_balanced(pipe, spec, assignment, mixture, cfg.at_step, max_batch=cfg.max_batch)
            else:
                images = generate_assigned(pipe, spec, assignment, texts, mode=settings.assign_mode,
                                           guidance_weight=settings.assign_guidance_weight, max_batch=cfg.max_batch,
                                           classifier=classifier, classifier_scale=settings.assign_classifier_scale)  # fmt: skip
            seconds[way] += time.perf_counter() - t0
            read = classify(classifier, images)
            hits[way]["within_one"] += within(read, assignment, 1)
            hits[way]["exact"] += within(read, assignment, 0)
    n = cfg.eval_requests
    per_image = {w: seconds[w] / (n * cfg.eval_images) for w in ways}
    return {
        "within_one": {w: round(hits[w]["within_one"] / n, 4) for w in ways if w != "none"},
        "exact": {w: round(hits[w]["exact"] / n, 4) for w in ways if w != "none"},
        "cost_vs_none": {w: round(per_image[w] / max(1e-9, per_image["none"]), 3) for w in ways},
        "requests": n,
        "images_per_request": cfg.eval_images,
        "read_by": classifier.name,
    }


@register_trainer("gmm")
def train_gmm(
    job: FinetuneJob,
    pipe,
    classifier: AttributeClassifier,
    staging_dir: Path,
    checkpoint_dir: Path,
    progress: ProgressFn,
    should_stop: StopFn,
) -> AdaptorManifest:
    """Calibrate every prompt of the job; the manifest keeps each prompt's components and side-by-side figures."""
    cfg = GMMConfig.from_hyperparameters(dict(job.hyperparameters))
    require_known_attributes(job, classifier)
    attrs = list(job.fairness_target)
    target = {a: {c: float(job.fairness_target[a].get(c, 0.0)) for c in classifier.attributes[a]} for a in attrs}
    texts = class_texts_for(job.base_model)
    mixtures, per_prompt = [], {}
    t_all = time.time()
    for p, prompt in enumerate(job.prompts):

        def on_step(done: int, total: int, p: int = p, prompt: str = prompt) -> None:
            if should_stop():
                raise GenerationCancelled(f"calibration stopped at prompt {p + 1}/{len(job.prompts)}")

        t0 = time.time()
        spec = GenerationSpec(prompt, num_images=cfg.images, seed=cfg.seed + 10_000 * p, steps=cfg.steps,
                              guidance_scale=cfg.guidance_scale)  # fmt: skip
        with torch.no_grad():
            images, latents = record(pipe, spec, cfg.at_step, cfg.max_batch, on_step)
        labels = joint_labels(classify(classifier, images), attrs)
        mixture = fit_mixture(latents.numpy(), labels, attrs, cfg)
        calibration_s = time.time() - t0
        check_carried(mixture, target, prompt, labels)
        progress({"step": 2 * p + 1, "total": 2 * len(job.prompts), "prompt": prompt, "components": len(mixture.classes)})
        with torch.no_grad():
            compared = side_by_side(pipe, classifier, prompt, target, mixture, cfg, texts, cfg.eval_seed + 1000 * p)
        progress({"step": 2 * p + 2, "total": 2 * len(job.prompts), "prompt": prompt, "within_one": compared["within_one"]})
        seen = {"/".join(c): sum(1 for lab in labels if lab == c) for c in sorted({lab for lab in labels if lab})}
        per_prompt[prompt] = {
            "components": ["/".join(c[a] for a in attrs) for c in mixture.classes],
            "images_per_class": seen,
            "no_person": sum(1 for lab in labels if lab is None),
            "calibration_seconds": round(calibration_s, 2),
            **compared,
        }
        mixtures.append(mixture)
        logger.info("gmm %s: %d components, within one: %s", prompt, len(mixture.classes), compared["within_one"])
    manifest = AdaptorManifest(
        id=adaptor_id_for(staging_dir, job),
        kind=GmmAdaptor.kind,
        base_model=job.base_model,
        attributes=attrs,
        target={a: dict(job.fairness_target[a]) for a in attrs},
        metrics={"per_prompt": per_prompt, "seconds": round(time.time() - t_all, 2), "eval_seed": cfg.eval_seed},
        hyperparameters={**asdict(cfg), "method": "gmm"},
        prompt_set=job.prompt_set,
        prompts=list(job.prompts),
        sampler={"steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "scheduler": type(pipe.scheduler).__name__},
        name=job.name,
    )
    GmmAdaptor.build(manifest, list(job.prompts), mixtures, cfg.at_step).save(staging_dir)
    return manifest
