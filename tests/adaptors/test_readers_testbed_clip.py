"""The testbed's tiny CLIP: a plain transformers CLIPModel folder, read as a zero-shot reader, accurate
against the oracle, and usable by every trainer and strategy that takes a differentiable reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptors.readers import registry
from adaptors.readers.registry import load_reader

pytestmark = pytest.mark.skipif(not (registry.testbed_clip_dir() / "config.json").is_file(), reason="testbed CLIP not trained")

DOCTOR = "a photo of the face of a doctor, a person"
NURSE = "a photo of the face of a nurse, a person"


@pytest.fixture(scope="module")
def clip_reader():
    return load_reader("testbed-clip")


def test_the_folder_is_a_plain_clip_model_of_at_most_10_mb():
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(registry.testbed_clip_dir())
    assert model.config.vision_config.image_size == 32
    assert sum(p.stat().st_size for p in registry.testbed_clip_dir().iterdir()) <= 10 * 1024 * 1024


def test_it_reads_renders_as_the_oracle_does(clip_reader):
    from testbed.data import render_balanced, render_empties
    from testbed.oracle import read_batch

    x, _ = render_balanced(300, 777)
    readings = read_batch(x)
    pred = clip_reader.predict((torch.from_numpy(x) + 1) / 2)
    for attr, classes in clip_reader.attributes.items():
        agree = [classes[int(pred.probs[attr][i].argmax())] == getattr(r, attr) for i, r in enumerate(readings) if r.person]
        assert sum(agree) / len(agree) >= 0.98, attr
    assert (pred.person > 0.5).float().mean() >= 0.98
    empties = (torch.from_numpy(render_empties(100, 5)) + 1) / 2
    assert (clip_reader.predict(empties).person < 0.5).float().mean() >= 0.95


def test_prompt_retrieval_reads_the_occupation(clip_reader):
    from adaptors.readers.clip import ClipSubjectReader
    from testbed.data import render_balanced
    from testbed.world import OCCUPATIONS, prompt_for

    x, labels = render_balanced(160, 99)
    prompts = [prompt_for(o.name) for o in OCCUPATIONS]
    read = ClipSubjectReader(clip_reader.clip, prompts).read((torch.from_numpy(x) + 1) / 2)
    assert sum(r == prompts[int(o)] for r, o in zip(read, labels[:, 0])) / len(read) >= 0.9


def test_assign_steers_with_the_clip_reader(pipe, clip_reader):
    from adaptors.assign import class_texts_for_testbed, generate_assigned
    from adaptors.generation import GenerationSpec

    spec = GenerationSpec(NURSE, num_images=4, seed=2, steps=6)
    assignment = [{"skin_tone": c} for c in ("I", "II", "III", "IV")]
    kw = {"mode": "both", "guidance_weight": 30.0}
    plain = generate_assigned(
        pipe, spec, assignment, class_texts_for_testbed(), classifier=clip_reader, classifier_scale=0.0, **kw
    )
    steered = generate_assigned(
        pipe, spec, assignment, class_texts_for_testbed(), classifier=clip_reader, classifier_scale=0.3, **kw
    )
    assert steered.shape == plain.shape and (steered - plain).abs().max() > 1e-3


def test_a_short_dft_run_and_an_ida_calibration_train_against_the_clip_reader(pipe, clip_reader, tmp_path: Path):
    from adaptors.trainers import get_trainer
    from common.schemas import FinetuneJob

    tiny = {"iterations": 1, "steps": 2, "images_per_prompt": 2, "prompts_per_iteration": 1, "eval_images": 2, "eval_steps": 2,
            "checkpoint_every": 1, "rank": 2, "min_subject_kept": 0, "min_fairness_gain": 0}  # fmt: skip
    job = FinetuneJob(method="dft", base_model="testbed", fairness_target={"gender": {"female": 0.5, "male": 0.5}},
                      prompts=[DOCTOR, NURSE], hyperparameters=tiny, name="clip-read dft")  # fmt: skip
    seen: list[dict] = []
    manifest = get_trainer("dft")(job, pipe, clip_reader, tmp_path / "dft", tmp_path / "dft.ckpt", seen.append, lambda: False)
    assert manifest.kind and seen and seen[-1]["iteration"] == 1
    ida = FinetuneJob(method="ida", base_model="testbed", fairness_target={"gender": {"female": 0.5, "male": 0.5}},
                      prompts=[NURSE], hyperparameters={"images_per_iteration": 8, "max_iterations": 1, "steps": 4,
                                                        "eval_images": 8, "kl_threshold": 0.0,
                                                        "min_fairness_gain": 0})  # fmt: skip
    manifest = get_trainer("ida")(ida, pipe, clip_reader, tmp_path / "ida", tmp_path / "ida.ckpt", seen.append, lambda: False)
    assert manifest.kind
