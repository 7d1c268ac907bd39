"""Whether a finetune kept what its images show: the gate every published fairness adaptor passes.

A finetune that debiases by changing the subject (a nurse's images that stop showing a nurse) has
not debiased anything, however good its bias figure: Shen et al. guard against it with their
preservation losses, and a demanding operator wants it refused outright. The gate compares each
evaluation image with the base model's image from the same noise, as read by a reader that names
the image's subject independently of the attribute classifier the finetune trained against.

On the testbed the oracle reads the occupation from the background and shirt, the cues no attribute
lives in. A real Stable Diffusion reads it with CLIP prompt retrieval (FAIRDIFF_SUBJECT_READER names a
local CLIP folder): an image's subject is the evaluation prompt it is closest to. The preservation
features are no substitute: the testbed classifier's trunk is trained to see attributes and tells
occupations apart in a third of images, so a base model without a reader is reported as not gated
rather than gated by a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from adaptors.fairness_gain import FinetuneRefused
from common.settings import get_settings

SubjectReader = Callable[[torch.Tensor], list[str | None]]


class SubjectLost(FinetuneRefused):
    """The finetuned images lost their subject in more images than the job allows; nothing is published."""

    error_type = "subject_lost"

    def __init__(self, kept: dict, minimum: float, bias: dict | None = None) -> None:
        self.kept, self.minimum, self.bias = kept, minimum, bias or {}
        worst = min(kept["per_prompt"].items(), key=lambda item: item[1])
        super().__init__(
            f"the finetuned model kept the subject ({kept['reader']}) in {kept['share']:.0%} of evaluation images, "
            f"below min_subject_kept {minimum:.0%} (worst prompt {worst[0]!r}: {worst[1]:.0%}); nothing was published"
        )

    def error(self) -> dict:
        return {**super().error(), "subject_kept": self.kept, "bias": self.bias}


def subject_reader(
    base_model: str, prompts: Sequence[str] | None = None, setting: str | None = None
) -> tuple[str, SubjectReader] | None:
    """(what it reads, the reader) for this base model, or None where none exists.

    `setting` (default FAIRDIFF_SUBJECT_READER): 'auto', 'none', 'testbed-clip' or a CLIP folder; a CLIP
    reader retrieves among `prompts` (at least two distinct prompts, else there is nothing to choose among)."""
    setting = get_settings().subject_reader if setting is None else setting
    if setting == "none":
        return None
    if setting != "auto":
        if not prompts or len(set(prompts)) < 2:
            return None
        from adaptors.readers.clip import ClipEncoder, ClipSubjectReader
        from adaptors.readers.registry import shipped_clip_dir

        clip = ClipEncoder(shipped_clip_dir(setting) or setting)
        clip_reader = ClipSubjectReader(clip, prompts)
        return clip_reader.name, clip_reader.read
    from adaptors.profiles import get_profile

    profile = get_profile(base_model)
    return profile.subject_reader() if profile is not None and profile.subject_reader is not None else None


def subject_kept(reader: tuple[str, SubjectReader], before: torch.Tensor, after: torch.Tensor, prompts: list[str]) -> dict:
    """The share of images (each prompt's block of `before`/`after`, same noise) whose subject is the base image's.

    An image whose base image has no readable subject says nothing about the finetune and is left out; a
    finetuned image with none where the base had one counts as lost."""
    name, read = reader
    base, tuned = read(before), read(after)
    per = len(base) // len(prompts)
    per_prompt, counted, same = {}, 0, 0
    for j, prompt in enumerate(prompts):
        pairs = [(b, t) for b, t in zip(base[j * per : (j + 1) * per], tuned[j * per : (j + 1) * per], strict=True) if b]
        kept = sum(b == t for b, t in pairs)
        per_prompt[prompt] = round(kept / len(pairs), 4) if pairs else 1.0
        counted, same = counted + len(pairs), same + kept
    return {
        "reader": name,
        "share": round(same / counted, 4) if counted else 1.0,
        "per_prompt": per_prompt,
        "images": counted,
        "min_prompt": min(per_prompt.values()),
    }


def require_subject_kept(kept: dict | None, minimum: float, bias: dict | None = None) -> None:
    """Raise SubjectLost when a measured share falls below `minimum` (0: the gate is off); `bias` (before and
    after) travels with it so the failed job still says what the finetune did."""
    if kept is not None and minimum > 0 and kept["share"] < minimum:
        raise SubjectLost(kept, minimum, bias)
