"""Base-model profiles: what is specific to a base model, in one record looked up by its name.

Product code asks `get_profile(name)` and never names a particular model. A profile is registered
by name with a factory, so that nothing model-specific is imported until a worker asks for it; the
embedded testbed registers itself below, and a research or deployment module may register more.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BaseModelProfile:
    name: str
    # names an adaptor manifest may carry for this model besides `name` (e.g. the pipeline's own id)
    aliases: tuple[str, ...] = ()
    # named prompt sets a finetune may ask for instead of listing prompts, and each training set's held-out partner
    prompt_sets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    held_out_sets: Mapping[str, str] = field(default_factory=dict)
    # writes `n` examples (seed) of the data the model was trained on as an image + caption folder, for trainers
    # that learn from training data (invdiff) when the job names none; None: the operator must bring the data
    write_training_data: Callable[[Path, int, int], None] | None = None


_FACTORIES: dict[str, Callable[[], BaseModelProfile]] = {}
_PROFILES: dict[str, BaseModelProfile] = {}


def register_profile(name: str, factory: Callable[[], BaseModelProfile]) -> None:
    _FACTORIES[name] = factory
    _PROFILES.pop(name, None)


def get_profile(name: str) -> BaseModelProfile | None:
    """The profile registered under `name`; None for a base model with none (a plain diffusers folder or hub id)."""
    if name not in _PROFILES and name in _FACTORIES:
        _PROFILES[name] = _FACTORIES[name]()
    return _PROFILES.get(name)


def _testbed_profile() -> BaseModelProfile:
    import testbed
    from testbed import world
    from testbed.data import write_caption_folder

    return BaseModelProfile(
        name=testbed.BASE_MODEL_NAME,
        aliases=(testbed.BASE_MODEL_ID,),
        prompt_sets={name: tuple(world.prompt_set(name) or ()) for name in world.PROMPT_SETS},
        held_out_sets=dict(world.HELD_OUT_SET),
        write_training_data=write_caption_folder,
    )


register_profile("testbed", _testbed_profile)
