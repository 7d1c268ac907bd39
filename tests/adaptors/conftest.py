"""Fixtures for the adaptor tests: the committed testbed pipeline and classifier."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed import CLASSIFIER_DIR, PIPELINE_DIR


def pipeline_path() -> Path:
    return PIPELINE_DIR


@pytest.fixture
def pipe():
    """A fresh pipeline per test: the tests attach and remove adaptors on it."""
    from adaptors.generation import load_pipeline

    return load_pipeline(str(pipeline_path()), device="cpu")


@pytest.fixture(scope="session")
def classifier(tmp_path_factory: pytest.TempPathFactory):
    from adaptors.classifiers import TestbedAttributeClassifier

    return TestbedAttributeClassifier(CLASSIFIER_DIR)
