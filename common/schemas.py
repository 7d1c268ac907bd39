"""Torch-free schemas shared by the gateway and the workers.

The gateway turns an HTTP body into these; workers read them back from the job store.
Neither side ever sees the other's framework types.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

TARGET_TOLERANCE = 1e-6


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


class JobKind(str, Enum):
    generate = "generate"
    finetune = "finetune"


class Strategy(str, Enum):
    auto = "auto"
    adaptor = "adaptor"
    guidance = "guidance"
    assign = "assign"
    latent = "latent"
    none = "none"


class FieldError(ValueError):
    """Bad input, naming the offending field by its JSON path (e.g. 'fairness_target.gender.male')."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


FairnessTarget = dict[str, dict[str, float]]


def validate_target(
    target: Mapping[str, Any], attributes: Mapping[str, list[str]] | None, field: str = "fairness_target"
) -> FairnessTarget:
    """Check a target against a classifier's attributes; return it with float probabilities.

    Each attribute must be known, each class known, probabilities finite, >= 0 and summing to 1
    within 1e-6. Classes left out get probability 0 (so {"male": 1.0} means "all male").
    """
    if not isinstance(target, Mapping) or not target:
        raise FieldError(field, "must name at least one attribute")
    out: FairnessTarget = {}
    for attr, dist in target.items():
        path = f"{field}.{attr}"
        if attributes is not None and attr not in attributes:
            raise FieldError(path, f"unknown attribute {attr!r}; the base model's classifier knows {sorted(attributes)}")
        if not isinstance(dist, Mapping) or not dist:
            raise FieldError(path, "must map each class to a probability")
        classes = attributes[attr] if attributes is not None else list(dist)
        probs: dict[str, float] = {}
        for cls, p in dist.items():
            cpath = f"{path}.{cls}"
            if cls not in classes:
                raise FieldError(cpath, f"unknown class {cls!r} for {attr!r}; known: {list(classes)}")
            if isinstance(p, bool) or not isinstance(p, (int, float)):
                raise FieldError(cpath, "must be a number")
            if not math.isfinite(p):
                raise FieldError(cpath, "must be finite")
            if p < 0:
                raise FieldError(cpath, "must not be negative")
            probs[cls] = float(p)
        total = sum(probs.values())
        if abs(total - 1.0) > TARGET_TOLERANCE:
            raise FieldError(path, f"probabilities sum to {total:.9g}, not 1 (tolerance {TARGET_TOLERANCE})")
        out[attr] = {c: probs.get(c, 0.0) for c in classes}
    return out


@dataclass
class ModelInfo:
    """What a worker publishes about its base model, so the gateway can validate without torch."""

    base_model: str
    attributes: dict[str, list[str]] | None
    height: int
    width: int
    max_tokens: int
    tokenizer_json: str | None = None
    default_steps: int = 20
    default_guidance_scale: float = 5.0
    # the base model's named prompt sets (name -> prompts) and each training set's held-out partner, so the gateway
    # can expand a finetune's `prompt_set` without importing the model's code
    prompt_sets: dict[str, list[str]] = field(default_factory=dict)
    held_out_sets: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerateJob:
    """A validated generation request, as the inference worker receives it."""

    prompt: str
    num_images: int = 1
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 5.0
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    fairness_target: FairnessTarget | None = None
    strategy: str = Strategy.auto.value
    adaptor_id: str | None = None
    audit: bool = True
    enforce: bool = False
    strict: bool = False  # enforce: "strict" -- a shortfall fails the job (enforcement_incomplete)
    ledger: str | None = None
    ledger_scope: str = "anon"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerateJob:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class FinetuneJob:
    """A validated finetune request, as the training worker receives it."""

    method: str
    base_model: str
    fairness_target: FairnessTarget
    prompts: list[str]
    prompt_set: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    eval_prompts: list[str] | None = None  # held-out prompts the before/after metrics are measured on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FinetuneJob:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
