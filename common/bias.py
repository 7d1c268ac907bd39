"""Bias metrics over sets of per-image class labels. Pure numpy: the gateway may use them too.

Definitions follow Shen et al. (ICLR 2024): bias = mean over class pairs of |freq_i - freq_j|,
computed among images where a person was found. KL and total variation compare a realised
distribution with a requested target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations, product

Labels = Sequence[str | None]


def frequencies(labels: Labels, classes: Sequence[str]) -> dict[str, float]:
    """Share of each class among labelled images (None = no person, left out).

    With no labelled image at all every share is 0.0, so callers can tell "nothing seen".
    """
    seen = [lab for lab in labels if lab is not None]
    unknown = set(seen) - set(classes)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not among the classes {list(classes)}")
    n = len(seen)
    return {c: (sum(1 for lab in seen if lab == c) / n if n else 0.0) for c in classes}


def bias(freqs: Mapping[str, float]) -> float:
    """Mean over unordered class pairs of |freq_i - freq_j|; 0 is perfectly balanced."""
    values = list(freqs.values())
    if len(values) < 2:
        return 0.0
    pairs = list(combinations(values, 2))
    return sum(abs(a - b) for a, b in pairs) / len(pairs)


def total_variation(realised: Mapping[str, float], target: Mapping[str, float]) -> float:
    """Half the L1 distance: the largest share of images that would have to change class."""
    keys = set(realised) | set(target)
    return 0.5 * sum(abs(realised.get(k, 0.0) - target.get(k, 0.0)) for k in keys)


def kl_divergence(realised: Mapping[str, float], target: Mapping[str, float], eps: float = 1e-6) -> float:
    """KL(realised || target) in nats, with eps smoothing so an empty class stays finite."""
    keys = sorted(set(realised) | set(target))
    p = [realised.get(k, 0.0) + eps for k in keys]
    q = [target.get(k, 0.0) + eps for k in keys]
    sp, sq = sum(p), sum(q)
    return sum((pi / sp) * math.log((pi / sp) / (qi / sq)) for pi, qi in zip(p, q, strict=True))


def joint_labels(per_attribute: Mapping[str, Labels]) -> list[str | None]:
    """Per-image joint class ('female|I'), None where any attribute is missing."""
    attrs = list(per_attribute)
    columns = [per_attribute[a] for a in attrs]
    out: list[str | None] = []
    for row in zip(*columns, strict=True):
        out.append(None if any(v is None for v in row) else "|".join(row))  # type: ignore[arg-type]
    return out


def joint_classes(classes: Mapping[str, Sequence[str]]) -> list[str]:
    return ["|".join(combo) for combo in product(*classes.values())]


def intersectional_bias(per_attribute: Mapping[str, Labels], classes: Mapping[str, Sequence[str]]) -> float:
    """Bias over the joint classes of several attributes (e.g. gender x skin tone: 8 classes)."""
    sub = {a: classes[a] for a in per_attribute}
    return bias(frequencies(joint_labels(per_attribute), joint_classes(sub)))


def no_person_share(person: Sequence[bool]) -> float:
    """Share of images in which no person was found."""
    return (sum(1 for p in person if not p) / len(person)) if person else 0.0
