"""Attribute classifiers behind one interface (adaptors.readers.AttributeReader): the audit and the trainers
never know which one.

The testbed ships a small CNN; a real deployment supplies its own head in the same on-disk
format (config.json + model.safetensors), found through the `classifier` setting.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adaptors.readers.base import AttributeReader, Prediction

# the attribute-reader interface under the name the trainers and strategies import
AttributeClassifier = AttributeReader

__all__ = ["AttributeClassifier", "Prediction", "TestbedAttributeClassifier"]


class TestbedAttributeClassifier(AttributeClassifier):
    """The testbed CNN (also any head saved in its format)."""

    name = "testbed-cnn"
    differentiable = True

    def __init__(self, path: str | Path | None = None, device: torch.device | str = "cpu") -> None:
        from testbed import CLASSIFIER_DIR  # the CNN head format's architecture and the embedded head live there
        from testbed.classifier import TestbedClassifier

        self.model = TestbedClassifier.from_pretrained(path or CLASSIFIER_DIR).to(device)
        if path is not None and Path(path).resolve() != CLASSIFIER_DIR.resolve():
            self.name = f"cnn:{Path(path).name}"
        self.model.requires_grad_(False)
        self.attributes = self.model.attributes
        self.device = torch.device(device)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(images.to(self.device, torch.float32) * 2.0 - 1.0)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images.to(self.device, torch.float32) * 2.0 - 1.0)
