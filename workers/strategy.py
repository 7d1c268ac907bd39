"""Which fairness strategy a generate job runs with, and which stored adaptor matches a target.

Plain functions over plain data (no torch, no Redis) so the rules are unit-tested on their own:
the inference task only gathers manifests and acts on the returned decision.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.adaptor_matching import (
    LATENT_KIND,
    adaptor_conflict,
    find_calibration,
    find_latent_calibration,
    find_matching_adaptor,
    fit_to_target,
    has_no_target,
    latent_fit,
    manifest_field,
    uncovered_class,
)
from common.schemas import Strategy


class StrategyError(Exception):
    """The job cannot run with the requested strategy; `type` goes into the job's error body."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}


EXACT = "exact"
EXPECTED = "expected"


@dataclass(frozen=True)
class Decision:
    """What the worker does: `used` is the strategy run; `reason` and `guarantee` are reported to the caller.

    `guarantee` is "exact" when the request's counts are assigned and delivered per request
    (`assign`, `latent`), "expected" when the distribution holds only on average (an adaptor or guidance),
    and None when no fairness_target is in play. `fit` is the adaptor's measured fit to its target.
    """

    requested: str
    used: str
    reason: str
    adaptor_id: str | None = None
    guarantee: str | None = None
    fit: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"requested": self.requested, "used": self.used, "reason": self.reason}
        if self.guarantee is not None:
            out["guarantee"] = self.guarantee
        if self.adaptor_id is not None:
            out["fit"] = self.fit
        return out


def _exact(strategy: str, reason: str) -> Decision:
    return Decision(strategy, Strategy.assign.value, reason, guarantee=EXACT)


def _latent(strategy: str, manifest: Any, prompt: str, target: Mapping[str, Mapping[str, float]], reason: str) -> Decision:
    """The `latent` strategy with this calibration; StrategyError naming a target class none of its components carries."""
    found = str(manifest_field(manifest, "id"))
    missing = uncovered_class(manifest, prompt, target)
    if missing is not None:
        raise StrategyError("uncovered_class", f"{missing}: no component of latent calibration {found!r} carries this "
                            "class (alone or with the target's other classes) for this prompt; calibrate it (method 'gmm') "
                            "with more images, or use 'assign'")  # fmt: skip
    return Decision(strategy, Strategy.latent.value, reason, found, EXACT, latent_fit(manifest, prompt))


def _latent_qualifies(manifest: Any, prompt: str, target: Mapping[str, Mapping[str, float]]) -> str | None:
    """Why `auto` may serve with this latent calibration (its measured within-one rate for this prompt is at least
    `assign`'s on the same held-out requests, and it carries every class of the target); None when it may not."""
    fit = latent_fit(manifest, prompt)
    if manifest is None or fit is None or uncovered_class(manifest, prompt, target) is not None:
        return None
    mine, theirs = fit.get("within_one"), fit.get("assign_within_one")
    if mine is None or theirs is None or float(mine) < float(theirs):
        return None
    return (f"latent calibration {manifest_field(manifest, 'id')} holds this prompt and sampler, and its measured "
            f"within-one rate {mine} is at least assign's {theirs} ({fit['measured_on']}): exact counts at the cost "
            "of a plain image")  # fmt: skip


