"""Image features for DFT's semantics-preservation term: the classifier's trunk, or CLIP / DINOv2.

The preservation term keeps a finetuned image close to the frozen model's image from the same
noise in some feature space. On the testbed the attribute classifier's trunk is that space; on
real Stable Diffusion Shen et al. use CLIP and DINOv2 image embeddings, which see the whole
scene (occupation, background, composition), not just what an attribute head needs. Those
models come from local folders the operator provides (nothing is downloaded): a folder whose
config is a CLIP model or CLIP vision tower gives CLIP image embeddings, a DINOv2 folder gives
its CLS feature.

`with_preservation_features` wraps the attribute classifier so that trainers keep one object:
attributes are read by the classifier, `features(images)` comes from the chosen extractors
(each L2-normalised and scaled by 1/sqrt(k), so the cosine of the concatenation is the mean of
the per-model cosines).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptors.classifiers import AttributeClassifier

# Preprocessing defaults when a folder carries no preprocessor_config.json.
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PretrainedImageFeatures:
    """A frozen CLIP image tower or DINOv2 backbone from a local folder, differentiable in its input.

    Input images are in [0, 1] (N x 3 x H x W); they are resized (bilinear, so gradients flow) to
    the model's input size and normalised with the folder's preprocessing statistics.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        folder = Path(path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"preserve feature model {str(folder)!r}: no config.json there (a local folder is needed)")
        model_type = json.loads(config_file.read_text()).get("model_type", "")
        if model_type in ("clip", "clip_vision_model"):
            from transformers import CLIPVisionModelWithProjection

            self.model = CLIPVisionModelWithProjection.from_pretrained(folder)
            self.kind, mean, std = "clip", _CLIP_MEAN, _CLIP_STD
        elif model_type == "dinov2":
            from transformers import Dinov2Model

            self.model = Dinov2Model.from_pretrained(folder)
            self.kind, mean, std = "dinov2", _IMAGENET_MEAN, _IMAGENET_STD
        else:
            raise ValueError(f"preserve feature model {str(folder)!r}: model_type {model_type!r} is neither CLIP nor DINOv2")
        mean, std, self.size = _preprocessing(folder, mean, std, int(self.model.config.image_size))
        self.model.requires_grad_(False).eval().to(device)
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.name = f"{self.kind}:{folder.name}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=x.to(dtype))
        feats = out.image_embeds if self.kind == "clip" else out.pooler_output
        return feats.float()


def _preprocessing(folder: Path, mean, std, size: int) -> tuple[Sequence[float], Sequence[float], int]:
    """Mean, std and crop size from preprocessor_config.json when the folder has one."""
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return mean, std, size
    cfg = json.loads(file.read_text())
    crop = cfg.get("crop_size", size)
    crop = crop.get("height", size) if isinstance(crop, dict) else crop
    return cfg.get("image_mean", mean), cfg.get("image_std", std), int(crop)


class ClassifierTrunkFeatures:
    """The attribute classifier's own feature trunk (the testbed default)."""

    name = "classifier"

    def __init__(self, classifier: AttributeClassifier) -> None:
        if getattr(classifier, "features", None) is None:
            raise ValueError("this attribute classifier has no feature trunk; set FAIRDIFF_PRESERVE_FEATURES to model folders")
        self.classifier = classifier

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images).flatten(1)  # type: ignore[attr-defined]


class PreservationFeatures(AttributeClassifier):
    """The attribute classifier, with `features` taken from other extractors for the semantics term."""

    def __init__(self, base: AttributeClassifier, extractors: Sequence) -> None:
        if not extractors:
            raise ValueError("at least one feature extractor is needed")
        self.base = base
        self.extractors = list(extractors)
        self.attributes = base.attributes

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.base.logits(images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / math.sqrt(len(self.extractors))
        return torch.cat([F.normalize(fn(images).flatten(1), dim=-1) * scale for fn in self.extractors], dim=1)


def with_preservation_features(
    classifier: AttributeClassifier, setting: str, device: torch.device | str = "cpu"
) -> AttributeClassifier:
    """The classifier trainers get: unchanged for 'classifier', else wrapped with CLIP / DINOv2 features.

    `setting` is FAIRDIFF_PRESERVE_FEATURES: 'classifier', or comma-separated local model folders,
    optionally including 'classifier' itself ("classifier,/models/dinov2-base").
    """
    names = [s.strip() for s in setting.split(",") if s.strip()]
    if not names:
        raise ValueError("FAIRDIFF_PRESERVE_FEATURES is empty: use 'classifier' or model folders")
    if names == ["classifier"]:
        return classifier
    extractors = [ClassifierTrunkFeatures(classifier) if n == "classifier" else PretrainedImageFeatures(n, device) for n in names]
    return PreservationFeatures(classifier, extractors)
