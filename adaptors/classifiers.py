"""Attribute classifiers behind one interface: the audit and the trainers never know which one.

The testbed ships a small CNN; a real deployment supplies its own head in the same on-disk
format (config.json + model.safetensors), found through the `classifier` setting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from common.settings import has_attribute_classifier


@dataclass
class Prediction:
    """Per-image probability that a person is present, and class probabilities per attribute."""

    person: torch.Tensor
    probs: dict[str, torch.Tensor]


class AttributeClassifier(ABC):
    """Maps images in [0, 1] (N x 3 x H x W) to attribute class probabilities."""

    attributes: dict[str, list[str]]

    @abstractmethod
    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable logits per attribute plus 'person' (N); trainers backpropagate here."""

    def predict(self, images: torch.Tensor) -> Prediction:
        with torch.no_grad():
            out = self.logits(images)
        return Prediction(
            person=torch.sigmoid(out["person"]).float(),
            probs={a: torch.softmax(out[a].float(), dim=-1) for a in self.attributes},
        )


class TestbedAttributeClassifier(AttributeClassifier):
    """The testbed CNN (also any head saved in its format)."""

    def __init__(self, path: str | Path | None = None, device: torch.device | str = "cpu") -> None:
        from testbed import CLASSIFIER_DIR
        from testbed.classifier import TestbedClassifier

        self.model = TestbedClassifier.from_pretrained(path or CLASSIFIER_DIR).to(device)
        self.model.requires_grad_(False)
        self.attributes = self.model.attributes
        self.device = torch.device(device)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(images.to(self.device, torch.float32) * 2.0 - 1.0)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images.to(self.device, torch.float32) * 2.0 - 1.0)


def load_classifier(setting: str, base_model: str, device: torch.device | str = "cpu") -> AttributeClassifier | None:
    """The classifier for a base model: 'auto' knows the testbed's; 'none' disables the audit."""
    if not has_attribute_classifier(setting, base_model):
        return None
    if setting == "auto":
        return TestbedAttributeClassifier(device=device)
    if not Path(setting).is_dir():
        raise FileNotFoundError(f"classifier folder {setting!r} does not exist")
    return TestbedAttributeClassifier(setting, device=device)
