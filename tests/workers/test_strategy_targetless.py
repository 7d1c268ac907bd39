"""Adaptors trained without a target (InvDiff's `unet_delta`): `auto` and `adaptor` never pick them; adaptor_id does."""

from __future__ import annotations

import pytest

from common.adaptor_matching import adaptor_conflict, find_matching_adaptor
from workers.strategy import StrategyError, decide

UNIFORM = {"gender": {"female": 0.5, "male": 0.5}}


def invdiff_manifest(**extra) -> dict:
    """As the trainer writes it: no target; its before/after measured against uniform on held-out prompts."""
    return {"id": "inv-1", "kind": "unet_delta", "base_model": "testbed", "target": {}, "created": "2026-01-01",
            "metrics": {"eval_prompts_held_out": True, "eval_prompts": ["p"], "after": {"mean_prompt_tv": 0.01}},
            **extra}  # fmt: skip


@pytest.mark.parametrize("strategy", ["auto", "adaptor"])
def test_auto_and_adaptor_never_pick_it(strategy: str) -> None:
    # even a manifest that (wrongly) carries the requested target is never matched: the kind has none
    for manifest in (invdiff_manifest(), invdiff_manifest(target=UNIFORM)):
        assert find_matching_adaptor([manifest], UNIFORM, {"testbed"}) is None
        if strategy == "auto":
            assert decide(strategy, UNIFORM, None, [manifest], {"testbed"}).used == "assign"
        else:
            with pytest.raises(StrategyError, match="no stored adaptor"):
                decide(strategy, UNIFORM, None, [manifest], {"testbed"})


def test_adaptor_id_serves_it_and_says_it_has_no_target() -> None:
    decision = decide("auto", None, "inv-1", None, {"testbed"}, explicit=invdiff_manifest())
    assert decision.used == "adaptor" and decision.adaptor_id == "inv-1"
    assert decision.guarantee is None and decision.fit is None
    assert "no fairness_target" in decision.reason
    assert decision.to_dict()["fit"] is None and "guarantee" not in decision.to_dict()


def test_adaptor_id_with_a_target_is_a_conflict() -> None:
    assert adaptor_conflict(invdiff_manifest(), UNIFORM, "p", 20, 5.0)[0] == "adaptor_has_no_target"
    with pytest.raises(StrategyError, match="without a fairness_target"):
        decide("auto", UNIFORM, "inv-1", None, {"testbed"}, explicit=invdiff_manifest())
