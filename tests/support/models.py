"""The committed testbed model and classifier, loaded once per test process."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def load_testbed_pipeline():
    from adaptors.generation import configure_threads, load_pipeline

    configure_threads(1)
    return load_pipeline("testbed", device="cpu")


@lru_cache(maxsize=1)
def load_testbed_classifier():
    from adaptors.classifiers import TestbedAttributeClassifier

    return TestbedAttributeClassifier()


def seeded_images(n: int, seed: int) -> torch.Tensor:
    """Renderer images in [0, 1] with their labels, for classifier checks."""
    from testbed.data import render_balanced

    x, labels = render_balanced(n, seed)
    return (torch.from_numpy(x) + 1) / 2, labels
