"""The one list of error codes a failed job can carry, and the shape it is stored in.

HTTP errors and failed jobs share one shape, `{message, type, param, code}` (service/errors.py): `code`
names what went wrong and is what a client branches on; `type` is its category, the same word an HTTP
error of that kind carries (a job refused for a conflict is `conflict_error`, as a 409 is). Workers
record failures with a code (and details beside it); `job_error` gives them the shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

JOB_ERROR_TYPES: dict[str, str] = {
    # the request, re-checked by the worker
    "invalid_request": "invalid_request_error",
    "base_model_mismatch": "invalid_request_error",
    # conflicts with what the store holds (a 409 at the gateway)
    "strategy_conflict": "conflict_error",
    "no_matching_adaptor": "conflict_error",
    "no_calibration": "conflict_error",
    "adaptor_target_mismatch": "conflict_error",
    "adaptor_has_no_target": "conflict_error",
    "adaptor_prompt_mismatch": "conflict_error",
    "adaptor_sampler_mismatch": "conflict_error",
    "adaptor_base_mismatch": "conflict_error",
    "uncovered_class": "conflict_error",
    "adaptor_not_found": "not_found_error",
    # the adaptor's files or this worker
    "adaptor_integrity_error": "adaptor_error",
    "adaptor_unavailable": "service_unavailable",
    "not_available": "service_unavailable",
    "not_implemented": "service_unavailable",
    "broker": "service_unavailable",
    # fairness: what was delivered or trained did not meet what the job asked
    "enforcement_incomplete": "fairness_error",
    "no_fairness_gain": "fairness_error",
    "subject_lost": "fairness_error",
    "no_component": "fairness_error",
    "internal_error": "internal_error",
}


def job_error(error: Mapping[str, Any]) -> dict[str, Any]:
    """`error` ({code or type, message, details...}) in the shape HTTP errors have: message, type, param, code first.

    A worker may name the code as `type` (short and old form); the category then comes from JOB_ERROR_TYPES."""
    code = str(error.get("code") or error.get("type") or "internal_error")
    body = {"message": str(error.get("message", "")), "type": JOB_ERROR_TYPES.get(code, "job_error"),
            "param": error.get("param"), "code": code}  # fmt: skip
    return {**body, **{k: v for k, v in error.items() if k not in body}}
