"""Whether a finetune moved its evaluation prompts towards the target: the gate every published adaptor passes.

Pooled figures hide failure: a finetune that makes every mechanic male and every librarian
female has a pooled gender split near 50/50 and a per-prompt distance that did not move. So
every trainer reports, per evaluation prompt and pooled, before and after: the realised
shares, the total variation (TV) and KL divergence to the requested target, and the bias; and
a finished finetune whose mean per-prompt TV to the target did not fall by at least
`min_fairness_gain` (a share of the TV before) fails with `no_fairness_gain` and publishes
nothing. Torch-free: it works on realised shares only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common import bias as metrics

Shares = Mapping[str, Mapping[str, float]]


class FinetuneRefused(Exception):
    """A finished finetune that a gate refuses: nothing is published; `error` is the job's error body."""

    error_type = "finetune_refused"

    def error(self) -> dict[str, Any]:
        return {"type": self.error_type, "message": str(self)}


def prompt_fit(realised: Shares, target: Shares) -> dict[str, Any]:
    """One prompt's (or the pool's) realised shares, TV and KL to the target (means over attributes), and bias."""
    attrs = list(target)
    tv = {a: round(metrics.total_variation(realised[a], target[a]), 4) for a in attrs}
    kl = {a: round(metrics.kl_divergence(realised[a], target[a]), 4) for a in attrs}
    return {
        "realised": {a: {c: round(float(v), 4) for c, v in realised[a].items()} for a in attrs},
        "tv": round(sum(tv.values()) / len(attrs), 4),
        "kl": round(sum(kl.values()) / len(attrs), 4),
        "tv_per_attribute": tv,
        "bias": {a: round(metrics.bias(realised[a]), 4) for a in attrs},
    }


def fit_summary(per_prompt: Mapping[str, Shares], pooled: Shares, target: Shares) -> dict[str, Any]:
    """Per-prompt and pooled fit, and the per-prompt means that the gate and `auto` read."""
    prompts = {p: prompt_fit(r, target) for p, r in per_prompt.items()}
    n = max(1, len(prompts))
    return {
        "prompts": prompts,
        "pooled": prompt_fit(pooled, target),
        "mean_prompt_tv": round(sum(p["tv"] for p in prompts.values()) / n, 4),
        "mean_prompt_kl": round(sum(p["kl"] for p in prompts.values()) / n, 4),
        "max_prompt_tv": round(max((p["tv"] for p in prompts.values()), default=0.0), 4),
    }


class NoFairnessGain(FinetuneRefused):
    """The finetune did not move its evaluation prompts towards the target by the share the job asks."""

    error_type = "no_fairness_gain"

    def __init__(self, before: float, after: float, minimum: float) -> None:
        self.before, self.after, self.minimum = before, after, minimum
        gain = (before - after) / before if before > 0 else 0.0
        super().__init__(
            f"mean per-prompt total variation to the target went {before:.3f} -> {after:.3f} on the evaluation prompts "
            f"({gain:+.0%} gain), short of min_fairness_gain {minimum:.0%}; nothing was published"
        )

    def error(self) -> dict[str, Any]:
        return {**super().error(), "mean_prompt_tv": {"before": self.before, "after": self.after},
                "min_fairness_gain": self.minimum}  # fmt: skip


def require_fairness_gain(before_tv: float, after_tv: float, minimum: float) -> None:
    """Raise NoFairnessGain unless after <= (1 - minimum) * before (0: the gate is off).

    A model already within 0.02 of its target before training has nothing to gain; it passes
    when it stays there, so a finetune of a fair prompt is not refused for being fair already.
    """
    if minimum <= 0:
        return
    if before_tv <= 0.02 and after_tv <= 0.02:
        return
    if after_tv > (1.0 - minimum) * before_tv:
        raise NoFairnessGain(before_tv, after_tv, minimum)
