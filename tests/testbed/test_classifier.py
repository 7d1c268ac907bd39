"""The committed attribute classifier: accurate on renderer images, detects empty scenes, round-trips."""

import numpy as np
import torch

from testbed.classifier import TestbedClassifier
from testbed.data import render_empties
from testbed.world import ATTRIBUTES
from tests.support.models import load_testbed_classifier, seeded_images


def test_classifier_is_at_least_98_percent_accurate_on_renderer_images():
    clf = load_testbed_classifier()
    images, labels = seeded_images(800, seed=321)
    pred = clf.predict(images)
    assert pred.person.ge(0.5).float().mean() >= 0.98
    for j, attr in enumerate(ATTRIBUTES, start=1):
        acc = (pred.probs[attr].argmax(-1).numpy() == labels[:, j]).mean()
        assert acc >= 0.98, (attr, acc)


def test_classifier_finds_no_person_in_empty_scenes():
    empty = (torch.from_numpy(render_empties(200, seed=77)) + 1) / 2
    assert load_testbed_classifier().predict(empty).person.lt(0.5).float().mean() >= 0.98


def test_classifier_is_differentiable_for_trainers():
    clf = load_testbed_classifier()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    clf.logits(x)["gender"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_save_and_load_round_trip(tmp_path):
    model = TestbedClassifier(width=8)
    model.save_pretrained(tmp_path)
    again = TestbedClassifier.from_pretrained(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    for k, v in model.eval()(x).items():
        assert torch.equal(v, again(x)[k])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert np.isclose(sum(p.numel() for p in again.parameters()), sum(p.numel() for p in model.parameters()))
