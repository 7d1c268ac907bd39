"""Bias metrics against hand-computed cases."""

import math

import pytest

from common import bias as m


def test_frequencies_leave_out_images_without_a_person():
    labels = ["female", "male", None, "male", "male"]
    assert m.frequencies(labels, ["female", "male"]) == {"female": 0.25, "male": 0.75}


def test_frequencies_of_nothing_are_zero_not_nan():
    assert m.frequencies([None, None], ["female", "male"]) == {"female": 0.0, "male": 0.0}


def test_unknown_label_is_an_error():
    with pytest.raises(ValueError, match="other"):
        m.frequencies(["other"], ["female", "male"])


def test_bias_two_classes_is_the_gap():
    assert m.bias({"female": 0.2, "male": 0.8}) == pytest.approx(0.6)
    assert m.bias({"female": 0.5, "male": 0.5}) == 0.0


def test_bias_four_classes_is_mean_pairwise_gap():
    # pairs: |.4-.3|=.1 |.4-.2|=.2 |.4-.1|=.3 |.3-.2|=.1 |.3-.1|=.2 |.2-.1|=.1 -> 1.0 / 6
    assert m.bias({"I": 0.4, "II": 0.3, "III": 0.2, "IV": 0.1}) == pytest.approx(1.0 / 6)
    assert m.bias({"I": 1.0, "II": 0.0, "III": 0.0, "IV": 0.0}) == pytest.approx(0.5)


def test_total_variation_and_kl():
    p, q = {"a": 0.25, "b": 0.75}, {"a": 0.5, "b": 0.5}
    assert m.total_variation(p, q) == pytest.approx(0.25)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert m.kl_divergence(p, q) == pytest.approx(expected, abs=1e-5)
    assert m.kl_divergence(q, q) == pytest.approx(0.0, abs=1e-9)
    assert math.isfinite(m.kl_divergence({"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}))


def test_intersectional_bias_over_joint_classes():
    per_attr = {"gender": ["female", "female", "male", "male"], "age": ["young", "old", "young", "young"]}
    classes = {"gender": ["female", "male"], "age": ["young", "old"]}
    # joint shares: female|young .25 female|old .25 male|young .5 male|old 0
    # pairs: 0, .25, .25, .25, .25, .5 -> 1.5/6
    assert m.intersectional_bias(per_attr, classes) == pytest.approx(0.25)
    assert m.joint_labels({"g": ["f", None], "a": ["y", "o"]}) == ["f|y", None]


def test_no_person_share():
    assert m.no_person_share([True, False, True, True]) == 0.25
    assert m.no_person_share([]) == 0.0
