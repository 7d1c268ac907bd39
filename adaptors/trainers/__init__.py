"""Fairness finetuning methods, by name: config (a FinetuneJob) in, adaptor folder out.

Every trainer has the same signature (adaptors.trainers.registry.TrainerFn) so the training worker
runs any of them alike. Importing this package registers the built-in methods: `dft` and `prefix`
(adaptors.trainers.dft) `ida` (adaptors.trainers.ida), `fair_mapping` (adaptors.trainers.fair_mapping), `gmm`
(adaptors.trainers.gmm) and `invdiff` (adaptors.trainers.invdiff).
"""

from __future__ import annotations

from adaptors.trainers import dft, fair_mapping, gmm, ida, invdiff  # noqa: F401  (each registers its methods in TRAINERS)
from adaptors.trainers.registry import TRAINERS, TrainerFn, registered_trainer


def get_trainer(method: str) -> TrainerFn:
    """The trainer of a finetune `method`; KeyError naming the known ones."""
    return registered_trainer(method)


__all__ = ["TRAINERS", "TrainerFn", "get_trainer"]
