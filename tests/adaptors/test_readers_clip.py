"""CLIP readers on a tiny randomly initialised CLIPModel built here (as diffusers' tests build tiny models).

These check the code path (loading, shapes, differentiability, save/load, the probe's fit on a labelled
folder); the testbed's trained CLIP is what accuracy is measured with.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from adaptors.readers import AttributeReader
from adaptors.readers.clip import ClipEncoder, ClipProbeReader, ClipSubjectReader, ClipZeroShotReader, fit_probe
from adaptors.readers.faces import FaceCropReader
from adaptors.readers.registry import READER_FILE, audit_record, load_classifier, load_reader, load_reader_folder

SPEC = {
    "attributes": {
        "gender": {"female": ["a photo of the face of a female person"], "male": ["a photo of the face of a male person"]},
        "age": {"young": ["a young person", "a photo of a young person"], "old": ["an old person", "a photo of an old person"]},
    },
    "person": {"yes": ["a photo of the face of a person"], "no": ["a photo"]},
}


def build_tiny_clip(folder, seed: int = 0, image_size: int = 32):
    """A 2-layer CLIP (text and vision) with the testbed tokenizer, saved in transformers' format."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from testbed import PIPELINE_DIR

    tokenizer = AutoTokenizer.from_pretrained(PIPELINE_DIR / "tokenizer")
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def clip(clip_dir):
    return ClipEncoder(clip_dir)


