"""Enforcement: after the audit, regenerate the images that missed their assigned class.

Per-image conditioning lands most images on their class, and the misses are what stands
between "in expectation" and "exactly this many". An image whose audited class differs from
its assigned one (so some class is over-filled and another short), or in which no person was
found, is generated again from fresh noise with the same conditioning, for a bounded number of
rounds; the result says how many rounds ran and whether the counts were met.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from adaptors.assign import ClassTexts, Mode, generate_assigned
from adaptors.audit import ImageAttributes, classify
from adaptors.classifiers import AttributeClassifier
from adaptors.generation import GenerationSpec, StepCallback


@dataclass
class EnforcementReport:
    rounds: int
    regenerated: int
    satisfied: bool
    missed: int

    def to_dict(self) -> dict[str, int | bool]:
        return {"rounds": self.rounds, "regenerated": self.regenerated, "satisfied": self.satisfied, "missed": self.missed}


def misses(per_image: Sequence[ImageAttributes], assignment: Sequence[Mapping[str, str]]) -> list[int]:
    """Indices of images with no person, or whose audited class differs from the assigned one."""
    return [
        i
        for i, (img, classes) in enumerate(zip(per_image, assignment, strict=True))
        if not img.person or any(img.label(attr) != cls for attr, cls in classes.items())
    ]


def enforce(
    pipe,
    classifier: AttributeClassifier,
    spec: GenerationSpec,
    assignment: Sequence[Mapping[str, str]],
    texts: ClassTexts,
    images: torch.Tensor,
    max_rounds: int = 3,
    mode: Mode = "both",
    guidance_weight: float = 30.0,
    max_batch: int = 16,
    on_step: StepCallback | None = None,
    generate_fn: Callable[..., torch.Tensor] = generate_assigned,
    classifier_scale: float = 0.0,
    steer: AttributeClassifier | None = None,
) -> tuple[torch.Tensor, list[ImageAttributes], EnforcementReport]:
    """Images (with misses replaced where a retry hit), their audit, and what enforcement did.

    Retry r of image i draws noise index `spec.num_images * r + i`, so every retry is
    reproducible from the request's seed and never reuses another image's noise. With
    `classifier_scale` > 0 retries are also steered by classifier guidance (see generate_assigned), with
    `steer` when given: the audit reader (`classifier`) checks, the steering reader guides.
    """
    images = images.clone()
    per_image = classify(classifier, images)
    todo = misses(per_image, assignment)
    regenerated = 0
    rounds = 0
    while todo and rounds < max_rounds:
        rounds += 1
        retry_spec = replace(
            spec, num_images=len(todo), prompts=[spec.prompt_list()[i] for i in todo], start_index=spec.num_images * rounds
        )
        fresh = generate_fn(
            pipe, retry_spec, [assignment[i] for i in todo], texts, mode=mode, guidance_weight=guidance_weight,
            on_step=on_step, max_batch=max_batch, classifier=steer if steer is not None else classifier,
            classifier_scale=classifier_scale,
        )  # fmt: skip
        regenerated += len(todo)
        fresh_attrs = classify(classifier, fresh)
        still: list[int] = []
        for j, i in enumerate(todo):
            hit = not misses([fresh_attrs[j]], [assignment[i]])
            if hit or not per_image[i].person:  # a person of the wrong class beats no person at all
                images[i] = fresh[j]
                per_image[i] = fresh_attrs[j]
            if not hit:
                still.append(i)
        todo = still
    return images, per_image, EnforcementReport(rounds, regenerated, not todo, len(todo))
