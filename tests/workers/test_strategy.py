"""The adaptor-matching and strategy rules (pure functions, no Redis, no model)."""

from __future__ import annotations

import pytest

from workers.strategy import StrategyError, decide, find_matching_adaptor, targets_match

HALF = {"gender": {"female": 0.5, "male": 0.5}}
BASES = {"testbed", "fairdiff-testbed"}


def manifest(id_: str, target: dict, base: str = "fairdiff-testbed", created: str = "2026-01-01T00:00:00") -> dict:
    return {"id": id_, "base_model": base, "target": target, "created": created}


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


def test_unimplemented_guidance_fails_clearly() -> None:
    with pytest.raises(StrategyError) as err:
        decide("guidance", HALF, None, [], BASES)
    assert err.value.type == "not_implemented"
    assert "guidance" in err.value.message


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
    assert decide("none", HALF, None, [manifest("good", HALF)], BASES).used == "none"
