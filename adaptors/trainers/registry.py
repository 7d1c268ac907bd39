"""The trainer registry: a finetune method's name -> its function, and what every trainer shares.

Every trainer has the same signature so the training worker runs any of them alike: it writes
the adaptor (weights + manifest.json) into `staging_dir`, keeps resumable state in
`checkpoint_dir`, reports each iteration through `progress`, and stops between iterations when
`should_stop()` (raising GenerationCancelled). Publishing to the store is the caller's job.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from adaptors.classifiers import AttributeClassifier
from common.adaptor_manifest import STAGING_PREFIX, AdaptorManifest, valid_adaptor_id
from common.schemas import FinetuneJob

ProgressFn = Callable[[dict[str, Any]], None]
StopFn = Callable[[], bool]


class TrainerFn(Protocol):
    def __call__(
        self,
        job: FinetuneJob,
        pipe: Any,
        classifier: AttributeClassifier,
        staging_dir: Path,
        checkpoint_dir: Path,
        progress: ProgressFn,
        should_stop: StopFn,
    ) -> AdaptorManifest | dict[str, Any] | None: ...


TRAINERS: dict[str, TrainerFn] = {}


def register_trainer(name: str) -> Callable[[TrainerFn], TrainerFn]:
    def decorate(fn: TrainerFn) -> TrainerFn:
        TRAINERS[name] = fn
        return fn

    return decorate


def require_known_attributes(job: FinetuneJob, classifier: AttributeClassifier) -> None:
    """Every targeted attribute must be one the classifier reads, or nothing can be measured."""
    if not job.prompts:
        raise ValueError(f"prompts: method {job.method!r} needs at least one prompt")
    for attr in job.fairness_target:
        if attr not in classifier.attributes:
            raise ValueError(f"fairness_target.{attr}: the classifier does not know this attribute")


def adaptor_id_for(staging_dir: Path, job: FinetuneJob) -> str:
    """The id the caller chose (`.staging-<id>`), else one derived from the job's name."""
    name = Path(staging_dir).name
    if name.startswith(STAGING_PREFIX) and valid_adaptor_id(name[len(STAGING_PREFIX) :]):
        return name[len(STAGING_PREFIX) :]
    if valid_adaptor_id(name):
        return name
    slug = re.sub(r"[^a-z0-9_-]+", "-", (job.name or job.method).lower()).strip("-_")[:40] or job.method
    return f"{slug}-{uuid.uuid4().hex[:8]}"


def registered_trainer(method: str) -> TrainerFn:
    try:
        return TRAINERS[method]
    except KeyError:
        raise KeyError(f"unknown finetune method {method!r}; known: {sorted(TRAINERS)}") from None
