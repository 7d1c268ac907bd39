"""Hyperparameters of a trainer: a dataclass of defaults that a job's `hyperparameters` overrides.

Jobs arrive as JSON from the admin API, so every override is checked against the field's type
here, once, with an error that names the field; a typo never silently trains with a default.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def parse_hyperparameters(cls: type[T], hp: dict[str, Any], method: str, choices: dict[str, tuple[str, ...]] | None = None) -> T:
    """`cls()` with `hp` applied; ValueError naming `hyperparameters.<key>` on any bad entry."""
    cfg = cls()
    known = sorted(f.name for f in fields(cls))  # type: ignore[arg-type]
    unknown = sorted(set(hp) - set(known))
    if unknown:
        raise ValueError(f"hyperparameters: unknown for method {method!r}: {unknown}; known: {known}")
    for key, value in hp.items():
        default = getattr(cfg, key)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"hyperparameters.{key}: must be true or false")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError(f"hyperparameters.{key}: must be a string")
            allowed = (choices or {}).get(key)
            if allowed and value not in allowed:
                raise ValueError(f"hyperparameters.{key}: must be one of {list(allowed)}, not {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"hyperparameters.{key}: must be a number")
        elif not math.isfinite(value):
            raise ValueError(f"hyperparameters.{key}: must be a finite number")
        elif isinstance(default, int) and float(value) != int(value):
            raise ValueError(f"hyperparameters.{key}: must be an integer")
        setattr(cfg, key, type(default)(value))
    return cfg


def require_positive(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"hyperparameters.{name}: must be >= 1")


def require_unit_interval(cfg: Any, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"hyperparameters.{name}: must be between 0 and 1")


def require_non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ValueError(f"hyperparameters.{name}: must be >= 0")


def require_at_most(cfg: Any, bounds: dict[str, float]) -> None:
    """Each named field is at most its bound (every numeric hyperparameter has one)."""
    for name, bound in bounds.items():
        if getattr(cfg, name) > bound:
            shown = int(bound) if float(bound).is_integer() else bound
            raise ValueError(f"hyperparameters.{name}: must be at most {shown}")
