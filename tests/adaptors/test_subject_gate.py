"""The subject gate: a finetune whose images stop showing their occupation fails and publishes nothing.

Real images and real (tiny) finetunes on the committed testbed: one step at lr 1 with no preservation
wrecks the text encoder (measured: 0% of the occupations kept; at 2 sampling steps the images show no
person, so nothing is learnt), one at lr 0.01 keeps them all.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptors.generation import GenerationSpec, generate
from adaptors.subject import SubjectLost, require_subject_kept, subject_kept, subject_reader
from adaptors.trainers import get_trainer
from common.schemas import FinetuneJob

DOCTOR = "a photo of the face of a doctor, a person"
NURSE = "a photo of the face of a nurse, a person"
WRECK = {"iterations": 1, "steps": 10, "images_per_prompt": 2, "prompts_per_iteration": 2, "eval_images": 8,
         "eval_steps": 10, "checkpoint_every": 100, "rank": 8, "lr": 1.0, "ema_decay": 0.0,
         "preserve_pixel_weight": 0, "preserve_feature_weight": 0}  # fmt: skip


def _images(pipe, prompt: str, seed: int):
    return generate(pipe, GenerationSpec(prompt, num_images=8, seed=seed, steps=10, guidance_scale=5.0), max_batch=8)


def test_the_oracle_reader_sees_the_same_occupation_on_the_same_images_and_another_on_another(pipe):
    reader = subject_reader("testbed")
    assert reader is not None and subject_reader("runwayml/stable-diffusion-v1-5") is None
    doctors, nurses = _images(pipe, DOCTOR, 1), _images(pipe, NURSE, 1)
    same = subject_kept(reader, doctors, doctors, [DOCTOR])
    assert same["share"] == 1.0 and same["images"] >= 6  # the base images are readable
    swapped = subject_kept(reader, torch_cat(doctors, nurses), torch_cat(doctors, doctors), [DOCTOR, NURSE])
    assert swapped["per_prompt"] == {DOCTOR: 1.0, NURSE: 0.0} and swapped["min_prompt"] == 0.0
    assert 0.4 < swapped["share"] < 0.6
    with pytest.raises(SubjectLost, match="nurse"):
        require_subject_kept(swapped, 0.95)
    require_subject_kept(swapped, 0.0)  # 0 switches the gate off
    require_subject_kept(None, 0.95)  # no reader: not gated


def torch_cat(*parts):
    import torch

    return torch.cat(parts)


def _job(**hp) -> FinetuneJob:
    return FinetuneJob(method="dft", base_model="testbed", fairness_target={"gender": {"female": 0.5, "male": 0.5}},
                       prompts=[DOCTOR, NURSE], hyperparameters={**WRECK, **hp})  # fmt: skip


def test_a_finetune_that_loses_the_occupation_fails_whatever_its_bias(pipe, classifier, tmp_path: Path):
    staging = tmp_path / "staging"
    with pytest.raises(SubjectLost) as lost:
        get_trainer("dft")(_job(), pipe, classifier, staging, tmp_path / "ckpt", lambda p: None, lambda: False)
    assert lost.value.kept["share"] < 0.5 and set(lost.value.bias) == {"before", "after"}
    assert not staging.exists() or not any(staging.iterdir())  # nothing exported

    # the same wreck with the gate off publishes, and says what it did; a gentle step keeps every occupation
    wrecked = get_trainer("dft")(_job(min_subject_kept=0, min_fairness_gain=0), pipe, classifier, tmp_path / "w", tmp_path / "wc",
                                 lambda p: None, lambda: False)  # fmt: skip
    assert wrecked.metrics["semantics"]["subject_kept"]["share"] < 0.5
    gentle = get_trainer("dft")(_job(lr=0.01, min_fairness_gain=0), pipe, classifier, tmp_path / "g", tmp_path / "gc",
                                lambda p: None, lambda: False)  # fmt: skip
    assert gentle.metrics["semantics"]["subject_kept"]["share"] >= 0.95
    assert gentle.prompts == [DOCTOR, NURSE]
    assert gentle.metrics["eval_prompts_held_out"] is False  # no held-out prompts given: the training prompts' figures


def test_the_fairness_gate_needs_the_per_prompt_distance_to_fall_by_the_share_asked() -> None:
    from adaptors.fairness_gain import NoFairnessGain, fit_summary, require_fairness_gain

    target = {"gender": {"female": 0.5, "male": 0.5}}
    # pooled 50/50 hides two prompts that stayed all male and all female: the per-prompt mean is what counts
    per_prompt = {"mechanic": {"gender": {"female": 0.0, "male": 1.0}}, "librarian": {"gender": {"female": 1.0, "male": 0.0}}}
    fit = fit_summary(per_prompt, {"gender": {"female": 0.5, "male": 0.5}}, target)
    assert fit["pooled"]["tv"] == 0.0 and fit["mean_prompt_tv"] == 0.5 and fit["prompts"]["mechanic"]["kl"] > 0.6
    with pytest.raises(NoFairnessGain) as refused:
        require_fairness_gain(0.5, fit["mean_prompt_tv"], 0.25)
    assert refused.value.error()["type"] == "no_fairness_gain"
    require_fairness_gain(0.5, 0.37, 0.25)  # a 26% fall passes
    with pytest.raises(NoFairnessGain):
        require_fairness_gain(0.5, 0.38, 0.25)
    require_fairness_gain(0.5, 0.5, 0.0)  # 0: off
    require_fairness_gain(0.01, 0.02, 0.25)  # already at the target: nothing to gain, nothing refused
