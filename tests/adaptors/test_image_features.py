"""Preservation features from local CLIP / DINOv2 folders (tiny random models built here, as an operator's would load)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

from adaptors.image_features import PreservationFeatures, PretrainedImageFeatures, with_preservation_features
from adaptors.trainers import get_trainer
from common.schemas import FinetuneJob
from tests.support.models import load_testbed_classifier, load_testbed_pipeline, seeded_images

TINY = {"iterations": 1, "steps": 2, "images_per_prompt": 2, "prompts_per_iteration": 1, "eval_images": 2, "eval_steps": 2,
        "rank": 2, "flip_weight": 1.0, "min_subject_kept": 0, "min_fairness_gain": 0}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("feature-models")
    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                          num_attention_heads=2, image_size=48, patch_size=16,
                                                          projection_dim=16))  # fmt: skip
    clip.save_pretrained(root / "clip")
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                                    mlp_ratio=2))  # fmt: skip
    dino.save_pretrained(root / "dinov2")
    (root / "other").mkdir()
    (root / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return {"clip": root / "clip", "dinov2": root / "dinov2", "other": root / "other", "empty": root / "nothing-here"}


@pytest.mark.parametrize(("name", "dim"), [("clip", 16), ("dinov2", 32)])
def test_local_models_give_frozen_differentiable_features(folders, name, dim):
    extractor = PretrainedImageFeatures(folders[name])
    images = seeded_images(3, seed=1)[0].requires_grad_(True)  # 32 x 32 testbed-sized images, resized inside
    feats = extractor(images)
    assert feats.shape == (3, dim) and torch.isfinite(feats).all()
    feats.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in extractor.model.parameters())
    assert torch.allclose(extractor(images.detach()), feats.detach(), atol=1e-5)


def test_bad_folders_are_named(folders):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        PretrainedImageFeatures(folders["empty"])
    with pytest.raises(ValueError, match="neither CLIP nor DINOv2"):
        PretrainedImageFeatures(folders["other"])
    with pytest.raises(ValueError, match="empty"):
        with_preservation_features(load_testbed_classifier(), " , ")


def test_wrapped_classifier_reads_attributes_as_before_and_averages_the_cosines(folders):
    classifier = load_testbed_classifier()
    assert with_preservation_features(classifier, "classifier") is classifier
    wrapped = with_preservation_features(classifier, f"classifier,{folders['clip']},{folders['dinov2']}")
    assert isinstance(wrapped, PreservationFeatures) and wrapped.attributes == classifier.attributes
    a, b = seeded_images(4, seed=2)[0], seeded_images(4, seed=3)[0]
    assert torch.equal(wrapped.logits(a)["gender"], classifier.logits(a)["gender"])
    fa, fb = wrapped.features(a), wrapped.features(b)
    assert torch.allclose(fa.norm(dim=1), torch.ones(4), atol=1e-5)
    per_model = [torch.nn.functional.cosine_similarity(fn(a).flatten(1), fn(b).flatten(1)) for fn in wrapped.extractors]
    assert torch.allclose(torch.nn.functional.cosine_similarity(fa, fb), torch.stack(per_model).mean(0), atol=1e-5)


def test_dft_preserves_in_clip_and_dinov2_space(folders, tmp_path):
    """A DFT run whose semantics term (and reported similarity) is measured by the local CLIP + DINOv2 models."""
    classifier = with_preservation_features(load_testbed_classifier(), f"{folders['clip']},{folders['dinov2']}")
    job = FinetuneJob(method="dft", base_model="testbed", fairness_target={"gender": {"female": 0.5, "male": 0.5}},
                      prompts=["a photo of the face of a doctor, a person"], hyperparameters=TINY, name="clip-dino")  # fmt: skip
    seen: list[dict] = []
    manifest = get_trainer("dft")(job, load_testbed_pipeline(), classifier, tmp_path / "out", tmp_path / "ckpt",
                                  seen.append, lambda: False)  # fmt: skip
    assert seen and all(p["preserve"] is not None and p["preserve"] >= 0 for p in seen)
    cosine = manifest.metrics["semantics"]["feature_cosine"]
    assert 0.0 < cosine <= 1.0 + 1e-6
