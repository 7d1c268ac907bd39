"""Base-model profiles: what is specific to a base model, in one record looked up by its name.

Product code asks `get_profile(name)` and never names a particular model. A profile is registered
by name with a factory, so that nothing model-specific is imported until a worker asks for it. The
modules in PROVIDERS register profiles when first asked (the embedded testbed's is
adaptors/testbed_profile.py); a research or deployment module may call `register_profile` too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BaseModelProfile:
    name: str
    # names an adaptor manifest may carry for this model besides `name` (e.g. the pipeline's own id)
    aliases: tuple[str, ...] = ()
    # named prompt sets a finetune may ask for instead of listing prompts, and each training set's held-out partner
    prompt_sets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    held_out_sets: Mapping[str, str] = field(default_factory=dict)
    # a diffusers folder shipped with the code (None: the name itself is a folder or hub id)
    pipeline_path: Path | None = None
    # how class words enter this model's prompts (an adaptors.assign.ClassTexts; None: the generic wording)
    class_texts: Callable[[], Any] | None = None
    # readers this model ships, by the setting that names them (FAIRDIFF_CLASSIFIER / FAIRDIFF_AUDIT_READER);
    # each takes a device and returns an AttributeReader. `steer_reader` is what 'auto' steers with.
    readers: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    steer_reader: str | None = None
    # the subject reader 'auto' uses for the finetune gate: () -> (what it reads, images -> subject per image)
    subject_reader: Callable[[], tuple[str, Callable[[Any], list[str | None]]]] | None = None
    # writes `n` examples (seed) of the data the model was trained on as an image + caption folder, for trainers
    # that learn from training data (invdiff) when the job names none; None: the operator must bring the data
    write_training_data: Callable[[Path, int, int], None] | None = None


_FACTORIES: dict[str, Callable[[], BaseModelProfile]] = {}
_PROFILES: dict[str, BaseModelProfile] = {}
# modules that register profiles, imported by name on first use so this registry depends on none of them
PROVIDERS = ("adaptors.testbed_profile",)
_loaded = False


def _load_providers() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in PROVIDERS:
            importlib.import_module(module)


def register_profile(name: str, factory: Callable[[], BaseModelProfile]) -> None:
    _FACTORIES[name] = factory
    _PROFILES.pop(name, None)


def get_profile(name: str) -> BaseModelProfile | None:
    """The profile registered under `name`; None for a base model with none (a plain diffusers folder or hub id)."""
    _load_providers()
    if name not in _PROFILES and name in _FACTORIES:
        _PROFILES[name] = _FACTORIES[name]()
    return _PROFILES.get(name)


def named_reader(setting: str) -> Callable[[Any], Any] | None:
    """The reader factory some registered profile ships under `setting` (e.g. 'testbed-cnn'), else None."""
    _load_providers()
    for name in list(_FACTORIES):
        profile = get_profile(name)
        if profile is not None and setting in profile.readers:
            return profile.readers[setting]
    return None


def shipped_reader_names() -> list[str]:
    """Every reader name the registered profiles ship, for error messages and help."""
    _load_providers()
    profiles = [get_profile(name) for name in list(_FACTORIES)]
    return sorted({r for profile in profiles if profile is not None for r in profile.readers})
