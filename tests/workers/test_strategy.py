"""The adaptor-matching and strategy rules (pure functions, no Redis, no model)."""

from __future__ import annotations

import pytest

from common.adaptor_matching import adaptor_conflict, find_matching_adaptor, fit_to_target, targets_match
from workers.strategy import StrategyError, decide

HALF = {"gender": {"female": 0.5, "male": 0.5}}
BASES = {"testbed", "fairdiff-testbed"}


def manifest(
    id_: str,
    target: dict,
    base: str = "fairdiff-testbed",
    created: str = "2026-01-01T00:00:00",
    tv: float | None = 0.05,
    held_out: bool = True,
) -> dict:
    """A finetune's manifest; `tv` is its measured mean per-prompt TV to the target on its evaluation prompts."""
    metrics = {}
    if tv is not None:
        metrics = {"eval_prompts": ["a", "b"], "eval_prompts_held_out": held_out, "after": {"mean_prompt_tv": tv}}
    return {"id": id_, "base_model": base, "target": target, "created": created, "metrics": metrics}


class Obj:
    """A manifest as an object (the store's dataclass) rather than a dict."""

    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)


def test_targets_match_within_tolerance_only() -> None:
    assert targets_match(HALF, {"gender": {"female": 0.5 + 5e-7, "male": 0.5 - 5e-7}})
    assert not targets_match(HALF, {"gender": {"female": 0.5 + 2e-6, "male": 0.5 - 2e-6}})


def test_targets_match_needs_same_attributes_and_treats_missing_class_as_zero() -> None:
    both = {**HALF, "race": {"a": 1.0, "b": 0.0}}
    assert not targets_match(HALF, both)
    assert not targets_match(both, HALF)
    assert targets_match({"gender": {"female": 1.0}}, {"gender": {"female": 1.0, "male": 0.0}})


def test_find_matching_adaptor_filters_base_model_and_target() -> None:
    ms = [
        manifest("other-base", HALF, base="sd15"),
        manifest("skewed", {"gender": {"female": 0.75, "male": 0.25}}),
        manifest("good", HALF),
    ]
    assert find_matching_adaptor(ms, HALF, BASES)["id"] == "good"
    assert find_matching_adaptor(ms, {"gender": {"female": 0.7, "male": 0.3}}, BASES) is None
    assert find_matching_adaptor(ms, HALF, {"sd15"})["id"] == "other-base"


def test_find_matching_adaptor_prefers_newest_and_reads_objects() -> None:
    ms = [
        Obj(id="old", base_model="testbed", target=HALF, created="2026-01-01T00:00:00"),
        Obj(id="new", base_model="testbed", target=HALF, created="2026-02-01T00:00:00"),
        Obj(id="no-target", base_model="testbed", target=None, created="2026-03-01T00:00:00"),
    ]
    assert find_matching_adaptor(ms, HALF, BASES).id == "new"


def calibration(
    id_: str, prompt: str = "p", steps: int = 20, gs: float = 5.0, target: dict = HALF, female_after: float = 0.5, **kw
) -> dict:
    per_prompt = {prompt: {"realised_after": {"gender": {"female": female_after, "male": 1 - female_after}}}}
    return {**manifest(id_, target, **kw), "kind": "ida", "hyperparameters": {"prompts": [prompt]},
            "sampler": {"steps": steps, "guidance_scale": gs}, "metrics": {"per_prompt": per_prompt}}  # fmt: skip


def test_guidance_without_a_calibration_fails_clearly() -> None:
    with pytest.raises(StrategyError) as err:
        decide("guidance", HALF, None, [manifest("lora", HALF)], BASES, "p", 20, 5.0)
    assert err.value.type == "no_calibration"
    assert "calibrate" in err.value.message and "assign" in err.value.message
    with pytest.raises(StrategyError) as err:
        decide("guidance", None, None, None, BASES, "p", 20, 5.0)
    assert err.value.type == "invalid_request"


def test_guidance_needs_the_same_prompt_target_and_sampler() -> None:
    ms = [calibration("steps10", steps=10), calibration("gs7", gs=7.0), calibration("other-prompt", prompt="q"),
          calibration("skewed", target={"gender": {"female": 0.3, "male": 0.7}}), calibration("ok")]  # fmt: skip
    decision = decide("guidance", HALF, None, ms, BASES, "p", 20, 5.0)
    assert (decision.used, decision.adaptor_id) == ("guidance", "ok")
    assert decide("guidance", HALF, None, ms, BASES, "p", 10, 5.0).adaptor_id == "steps10"
    with pytest.raises(StrategyError):
        decide("guidance", HALF, None, ms, BASES, "p", 30, 5.0)


