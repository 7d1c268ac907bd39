"""Which fairness strategy a generate job runs with, and which stored adaptor matches a target.

Plain functions over plain data (no torch, no Redis) so the rules are unit-tested on their own:
the inference task only gathers manifests and acts on the returned decision.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.schemas import TARGET_TOLERANCE, Strategy

GUIDANCE_KIND = "ida"  # calibrated guidance weights: applied by the `guidance` strategy, not as an `adaptor`


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


def _field(manifest: Any, *names: str) -> Any:
    """Read a manifest field whether the manifest is a dataclass/object or a plain dict."""
    for name in names:
        if isinstance(manifest, Mapping):
            if name in manifest:
                return manifest[name]
        elif hasattr(manifest, name):
            return getattr(manifest, name)
    return None


def manifest_target(manifest: Any) -> Mapping[str, Mapping[str, float]] | None:
    return _field(manifest, "target", "fairness_target", "trained_target")


def targets_match(
    a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]], tol: float = TARGET_TOLERANCE
) -> bool:
    """Same attributes, and each class's probability equal within `tol` (a missing class counts as 0)."""
    if set(a) != set(b):
        return False
    for attr in a:
        classes = set(a[attr]) | set(b[attr])
        for cls in classes:
            if abs(float(a[attr].get(cls, 0.0)) - float(b[attr].get(cls, 0.0))) > tol:
                return False
    return True


def find_matching_adaptor(
    manifests: Iterable[Any],
    target: Mapping[str, Mapping[str, float]],
    base_models: Collection[str],
    tol: float = TARGET_TOLERANCE,
) -> Any | None:
    """The stored adaptor trained for exactly this target on this base model, or None.

    Several matches: the newest (by `created`, then by id) wins, so the choice is deterministic
    and a retrained adaptor supersedes an older one without retiring it.
    """
    matches = []
    for manifest in manifests:
        if _field(manifest, "base_model") not in base_models or _field(manifest, "kind") == GUIDANCE_KIND:
            continue
        trained = manifest_target(manifest)
        if not trained or not targets_match(trained, target, tol):
            continue
        matches.append(manifest)
    if not matches:
        return None
    return max(matches, key=lambda m: (str(_field(m, "created") or ""), str(_field(m, "id") or "")))


def find_calibration(
    manifests: Iterable[Any],
    target: Mapping[str, Mapping[str, float]],
    base_models: Collection[str],
    prompt: str,
    steps: int | None,
    guidance_scale: float | None,
    tol: float = TARGET_TOLERANCE,
) -> Any | None:
    """The newest IDA calibration for this target, base model, prompt and sampler setting, or None.

    Guidance weights hold only for the steps and CFG scale they were calibrated at, and only for
    the prompts they were calibrated on, so every one of those must match.
    """
    matches = []
    for manifest in manifests:
        if _field(manifest, "kind") != GUIDANCE_KIND or _field(manifest, "base_model") not in base_models:
            continue
        trained = manifest_target(manifest)
        sampler = _field(manifest, "sampler") or {}
        hp = _field(manifest, "hyperparameters") or {}
        if not trained or not targets_match(trained, target, tol) or prompt not in hp.get("prompts", []):
            continue
        if steps is not None and sampler.get("steps") != steps:
            continue
        if guidance_scale is not None and abs(float(sampler.get("guidance_scale", -1.0)) - guidance_scale) > 1e-6:
            continue
        matches.append(manifest)
    if not matches:
        return None
    return max(matches, key=lambda m: (str(_field(m, "created") or ""), str(_field(m, "id") or "")))


def base_model_names(base_model: str) -> set[str]:
    """Names a manifest may carry for this base model (the setting, and for the testbed its id)."""
    names = {base_model}
    if base_model == "testbed":
        from testbed import BASE_MODEL_ID

        names.add(BASE_MODEL_ID)
    return names


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
            found = str(_field(match, "id"))
            return Decision(strategy, Strategy.adaptor.value, f"adaptor {found} was trained for this target", found)
        if strategy == Strategy.adaptor.value:
            raise StrategyError(
                "no_matching_adaptor",
                "no stored adaptor was trained for this fairness_target on this base model; "
                "train one (POST /v1/admin/finetunes) or name one with adaptor_id",
            )
    calibration = find_calibration(listed, target, base_models, prompt, steps, guidance_scale)
    if calibration is not None:
        found = str(_field(calibration, "id"))
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
