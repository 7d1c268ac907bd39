"""2-step smoke tests of the `prefix` trainer: it runs, reports, stops, resumes, and writes an adaptor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptors.base import load_adaptor
from adaptors.generation import GenerationCancelled
from adaptors.prefix import PrefixAdaptor
from adaptors.store import AdaptorStore
from adaptors.trainers import TRAINERS, get_trainer
from adaptors.trainers.prefix import PrefixConfig, assign_targets, largest_remainder, main
from common.schemas import FinetuneJob
from tests.adaptors.conftest import pipeline_path

TINY = {
    "iterations": 2,
    "steps": 2,
    "batch_size": 2,
    "prompts_per_iteration": 1,
    "eval_images": 2,
    "checkpoint_every": 1,
    "num_tokens": 3,
}
TARGET = {"gender": {"female": 0.5, "male": 0.5}}


def _job(**hp) -> FinetuneJob:
    return FinetuneJob(
        method="prefix",
        base_model="testbed",
        fairness_target=TARGET,
        prompts=["a photo of a doctor", "a photo of a nurse"],
        hyperparameters={**TINY, **hp},
        name="Fair doctors",
    )


def test_registered():
    assert get_trainer("prefix") is TRAINERS["prefix"]
    with pytest.raises(KeyError, match="nope"):
        get_trainer("nope")


def test_hyperparameters_are_checked():
    assert PrefixConfig.from_hyperparameters({"iterations": 3}).iterations == 3
    for bad in ({"learning_rate": 1}, {"iterations": "3"}, {"iterations": 0}, {"batch_size": 2.5}):
        with pytest.raises(ValueError):
            PrefixConfig.from_hyperparameters(bad)


def test_assignment_realises_the_target_counts():
    assert largest_remainder(torch.tensor([0.5, 0.5]).numpy(), 5).tolist() in ([3, 2], [2, 3])
    assert largest_remainder(torch.tensor([0.25, 0.25, 0.5, 0.0]).numpy(), 8).tolist() == [2, 2, 4, 0]
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    labels = assign_targets(probs, torch.tensor([0.5, 0.5]).numpy())
    assert labels.tolist() == [0, 0, 1, 1]  # the two least confident images are relabelled


def test_stop_then_resume_equals_an_uninterrupted_run(pipe, classifier, tmp_path: Path):
    store = AdaptorStore(tmp_path / "store")
    staging = store.staging_dir("fair-doc")
    seen: list[dict] = []
    with pytest.raises(GenerationCancelled):
        TRAINERS["prefix"](_job(), pipe, classifier, staging, tmp_path / "ckpt", seen.append, lambda: len(seen) >= 1)
    assert [p["iteration"] for p in seen] == [1]
    assert set(seen[0]) == {"iteration", "step", "total", "loss", "batch_bias"} and seen[0]["total"] == 2
    assert json.loads((tmp_path / "ckpt" / "prefix_checkpoint.json").read_text())["iteration"] == 1
    assert not (staging / "manifest.json").exists() and store.list() == []

    resumed: list[dict] = []
    manifest = TRAINERS["prefix"](_job(), pipe, classifier, staging, tmp_path / "ckpt", resumed.append, lambda: False)
    assert [p["iteration"] for p in resumed] == [2]
    assert manifest.id == "fair-doc" and manifest.kind == "prefix_tokens" and manifest.target == TARGET
    assert manifest.sampler["steps"] == 2 and manifest.hyperparameters["num_tokens"] == 3
    assert set(manifest.metrics) >= {"before", "after"}
    assert set(manifest.metrics["after"]["realised"]) == {"gender"}
    published = store.publish(staging)
    adaptor = store.load(published.id)
    assert isinstance(adaptor, PrefixAdaptor) and adaptor.num_tokens == 3

    whole: list[dict] = []
    straight = tmp_path / "straight"
    TRAINERS["prefix"](_job(), pipe, classifier, straight, tmp_path / "ckpt2", whole.append, lambda: False)
    assert [p["iteration"] for p in whole] == [1, 2]
    assert whole[1]["loss"] == pytest.approx(resumed[0]["loss"], abs=1e-5)
    assert torch.allclose(load_adaptor(straight).tensors["prefix"], adaptor.tensors["prefix"], atol=1e-6)


def test_trains_the_prefix(pipe, classifier, tmp_path: Path):
    """With a learning rate the vectors move from their initial value (gradients reach them)."""
    from adaptors.prefix import init_prefix

    manifest = TRAINERS["prefix"](
        _job(iterations=1, lr=0.5), pipe, classifier, tmp_path / "out", tmp_path / "ckpt", lambda p: None, lambda: False
    )
    trained = load_adaptor(tmp_path / "out").tensors["prefix"]
    assert manifest.id == "out"  # a plain valid folder name is taken as the id
    assert not torch.allclose(trained, init_prefix(pipe, 3, seed=0, scale=0.1))


def test_script(classifier, tmp_path: Path):
    folder = tmp_path / ".staging-cli-run"
    manifest = main([
        "--model", str(pipeline_path()),
        "--classifier", _saved(classifier, tmp_path),
        "--target", json.dumps(TARGET),
        "--prompts", "a photo of a doctor",
        "--output", str(folder),
        "--hparams", json.dumps({**TINY, "iterations": 1}),
        "--device", "cpu",
    ])  # fmt: skip
    assert manifest.id == "cli-run"
    assert load_adaptor(folder).id == "cli-run"
    assert (tmp_path / ".staging-cli-run.ckpt" / "prefix_checkpoint.json").is_file()


def _saved(classifier, tmp_path: Path) -> str:
    folder = tmp_path / "classifier"
    classifier.model.save_pretrained(folder)
    return str(folder)