def test_auto_prefers_an_adaptor_then_guidance_then_assign() -> None:
    cal = calibration("cal")
    assert decide("auto", HALF, None, [cal, manifest("lora", HALF)], BASES, "p", 20, 5.0).adaptor_id == "lora"
    assert decide("auto", HALF, None, [cal], BASES, "p", 20, 5.0).used == "guidance"
    assert decide("auto", HALF, None, [cal], BASES, "other", 20, 5.0).used == "assign"
    # a calibration is never taken for a weight adaptor
    with pytest.raises(StrategyError):
        decide("adaptor", HALF, None, [cal], BASES, "p", 20, 5.0)


def test_assign_needs_a_target_and_runs_assign() -> None:
    assert decide("assign", HALF, None, [manifest("good", HALF)], BASES).used == "assign"
    with pytest.raises(StrategyError) as err:
        decide("assign", None, None, None, BASES)
    assert err.value.type == "invalid_request"


def test_auto_uses_a_matching_adaptor_else_assign_with_reason() -> None:
    hit = decide("auto", HALF, None, [manifest("good", HALF)], BASES)
    assert (hit.used, hit.adaptor_id) == ("adaptor", "good")
    miss = decide("auto", HALF, None, [], BASES)
    assert miss.used == "assign" and miss.adaptor_id is None
    assert "no stored adaptor" in miss.reason
    assert decide("auto", None, None, None, BASES).reason == "no fairness_target given"


def test_adaptor_strategy_without_match_is_an_error() -> None:
    with pytest.raises(StrategyError) as err:
        decide("adaptor", HALF, None, [manifest("skewed", {"gender": {"female": 1.0, "male": 0.0}})], BASES)
    assert err.value.type == "no_matching_adaptor"


def test_explicit_adaptor_id_wins_and_none_means_none() -> None:
    explicit = decide("auto", HALF, "abc", None, BASES)
    assert (explicit.used, explicit.adaptor_id, explicit.reason) == ("adaptor", "abc", "explicit adaptor_id")
    assert explicit.guarantee == "expected"
    assert decide("none", HALF, None, [manifest("good", HALF)], BASES).used == "none"


def test_auto_takes_an_adaptor_only_when_its_measured_held_out_fit_qualifies() -> None:
    poor = manifest("poor", HALF, tv=0.31)
    unmeasured = manifest("unmeasured", HALF, tv=None)
    on_training_prompts = manifest("not-held-out", HALF, tv=0.02, held_out=False)
    for m in (poor, unmeasured, on_training_prompts):
        d = decide("auto", HALF, None, [m], BASES, max_tv=0.10)
        assert (d.used, d.guarantee) == ("assign", "exact"), m["id"]
    good = decide("auto", HALF, None, [poor, manifest("good", HALF, tv=0.08)], BASES, max_tv=0.10)
    assert (good.used, good.adaptor_id, good.guarantee) == ("adaptor", "good", "expected")
    assert good.fit["tv"] == 0.08 and good.to_dict()["fit"]["held_out"] is True
    # the operator's bound decides; an explicit strategy 'adaptor' takes any adaptor trained for the target
    assert decide("auto", HALF, None, [poor], BASES, max_tv=0.5).adaptor_id == "poor"
    assert decide("adaptor", HALF, None, [poor], BASES, max_tv=0.10).adaptor_id == "poor"


def test_auto_takes_a_calibration_only_when_its_fit_for_this_prompt_qualifies() -> None:
    off = calibration("off", female_after=0.8)
    assert decide("auto", HALF, None, [off], BASES, "p", 20, 5.0, max_tv=0.10).used == "assign"
    near = calibration("near", female_after=0.45)
    d = decide("auto", HALF, None, [off, near], BASES, "p", 20, 5.0, max_tv=0.10)
    assert (d.used, d.adaptor_id, d.fit["tv"]) == ("guidance", "near", 0.05)


@pytest.mark.parametrize("field", ["enforce", "ledger"])
def test_enforce_and_ledger_are_served_exactly_or_refused_never_downgraded(field: str) -> None:
    good = [manifest("good", HALF, tv=0.01), calibration("cal")]
    d = decide("auto", HALF, None, good, BASES, "p", 20, 5.0, exact_required=field)
    assert (d.used, d.guarantee) == ("assign", "exact") and field in d.reason
    for strategy in ("adaptor", "guidance"):
        with pytest.raises(StrategyError) as err:
            decide(strategy, HALF, None, good, BASES, "p", 20, 5.0, exact_required=field)
        assert err.value.type == "strategy_conflict"
    with pytest.raises(StrategyError) as err:
        decide("auto", HALF, "good", None, BASES, exact_required=field)
    assert err.value.type == "strategy_conflict"


