"""Which reader audits and which steers, per base-model profile (torch-free)."""

import pytest

from common.readers import ReaderChoice, reader_choice


@pytest.mark.parametrize("model", ["testbed"])
def test_the_testbed_audits_with_its_clip_and_steers_with_its_cnn(model):
    choice = reader_choice("auto", "auto", model)
    assert choice == ReaderChoice(audit="testbed-clip", steer="testbed-cnn") and not choice.audit_is_steer
    # a CNN head given as a folder still steers; the CLIP still audits
    assert reader_choice("/heads/cnn", "auto", model) == ReaderChoice(audit="testbed-clip", steer="/heads/cnn")


def test_a_real_model_with_one_reader_audits_with_it_and_says_so():
    choice = reader_choice("/readers/fairface-probe", "auto", "/models/sd15")
    assert choice.audit == "classifier" and choice.audit_is_steer


def test_a_real_model_with_two_readers_keeps_them_apart():
    choice = reader_choice("/readers/fairface-cnn", "/readers/clip-zero-shot", "/models/sd15")
    assert choice == ReaderChoice(audit="/readers/clip-zero-shot", steer="/readers/fairface-cnn") and not choice.audit_is_steer


def test_no_reader_means_no_audit_unless_one_is_named():
    assert reader_choice("auto", "auto", "/models/sd15") == ReaderChoice(audit="none", steer="none")
    assert reader_choice("none", "auto", "testbed") == ReaderChoice(audit="none", steer="none")
    # an audit reader alone: outputs are audited, nothing steers
    assert reader_choice("none", "/readers/clip", "/models/sd15") == ReaderChoice(audit="/readers/clip", steer="none")
    assert reader_choice("auto", "none", "testbed") == ReaderChoice(audit="none", steer="testbed-cnn")
    assert reader_choice("auto", "classifier", "testbed").audit_is_steer
