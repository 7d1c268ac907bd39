"""The three reader interfaces: everything fairdiff knows about an image goes through one of them.

- `FaceDetector`: images -> boxes and scores (the face a person attribute is read from).
- `AttributeReader`: images -> class probabilities per attribute and a person probability; it says
  whether it is differentiable in the pixels (trainers and classifier guidance need that).
- `SubjectReader`: image + prompt -> is the prompt's subject (the occupation) still shown.

Images are N x 3 x H x W tensors in [0, 1] throughout, the layout the generation core returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Prediction:
    """Per-image probability that a person is present, and class probabilities per attribute."""

    person: torch.Tensor
    probs: dict[str, torch.Tensor]


class AttributeReader(ABC):
    """Maps images in [0, 1] (N x 3 x H x W) to attribute class probabilities.

    `logits` returns one tensor per attribute (N x classes) plus 'person' (N, a logit); when
    `differentiable` is True gradients flow from them to the pixels.
    """

    attributes: dict[str, list[str]]
    name: str = "attribute-reader"
    differentiable: bool = True

    @abstractmethod
    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute plus 'person' (N); trainers backpropagate here when differentiable."""

    def predict(self, images: torch.Tensor) -> Prediction:
        with torch.no_grad():
            out = self.logits(images)
        return Prediction(
            person=torch.sigmoid(out["person"]).float(),
            probs={a: torch.softmax(out[a].float(), dim=-1) for a in self.attributes},
        )

    def describe(self) -> dict:
        return {"name": self.name, "differentiable": self.differentiable, "attributes": dict(self.attributes)}


@dataclass
class Detection:
    """Face boxes of one image, (x0, y0, x1, y1) in pixels, with a score in (0, 1] each; largest first."""

    boxes: np.ndarray  # K x 4 float
    scores: np.ndarray  # K

    @property
    def found(self) -> bool:
        return len(self.boxes) > 0

    def largest(self) -> np.ndarray | None:
        if not self.found:
            return None
        area = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        return self.boxes[int(area.argmax())]


class FaceDetector(ABC):
    """Finds faces; never differentiable (a box is a discrete choice), the crop that follows is."""

    name: str = "face-detector"

    @abstractmethod
    def detect(self, images: torch.Tensor) -> list[Detection]:
        """One Detection per image of N x 3 x H x W in [0, 1]."""


class SubjectReader(ABC):
    """Reads which of a prompt set's subjects an image shows, and whether it is the prompt's."""

    name: str = "subject-reader"

    @abstractmethod
    def read(self, images: torch.Tensor) -> list[str | None]:
        """The subject each image shows (None: none readable)."""

    def subject_of(self, prompt: str) -> str | None:
        """The subject a prompt asks for; readers that know their subjects override this."""
        return None

    def kept(self, images: torch.Tensor, prompts: Sequence[str]) -> list[bool]:
        """Whether each image shows its own prompt's subject."""
        return [s is not None and s == self.subject_of(p) for s, p in zip(self.read(images), prompts, strict=True)]

    def __call__(self, images: torch.Tensor) -> list[str | None]:
        return self.read(images)
