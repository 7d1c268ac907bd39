"""Enforcement on the real testbed: misses are regenerated until the assigned counts are exact."""

from __future__ import annotations

import pytest

from adaptors.assign import class_texts_for_testbed, generate_assigned, joint_assignment
from adaptors.audit import ImageAttributes, classify
from adaptors.enforce import enforce, misses
from adaptors.generation import GenerationSpec
from tests.support.models import load_testbed_classifier, load_testbed_pipeline

SENATOR = "a photo of the face of a senator, a person"
HALF = {"gender": {"female": 0.5, "male": 0.5}}


def _image(person: bool, gender: str) -> ImageAttributes:
    return ImageAttributes(person=person, person_confidence=1.0 if person else 0.0,
                           attributes={"gender": {"class": gender, "confidence": 0.9}})  # fmt: skip


def test_misses_are_wrong_class_or_no_person():
    per_image = [_image(True, "female"), _image(True, "male"), _image(False, "female")]
    assigned = [{"gender": "female"}, {"gender": "female"}, {"gender": "female"}]
    assert misses(per_image, assigned) == [1, 2]


@pytest.mark.slow
def test_enforce_makes_a_held_out_senator_request_exact():
    pipe, classifier, texts = load_testbed_pipeline(), load_testbed_classifier(), class_texts_for_testbed()
    spec = GenerationSpec(SENATOR, num_images=8, seed=5, steps=20, guidance_scale=5.0)
    assignment = joint_assignment(8, HALF, seed=5)
    first = generate_assigned(pipe, spec, assignment, texts, mode="both", guidance_weight=30.0)
    before = misses(classify(classifier, first), assignment)
    images, per_image, report = enforce(pipe, classifier, spec, assignment, texts, first, max_rounds=5,
                                        mode="both", guidance_weight=30.0)  # fmt: skip
    assert report.satisfied and report.missed == 0
    assert report.regenerated >= len(before)
    assert [img.label("gender") for img in per_image].count("female") == 4
    assert misses(classify(classifier, images), assignment) == []  # what is returned is what was audited
