"""InvDiff: the two-pass `unet_delta` kind, stage 1's group inference, the training set's checks, a short real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaptors.caption_data import DatasetError, read_caption_set
from adaptors.loading import load_adaptor
from adaptors.lora import LoraAdaptor
from adaptors.trainers.groups import infer_groups, normalised_mutual_information
from adaptors.unet_delta import MIX_RATIO_KEY, UnetDeltaAdaptor
from common.adaptor_manifest import AdaptorManifest
from tests.adaptors.conftest import pipeline_path
from tests.adaptors.mixin import AdaptorTesterMixin, _lora_tensors, manifest_for, run


def make_delta(adaptor_id: str, seed: int, ratio: float = 0.7) -> UnetDeltaAdaptor:
    tensors = _lora_tensors(str(pipeline_path()), seed, ("unet",))
    manifest = AdaptorManifest(id=adaptor_id, kind="unet_delta", base_model="testbed",
                               hyperparameters={MIX_RATIO_KEY: ratio})  # fmt: skip
    return UnetDeltaAdaptor(manifest, {k: v.clone() for k, v in tensors.items()})


class TestUnetDeltaAdaptor(AdaptorTesterMixin):
    kind = "unet_delta"

    def make(self, pipe, adaptor_id, seed):
        return make_delta(adaptor_id, seed)


def test_mix_ratio_zero_gives_the_base_model_bit_for_bit(pipe):
    base = run(pipe)
    adaptor = make_delta("off", 1, ratio=0.0)
    adaptor.attach(pipe)
    adaptor.activate(pipe)
    assert torch.equal(run(pipe, adaptor), base)


def test_mix_ratio_one_is_the_lora_alone_and_between_is_neither(pipe):
    tensors = _lora_tensors(str(pipeline_path()), 1, ("unet",))
    lora = LoraAdaptor(manifest_for("plain", "lora"), {k: v.clone() for k, v in tensors.items()})
    lora.attach(pipe)
    lora.activate(pipe)
    lora_out = run(pipe, lora)
    lora.deactivate(pipe)
    base = run(pipe)
    full, half = make_delta("g-full", 1, ratio=1.0), make_delta("g-mixed", 1, ratio=0.5)
    for adaptor in (full, half):
        adaptor.attach(pipe)
    full.activate(pipe)
    assert torch.equal(run(pipe, full), lora_out)
    half.activate(pipe)
    mixed = run(pipe, half)
    assert (mixed - base).abs().max() > 1e-3 and (mixed - lora_out).abs().max() > 1e-3


def test_mix_ratio_is_checked():
    with pytest.raises(ValueError, match=MIX_RATIO_KEY):
        make_delta("bad", 1, ratio=1.5)


def test_stage_one_finds_planted_groups():
    """Two planted groups whose losses differ (0.2 of the examples fit worse), measured with noise over 4 draws."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        planted = rng.random(400) < 0.2
        table = np.where(planted, 1.6, 1.0)[:, None] + rng.normal(0, 0.3, (400, 4))
        weights = infer_groups(table, 2, iterations=300, seed=seed)
        assert weights.shape == (400, 2) and np.allclose(weights.sum(1), 1.0)
        hard = weights.argmax(1)
        agreement = max(np.mean(hard == planted), np.mean(hard != planted))
        assert agreement >= 0.9, agreement
        assert normalised_mutual_information(hard, planted) > 0.4


def test_nmi_bounds():
    a = [0, 0, 1, 1, 2, 2]
    assert normalised_mutual_information(a, ["x", "x", "y", "y", "z", "z"]) == pytest.approx(1.0)
    assert normalised_mutual_information([0, 1, 0, 1], ["a", "a", "b", "b"]) == pytest.approx(0.0)


# -- the training set -----------------------------------------------------------------------------


def write_folder(folder: Path, rows: list[dict], images: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_folder_and_csv_layouts_read(tmp_path: Path):
    folder = write_folder(tmp_path / "set", [{"file_name": "0.png", "text": "a doctor", "gender": "male"},
                                             {"file_name": "1.png", "text": "", "gender": "female"}])  # fmt: skip
    data = read_caption_set(folder)
    assert data.captions == ["a doctor", ""] and data.labels == {"gender": ["male", "female"]}
    assert data.images(16).shape == (2, 3, 16, 16)
    (tmp_path / "set" / "train.csv").write_text("image,caption\n0.png,a nurse\n1.png,a pilot\n")
    assert read_caption_set(tmp_path / "set" / "train.csv").captions == ["a nurse", "a pilot"]


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([{"file_name": "0.png"}], None, "line 1 .*no caption"),
        ([{"file_name": "0.png", "text": "a"}, {"file_name": "missing.png", "text": "b"}], None, "missing.png.*does not exist"),
        ([{"file_name": "broken.png", "text": "a"}], ("broken.png", b"not a png"), "broken.png.*cannot be read"),
        ([{"file_name": "notes.txt", "text": "a"}], ("notes.txt", b"hello"), "notes.txt.*not an image"),
        ([{"file_name": "../0.png", "text": "a"}], None, "outside"),
        ([], None, "lists no images"),
    ],
)
def test_bad_sets_are_refused_with_the_row(tmp_path: Path, rows, extra, message):
    folder = write_folder(tmp_path / "set", rows)
    if extra:
        (folder / extra[0]).write_bytes(extra[1])
    with pytest.raises(DatasetError, match=f"hyperparameters.dataset: .*{message}"):
        read_caption_set(folder)