def test_an_explicit_adaptor_for_another_target_or_prompt_is_refused() -> None:
    skewed = manifest("skewed", {"gender": {"female": 0.2, "male": 0.8}})
    assert adaptor_conflict(skewed, HALF, "p", 20, 5.0)[0] == "adaptor_target_mismatch"
    assert adaptor_conflict(skewed, None, "p", 20, 5.0) is None  # no target given: the adaptor's own applies
    cal = calibration("cal", prompt="p")
    assert adaptor_conflict(cal, HALF, "q", 20, 5.0)[0] == "adaptor_prompt_mismatch"
    assert adaptor_conflict(cal, HALF, "p", 10, 5.0)[0] == "adaptor_sampler_mismatch"
    assert adaptor_conflict(cal, HALF, "p", 20, 5.0) is None
    with pytest.raises(StrategyError) as err:
        decide("auto", HALF, "skewed", None, BASES, "p", explicit=skewed)
    assert err.value.type == "adaptor_target_mismatch"
    assert fit_to_target(cal, "q") is None and fit_to_target(cal, "p")["tv"] == 0.0


PROMPT = "a photo of the face of a senator, a person"


def gmm(id_: str, latent: float, assign: float, classes: list | None = None, steps: int = 20) -> dict:
    """A latent calibration for PROMPT, with the within-one rates it measured for itself and for `assign`."""
    row = {"within_one": {"latent": latent, "assign": assign}, "requests": 8, "images_per_request": 8}
    classes = classes if classes is not None else [{"gender": "female"}, {"gender": "male"}]
    return {"id": id_, "kind": "gmm", "base_model": "testbed", "target": HALF, "attributes": ["gender"],
            "created": "2026-01-02T00:00:00", "metrics": {"per_prompt": {PROMPT: row}},
            "hyperparameters": {"prompts": [PROMPT], "component_classes": [classes]},
            "sampler": {"steps": steps, "guidance_scale": 5.0}}  # fmt: skip


def test_auto_prefers_a_latent_calibration_only_where_it_measured_at_least_assign() -> None:
    better, worse = gmm("gmm-good", 0.95, 0.8), gmm("gmm-bad", 0.7, 0.8)
    picked = decide("auto", HALF, None, [better], BASES, PROMPT, 20, 5.0)
    assert (picked.used, picked.adaptor_id, picked.guarantee) == ("latent", "gmm-good", "exact")
    assert "0.95" in picked.reason and "0.8" in picked.reason and picked.fit["within_one"] == 0.95
    assert decide("auto", HALF, None, [worse], BASES, PROMPT, 20, 5.0).used == "assign"
    assert decide("auto", HALF, None, [better], BASES, PROMPT, 10, 5.0).used == "assign"  # another sampler setting
    assert decide("auto", HALF, None, [better], BASES, "another prompt", 20, 5.0).used == "assign"
    # enforce and ledger need exact counts: latent gives them, and `auto` keeps preferring it where it qualifies
    assert decide("auto", HALF, None, [better], BASES, PROMPT, 20, 5.0, exact_required="enforce").used == "latent"
    assert decide("latent", HALF, None, [worse], BASES, PROMPT, 20, 5.0, exact_required="ledger").used == "latent"


def test_latent_needs_a_calibration_that_carries_every_class() -> None:
    with pytest.raises(StrategyError) as err:
        decide("latent", HALF, None, [], BASES, PROMPT, 20, 5.0)
    assert err.value.type == "no_calibration" and "gmm" in err.value.message
    men = gmm("gmm-men", 1.0, 0.5, classes=[{"gender": "male"}])
    with pytest.raises(StrategyError) as err:
        decide("latent", HALF, None, [men], BASES, PROMPT, 20, 5.0)
    assert err.value.type == "uncovered_class" and err.value.message.startswith("fairness_target.gender.female")
    assert decide("auto", HALF, None, [men], BASES, PROMPT, 20, 5.0).used == "assign"  # auto never takes it
    assert decide("latent", {"gender": {"male": 1.0, "female": 0.0}}, None, [men], BASES, PROMPT, 20, 5.0).used == "latent"
    explicit = decide("auto", HALF, "gmm-good", None, BASES, PROMPT, 20, 5.0, explicit=gmm("gmm-good", 0.9, 0.9))
    assert (explicit.used, explicit.guarantee) == ("latent", "exact")
    with pytest.raises(StrategyError) as err:
        decide("latent", HALF, "gmm-good", None, BASES, PROMPT, 10, 5.0, explicit=gmm("gmm-good", 0.9, 0.9))
    assert err.value.type == "adaptor_sampler_mismatch"
    assert find_matching_adaptor([gmm("gmm-good", 0.9, 0.9)], HALF, BASES) is None  # never an `adaptor`