def decide(
    strategy: str,
    target: Mapping[str, Mapping[str, float]] | None,
    adaptor_id: str | None,
    manifests: Iterable[Any] | None,
    base_models: Collection[str],
    prompt: str = "",
    steps: int | None = None,
    guidance_scale: float | None = None,
    *,
    exact_required: str | None = None,
    max_tv: float = 0.10,
    explicit: Any | None = None,
) -> Decision:
    """Pick the strategy actually run. Raises StrategyError for requests this build cannot serve.

    `manifests` is only iterated when a search is needed (it may be a lazy store listing).
    `exact_required` names the request field ('enforce' or 'ledger') that needs per-request exact
    counts: such a request is served by `assign` or refused, never downgraded to an adaptor.
    `explicit` is the manifest of `adaptor_id`, when the caller has read it, so a mismatch with
    the request is refused here with the same rule the gateway applies.
    """
    if adaptor_id and explicit is not None and manifest_field(explicit, "kind") == LATENT_KIND:
        if not target:
            raise StrategyError("invalid_request", f"latent calibration {adaptor_id!r} needs a fairness_target")
        conflict = adaptor_conflict(explicit, target, prompt, steps, guidance_scale)
        if conflict is not None:
            raise StrategyError(*conflict)
        return _latent(strategy, explicit, prompt, target, f"explicit adaptor_id: latent calibration {adaptor_id}")
    if adaptor_id:
        if exact_required:
            raise StrategyError("strategy_conflict", f"{exact_required} needs exact per-request counts; adaptor_id gives "
                                "the distribution only in expectation (drop adaptor_id or use strategy 'assign')")  # fmt: skip
        fit = None
        if explicit is not None:
            conflict = adaptor_conflict(explicit, target, prompt, steps, guidance_scale)
            if conflict is not None:
                raise StrategyError(*conflict)
            if has_no_target(explicit):
                return Decision(strategy, Strategy.adaptor.value, f"explicit adaptor_id; adaptor {adaptor_id} "
                                f"({manifest_field(explicit, 'kind')}) has no fairness_target: it was debiased without "
                                "one, so no distribution is promised", adaptor_id)  # fmt: skip
            fit = fit_to_target(explicit, prompt)
        return Decision(strategy, Strategy.adaptor.value, "explicit adaptor_id", adaptor_id, EXPECTED, fit)
    if strategy == Strategy.none.value:
        return Decision(strategy, Strategy.none.value, "strategy 'none' requested")
    if strategy == Strategy.assign.value:
        if not target:
            raise StrategyError("invalid_request", "strategy 'assign' needs a fairness_target")
        return _exact(strategy, "exact per-request counts, each image conditioned on its class")
    if strategy == Strategy.latent.value:
        if not target:
            raise StrategyError("invalid_request", "strategy 'latent' needs a fairness_target")
        found = find_latent_calibration(manifests or [], target, base_models, prompt, steps, guidance_scale)
        if found is None:
            raise StrategyError("no_calibration", "no latent calibration exists for this prompt, steps and "
                                "guidance_scale over the target's attributes; calibrate one (POST /v1/admin/finetunes "
                                "with method 'gmm') or use strategy 'assign' or 'auto'")  # fmt: skip
        return _latent(strategy, found, prompt, target, "latent mixtures calibrated for this prompt and sampler: each "
                       "image moved into a component of its assigned class")  # fmt: skip
    if not target:
        if strategy in (Strategy.adaptor.value, Strategy.guidance.value):
            raise StrategyError("invalid_request", f"strategy {strategy!r} needs a fairness_target or an adaptor_id")
        return Decision(strategy, Strategy.none.value, "no fairness_target given")
    if exact_required:
        if strategy != Strategy.auto.value:
            raise StrategyError("strategy_conflict", f"{exact_required} needs exact per-request counts, which strategy "
                                f"{strategy!r} does not give; use 'assign' or 'auto'")  # fmt: skip
        listed = list(manifests or [])
        calibrated = find_latent_calibration(listed, target, base_models, prompt, steps, guidance_scale)
        why = _latent_qualifies(calibrated, prompt, target)
        if why is not None:
            return _latent(strategy, calibrated, prompt, target, f"{exact_required} needs exact per-request counts; {why}")
        return _exact(strategy, f"{exact_required} needs exact per-request counts: assign serves it whatever adaptors exist")
    listed = list(manifests or [])
    if strategy != Strategy.guidance.value:
        # `auto` takes an adaptor only when its measured held-out fit qualifies; an explicit 'adaptor' takes any match
        match = find_matching_adaptor(listed, target, base_models, max_tv=max_tv if strategy == Strategy.auto.value else None)
        if match is not None:
            found = str(manifest_field(match, "id"))
            fit = fit_to_target(match, prompt)
            why = f"adaptor {found} was trained for this target"
            if fit and fit.get("tv") is not None:
                why += f" and met it within TV {fit['tv']} on held-out prompts (auto needs <= {max_tv})"
            return Decision(strategy, Strategy.adaptor.value, why, found, EXPECTED, fit)
        if strategy == Strategy.adaptor.value:
            raise StrategyError(
                "no_matching_adaptor",
                "no stored adaptor was trained for this fairness_target on this base model; "
                "train one (POST /v1/admin/finetunes) or name one with adaptor_id",
            )
    calibration = find_calibration(listed, target, base_models, prompt, steps, guidance_scale,
                                   max_tv=max_tv if strategy == Strategy.auto.value else None)  # fmt: skip
    if calibration is not None:
        found = str(manifest_field(calibration, "id"))
        return Decision(strategy, Strategy.guidance.value,
                        f"guidance weights {found} were calibrated for this target, prompt and sampler", found,
                        EXPECTED, fit_to_target(calibration, prompt))  # fmt: skip
    if strategy == Strategy.guidance.value:
        raise StrategyError(
            "no_calibration",
            "no guidance calibration exists for this fairness_target, prompt, steps and guidance_scale; "
            "calibrate one (POST /v1/admin/finetunes with method 'ida') or use strategy 'assign' or 'auto'",
        )
    calibrated = find_latent_calibration(listed, target, base_models, prompt, steps, guidance_scale)
    why = _latent_qualifies(calibrated, prompt, target) if strategy == Strategy.auto.value else None
    if why is not None:
        return _latent(strategy, calibrated, prompt, target, why)
    return _exact(
        strategy,
        f"no stored adaptor for this fairness_target has a measured held-out fit within TV {max_tv}, and no "
        "qualifying guidance calibration applies: exact per-request counts with per-image conditioning",
    )
