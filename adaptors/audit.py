"""The audit: classify every output image and report what distribution was actually delivered."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from adaptors.classifiers import AttributeClassifier
from common import bias as metrics


@dataclass
class ImageAttributes:
    person: bool
    person_confidence: float
    attributes: dict[str, dict[str, float | str]] = field(default_factory=dict)

    def label(self, attribute: str) -> str | None:
        return str(self.attributes[attribute]["class"]) if self.person and attribute in self.attributes else None


@dataclass
class AuditReport:
    """Per-image predictions and the realised distribution among images with a person."""

    images: list[ImageAttributes]
    realised: dict[str, dict[str, float]]
    counts: dict[str, dict[str, int]]
    bias: dict[str, float]
    no_person: int
    target_distance: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def classify(classifier: AttributeClassifier, images: torch.Tensor, person_threshold: float = 0.5) -> list[ImageAttributes]:
    pred = classifier.predict(images)
    out: list[ImageAttributes] = []
    for i in range(len(images)):
        p = float(pred.person[i])
        attrs: dict[str, dict[str, float | str]] = {}
        for attr, classes in classifier.attributes.items():
            probs = pred.probs[attr][i]
            k = int(probs.argmax())
            attrs[attr] = {"class": classes[k], "confidence": round(float(probs[k]), 4)}
        out.append(ImageAttributes(person=p >= person_threshold, person_confidence=round(p, 4), attributes=attrs))
    return out


def summarise(
    per_image: list[ImageAttributes],
    classes: Mapping[str, list[str]],
    target: Mapping[str, Mapping[str, float]] | None = None,
) -> AuditReport:
    """Realised shares, bias and, given a target, total variation and KL per attribute."""
    realised, counts, biases, distance = {}, {}, {}, {}
    for attr, names in classes.items():
        labels = [img.label(attr) for img in per_image]
        realised[attr] = {k: round(v, 6) for k, v in metrics.frequencies(labels, names).items()}
        counts[attr] = {c: sum(1 for lab in labels if lab == c) for c in names}
        biases[attr] = round(metrics.bias(realised[attr]), 6)
        if target and attr in target:
            distance[attr] = {
                "total_variation": round(metrics.total_variation(realised[attr], target[attr]), 6),
                "kl": round(metrics.kl_divergence(realised[attr], target[attr]), 6),
            }
    return AuditReport(
        images=per_image,
        realised=realised,
        counts=counts,
        bias=biases,
        no_person=sum(1 for img in per_image if not img.person),
        target_distance=distance,
    )


def audit(
    classifier: AttributeClassifier,
    images: torch.Tensor,
    target: Mapping[str, Mapping[str, float]] | None = None,
) -> AuditReport:
    return summarise(classify(classifier, images), classifier.attributes, target)
