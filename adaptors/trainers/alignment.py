"""Distributional alignment targets (Shen et al.'s DAL): which class each generated image should have.

Given the classifier's probabilities on one prompt's batch, the targets are the relabelling that
moves the batch to the target distribution at the least cost: exact optimal transport (POT's
`ot.emd`) from the images to class counts drawn from the target. Several attributes are aligned
jointly over the product of their classes (the target is the product of the marginals), so a
batch cannot satisfy gender by trading away skin tone. Averaging the plans of many drawn count
vectors makes the assignment of borderline images uncertain; an image whose target is less
certain than `confidence` gets none (label -1) and only the semantics term acts on it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import ot

from adaptors.assign import largest_remainder


@dataclass
class AlignmentTargets:
    """Per attribute: target class index per image (-1: none) and how certain it is."""

    labels: dict[str, np.ndarray]
    certainty: dict[str, np.ndarray]

    def dropped(self) -> int:
        """Images that got no target for at least one attribute."""
        if not self.labels:
            return 0
        return int(np.any(np.stack([lab < 0 for lab in self.labels.values()]), axis=0).sum())


def joint_classes(shares: dict[str, np.ndarray]) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """Every combination of class indices over the attributes, and its target share (product of marginals)."""
    attrs = list(shares)
    combos = list(itertools.product(*(range(len(shares[a])) for a in attrs)))
    joint = np.array([np.prod([shares[a][k] for a, k in zip(attrs, combo)]) for combo in combos], dtype=np.float64)
    return combos, joint / joint.sum()


def alignment_targets(
    probs: dict[str, np.ndarray],
    shares: dict[str, np.ndarray],
    *,
    draws: int = 100,
    confidence: float = 0.8,
    rng: np.random.Generator | None = None,
) -> AlignmentTargets:
    """Targets for one prompt's images (rows of `probs`, persons only).

    `draws=0` uses the single count vector closest to the target (largest remainder) instead of
    random draws: every target is then certain, which suits small batches and non-uniform targets.
    """
    attrs = list(shares)
    n = len(next(iter(probs.values()))) if probs else 0
    if n == 0:
        return AlignmentTargets({a: np.zeros(0, dtype=np.int64) for a in attrs}, {a: np.zeros(0) for a in attrs})
    combos, joint = joint_classes(shares)
    features = np.concatenate([np.asarray(probs[a], dtype=np.float64) for a in attrs], axis=1)
    onehots = np.zeros((len(combos), features.shape[1]))
    for j, combo in enumerate(combos):
        offset = 0
        for a, k in zip(attrs, combo):
            onehots[j, offset + k] = 1.0
            offset += len(shares[a])
    cost = ot.dist(features, onehots, metric="euclidean")
    if draws <= 0:
        exact = largest_remainder(n, {str(j): float(s) for j, s in enumerate(joint)})
        count_vectors = [np.array([exact[str(j)] for j in range(len(joint))])]
    else:
        rng = rng or np.random.default_rng(0)
        count_vectors = list(rng.multinomial(n, joint, size=draws))
    plan = np.zeros((n, len(combos)))
    for counts in count_vectors:
        used = np.flatnonzero(counts)
        plan[:, used] += ot.emd(np.ones(n), np.asarray(counts, dtype=np.float64)[used], cost[:, used])
    q = plan / plan.sum(axis=1, keepdims=True)
    labels: dict[str, np.ndarray] = {}
    certainty: dict[str, np.ndarray] = {}
    for i, a in enumerate(attrs):
        marginal = np.zeros((n, len(shares[a])))
        for j, combo in enumerate(combos):
            marginal[:, combo[i]] += q[:, j]
        best = marginal.argmax(axis=1)
        sure = marginal.max(axis=1)
        labels[a] = np.where(sure >= confidence, best, -1).astype(np.int64)
        certainty[a] = sure
    return AlignmentTargets(labels, certainty)