def test_empty_folder_missing_metadata_and_bad_csv(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is empty"):
        read_caption_set(tmp_path / "empty")
    write_folder(tmp_path / "nometa", [])
    (tmp_path / "nometa" / "metadata.jsonl").unlink()
    with pytest.raises(DatasetError, match="no metadata.jsonl"):
        read_caption_set(tmp_path / "nometa")
    (tmp_path / "a.csv").write_text("path,text\nx.png,y\n")
    with pytest.raises(DatasetError, match="columns 'image' and 'caption'"):
        read_caption_set(tmp_path / "a.csv")
    with pytest.raises(DatasetError, match="does not exist"):
        read_caption_set(tmp_path / "nowhere")


# -- a short real run ---------------------------------------------------------------------------


TINY = {"images": 48, "loss_draws": 2, "group_iterations": 50, "iterations": 3, "batch_size": 16, "lr": 0.05,
        "eval_images": 2, "eval_steps": 2, "min_subject_kept": 0, "checkpoint_every": 2}  # fmt: skip


def test_short_run_publishes_an_adaptor_that_round_trips(pipe, classifier, tmp_path: Path):
    from adaptors.generation import GenerationSpec, generate
    from adaptors.trainers import get_trainer
    from common.schemas import FinetuneJob
    from testbed.data import write_caption_folder

    write_caption_folder(tmp_path / "data", 48, seed=5)
    prompt = "a photo of the face of a doctor, a person"
    job = FinetuneJob(method="invdiff", base_model="testbed", fairness_target={}, prompts=[prompt],
                      hyperparameters={**TINY, "dataset": str(tmp_path / "data")})  # fmt: skip
    points: list[dict] = []
    manifest = get_trainer("invdiff")(job, pipe, classifier, tmp_path / "out", tmp_path / "ckpt", points.append,
                                      lambda: False)  # fmt: skip
    assert manifest.kind == "unet_delta" and manifest.target == {}
    assert manifest.metrics["reference"] == "uniform"
    assert set(manifest.metrics["groups"]["agreement_nmi"]) == {"gender", "skin_tone", "age", "occupation"}
    assert [p["iteration"] for p in points if "iteration" in p] == [1, 2, 3]
    assert not any("fairdiff-training" in n for n, _ in pipe.unet.named_parameters()), "the training LoRA was left behind"

    spec = GenerationSpec(prompt=prompt, num_images=2, seed=1, steps=3)
    base = generate(pipe, spec)
    adaptor = load_adaptor(tmp_path / "out")
    assert isinstance(adaptor, UnetDeltaAdaptor) and adaptor.ratio == 0.8
    adaptor.attach(pipe)
    assert torch.equal(generate(pipe, spec), base), "attached but not active: the base model"
    adaptor.activate(pipe)
    after = generate(pipe, spec)
    assert (after - base).abs().max() > 1e-4
    adaptor.deactivate(pipe)
    assert torch.equal(generate(pipe, spec), base)


def test_a_bad_dataset_fails_before_training(pipe, classifier, tmp_path: Path):
    from adaptors.trainers import get_trainer
    from common.schemas import FinetuneJob

    (tmp_path / "empty").mkdir()
    job = FinetuneJob(method="invdiff", base_model="testbed", fairness_target={}, prompts=["a photo of a doctor"],
                      hyperparameters={**TINY, "dataset": str(tmp_path / "empty")})  # fmt: skip
    points: list[dict] = []
    with pytest.raises(DatasetError, match="is empty"):
        get_trainer("invdiff")(job, pipe, classifier, tmp_path / "out", tmp_path / "ckpt", points.append, lambda: False)
    assert points == [] and not (tmp_path / "out").exists()


def test_a_stopped_run_resumes_from_its_checkpoint(pipe, classifier, tmp_path: Path):
    """No dataset named: the testbed's profile writes its own training data into the checkpoint folder, once."""
    from adaptors.generation import GenerationCancelled
    from adaptors.trainers import get_trainer
    from adaptors.trainers.invdiff import GROUPS_FILE
    from common.schemas import FinetuneJob

    job = FinetuneJob(method="invdiff", base_model="testbed", fairness_target={}, prompts=["a photo of a doctor"],
                      hyperparameters={**TINY, "iterations": 4})  # fmt: skip
    first: list[dict] = []
    with pytest.raises(GenerationCancelled):
        get_trainer("invdiff")(job, pipe, classifier, tmp_path / "out", tmp_path / "ckpt", first.append,
                               lambda: sum("iteration" in p for p in first) == 2)  # fmt: skip
    assert (tmp_path / "ckpt" / GROUPS_FILE).is_file() and (tmp_path / "ckpt" / "training_data" / "metadata.jsonl").is_file()
    second: list[dict] = []
    manifest = get_trainer("invdiff")(job, pipe, classifier, tmp_path / "out", tmp_path / "ckpt", second.append,
                                      lambda: False)  # fmt: skip
    assert [p["iteration"] for p in second if "iteration" in p] == [3, 4]
    assert second[0]["sizes"] == first[0]["sizes"]  # the groups were read back, not inferred again
    assert manifest.metrics["examples"] == TINY["images"]