def test_zero_shot_reads_every_attribute_and_is_differentiable(clip):
    reader = ClipZeroShotReader(clip, SPEC)
    assert isinstance(reader, AttributeReader) and reader.differentiable
    assert reader.attributes == {"gender": ["female", "male"], "age": ["young", "old"]}
    images = torch.rand(3, 3, 48, 48, requires_grad=True)  # not the model's size: resized in torch
    out = reader.logits(images)
    assert out["gender"].shape == (3, 2) and out["age"].shape == (3, 2) and out["person"].shape == (3,)
    # logits are the scaled cosine: bounded by the logit scale
    assert out["gender"].abs().max() <= clip.logit_scale + 1e-4
    (out["gender"][:, 0] - out["gender"][:, 1]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    pred = reader.predict(images.detach())
    assert torch.allclose(pred.probs["age"].sum(-1), torch.ones(3))
    assert ((pred.person > 0) & (pred.person < 1)).all()


def test_zero_shot_without_person_prompts_leaves_presence_to_the_detector(clip):
    spec = {"attributes": SPEC["attributes"]}
    assert (ClipZeroShotReader(clip, spec).predict(torch.rand(2, 3, 32, 32)).person > 0.99).all()


@pytest.mark.parametrize(
    "bad",
    [{}, {"attributes": {"gender": {"female": ["a woman"]}}}, {"attributes": {"g": {"a": "x", "b": ["y"]}}},
     {"attributes": SPEC["attributes"], "person": {"yes": ["p"]}}],
)  # fmt: skip
def test_a_bad_spec_is_refused(clip, bad):
    with pytest.raises(ValueError, match="attribute spec"):
        ClipZeroShotReader(clip, bad)


def _labelled_folder(root, n: int = 60):
    """Images whose class is their colour (red or blue), FairFace's CSV layout (file, attribute columns)."""
    rng = np.random.default_rng(0)
    rows = []
    (root / "train").mkdir(parents=True)
    for i in range(n):
        colour = ["red", "blue"][i % 2]
        px = np.zeros((40, 40, 3), np.uint8)
        px[..., 0 if colour == "red" else 2] = 200
        px = np.clip(px + rng.integers(0, 40, px.shape), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(root / "train" / f"{i}.jpg")
        rows.append({"file": f"train/{i}.jpg", "colour": colour, "size": ["small", "big", "big"][i % 3], "service_test": "True"})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "labels.csv"


def test_fit_probe_reports_held_out_accuracy_and_loads_as_a_reader(clip_dir, tmp_path):
    labels = _labelled_folder(tmp_path / "data")
    report = fit_probe(clip_dir, labels, tmp_path / "probe", held_out=0.25, steps=200)
    assert set(report["attributes"]) == {"colour", "size"}  # service_test is FairFace's split flag, not an attribute
    colour = report["attributes"]["colour"]
    assert colour["classes"] == ["blue", "red"] and colour["held_out"] == 15 and colour["train"] == 45
    # colour is what even a random CLIP's embedding separates; a linear probe finds it
    assert colour["accuracy"] >= 0.9
    assert json.loads((tmp_path / "probe" / "fit_report.json").read_text())["images"] == 60

    reader = load_reader(str(tmp_path / "probe"))
    assert isinstance(reader, ClipProbeReader) and reader.attributes["size"] == ["big", "small"]
    # FAIRDIFF_CLASSIFIER may name the probe folder: the steering reader of a real SD (docs/real-sd.md)
    assert isinstance(load_classifier(str(tmp_path / "probe"), "/models/sd15"), ClipProbeReader)
    red = torch.zeros(1, 3, 40, 40)
    red[:, 0] = 0.85
    assert reader.attributes["colour"][int(reader.predict(red).probs["colour"].argmax())] == "red"
    x = red.clone().requires_grad_(True)
    reader.logits(x)["colour"][0, 1].backward()
    assert x.grad.abs().sum() > 0


def test_fit_probe_names_a_missing_column(clip_dir, tmp_path):
    labels = _labelled_folder(tmp_path / "data", n=8)
    with pytest.raises(ValueError, match="no column 'race'"):
        fit_probe(clip_dir, labels, tmp_path / "probe", attributes=["race"])


def test_a_reader_folder_names_its_clip_and_face_detector(clip_dir, tmp_path):
    folder = tmp_path / "zero-shot"
    folder.mkdir()
    (folder / READER_FILE).write_text(json.dumps({"kind": "clip-zero-shot", "clip": str(clip_dir), **SPEC}))
    reader = load_reader_folder(folder)
    assert isinstance(reader, ClipZeroShotReader) and reader.name == "clip-zero-shot:zero-shot"
    (folder / READER_FILE).write_text(
        json.dumps({"kind": "clip-zero-shot", "clip": str(clip_dir), "face_detector": "haar", **SPEC})
    )
    faced = load_reader_folder(folder)
    assert isinstance(faced, FaceCropReader) and faced.name == "clip-zero-shot:zero-shot+haar"
    assert faced.predict(torch.full((1, 3, 64, 64), 0.5)).person[0] < 1e-6  # no face, no person
    with pytest.raises(FileNotFoundError, match="reader.json"):
        load_reader(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither 'none'"):
        load_reader(str(tmp_path / "absent"))
    assert load_reader("none") is None


def test_subject_reader_retrieves_among_the_prompt_set(clip):
    prompts = [f"a photo of the face of a {o}, a person" for o in ("doctor", "nurse", "pilot")]
    reader = ClipSubjectReader(clip, prompts)
    images = torch.rand(4, 3, 32, 32)
    read = reader.read(images)
    assert all(r in prompts for r in read)
    sims = reader.similarities(images)
    assert read == [prompts[int(i)] for i in sims.argmax(-1)]
    assert reader.kept(images, [read[0], read[1], "a photo of a cat", read[3]]) == [True, True, False, True]
    # a margin larger than any cosine gap leaves every image unread
    assert ClipSubjectReader(clip, prompts, min_margin=3.0).read(images) == [None] * 4
    with pytest.raises(ValueError, match="two prompts"):
        ClipSubjectReader(clip, prompts[:1])


def test_the_audit_record_says_whether_the_auditor_steered(clip):
    from adaptors.classifiers import TestbedAttributeClassifier

    cnn, zero = TestbedAttributeClassifier(), ClipZeroShotReader(clip, SPEC, name="clip")
    assert audit_record(zero, cnn, steered=True) == {"name": "clip", "steered": False}
    assert audit_record(cnn, cnn, steered=True) == {"name": "testbed-cnn", "steered": True}
    assert audit_record(cnn, cnn, steered=False) == {"name": "testbed-cnn", "steered": False}


def test_the_cli_fits_a_probe_and_refuses_a_missing_column(clip_dir, tmp_path, capsys):
    from workers.cli import main

    labels = _labelled_folder(tmp_path / "data", n=20)
    assert (
        main(["readers", "fit-probe", str(labels), "--clip", str(clip_dir), "--out", str(tmp_path / "p"), "--steps", "50"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["attributes"]["colour"]["held_out"] == 4
    assert (tmp_path / "p" / "probe.safetensors").is_file()
    code = main(
        ["readers", "fit-probe", str(labels), "--clip", str(clip_dir), "--out", str(tmp_path / "q"), "--attributes", "race"]
    )
    assert code == 2 and "no column 'race'" in capsys.readouterr().err


def test_the_subject_gate_reads_with_clip_prompt_retrieval_when_configured(clip_dir):
    from adaptors.subject import subject_kept, subject_reader

    prompts = [f"a photo of the face of a {o}, a person" for o in ("doctor", "nurse")]
    name, read = subject_reader("/models/sd15", prompts, setting=str(clip_dir))
    assert name.startswith("clip prompt retrieval")
    images = torch.rand(4, 3, 32, 32)
    kept = subject_kept((name, read), images, images, prompts)  # the same images: every subject kept
    assert kept["share"] == 1.0 and kept["reader"] == name
    assert subject_reader("/models/sd15", prompts, setting="none") is None
    assert subject_reader("/models/sd15", prompts[:1], setting=str(clip_dir)) is None  # nothing to choose among
    assert subject_reader("/models/sd15", prompts, setting="auto") is None  # no oracle outside the testbed


def test_image_similarity_keeps_the_same_image_and_can_refuse_another(clip):
    from adaptors.readers.clip import image_similarity_kept

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert image_similarity_kept(clip, images, images, minimum=0.999) == [True] * 3
    assert image_similarity_kept(clip, images, 1 - images, minimum=1.01) == [False] * 3  # no cosine exceeds 1
