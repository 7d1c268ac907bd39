"""Which fairness strategy a generate job runs with, and which stored adaptor matches a target.

Plain functions over plain data (no torch, no Redis) so the rules are unit-tested on their own:
the inference task only gathers manifests and acts on the returned decision.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.adaptor_matching import find_calibration, find_matching_adaptor, manifest_field
from common.schemas import Strategy


class StrategyError(Exception):
    """The job cannot run with the requested strategy; `type` goes into the job's error body."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}


@dataclass(frozen=True)
class Decision:
    """What the worker does: `used` is 'adaptor' or 'none'; `reason` is reported to the caller."""

    requested: str
    used: str
    reason: str
    adaptor_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "used": self.used, "reason": self.reason}


def decide(
    strategy: str,
    target: Mapping[str, Mapping[str, float]] | None,
    adaptor_id: str | None,
    manifests: Iterable[Any] | None,
    base_models: Collection[str],
    prompt: str = "",
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> Decision:
    """Pick the strategy actually run. Raises StrategyError for requests this build cannot serve.

    `manifests` is only iterated when a search is needed (it may be a lazy store listing).
    """
    if adaptor_id:
        return Decision(strategy, Strategy.adaptor.value, "explicit adaptor_id", adaptor_id)
    if strategy == Strategy.none.value:
        return Decision(strategy, Strategy.none.value, "strategy 'none' requested")
    if strategy == Strategy.assign.value:
        if not target:
            raise StrategyError("invalid_request", "strategy 'assign' needs a fairness_target")
        return Decision(strategy, Strategy.assign.value, "exact per-request counts, each image conditioned on its class")
    if not target:
        if strategy in (Strategy.adaptor.value, Strategy.guidance.value):
            raise StrategyError("invalid_request", f"strategy {strategy!r} needs a fairness_target or an adaptor_id")
        return Decision(strategy, Strategy.none.value, "no fairness_target given")
    listed = list(manifests or [])
    if strategy != Strategy.guidance.value:
        match = find_matching_adaptor(listed, target, base_models)
        if match is not None:
            found = str(manifest_field(match, "id"))
            return Decision(strategy, Strategy.adaptor.value, f"adaptor {found} was trained for this target", found)
        if strategy == Strategy.adaptor.value:
            raise StrategyError(
                "no_matching_adaptor",
                "no stored adaptor was trained for this fairness_target on this base model; "
                "train one (POST /v1/admin/finetunes) or name one with adaptor_id",
            )
    calibration = find_calibration(listed, target, base_models, prompt, steps, guidance_scale)
    if calibration is not None:
        found = str(manifest_field(calibration, "id"))
        return Decision(strategy, Strategy.guidance.value,
                        f"guidance weights {found} were calibrated for this target, prompt and sampler", found)  # fmt: skip
    if strategy == Strategy.guidance.value:
        raise StrategyError(
            "no_calibration",
            "no guidance calibration exists for this fairness_target, prompt, steps and guidance_scale; "
            "calibrate one (POST /v1/admin/finetunes with method 'ida') or use strategy 'assign' or 'auto'",
        )
    return Decision(
        strategy,
        Strategy.assign.value,
        "no stored adaptor matches this fairness_target and no guidance calibration applies: "
        "exact per-request counts with per-image conditioning",
    )
