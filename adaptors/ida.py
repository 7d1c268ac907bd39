"""IDA adaptors: calibrated per-group guidance weights (He et al., "Debiasing Text-to-Image Diffusion Models").

At each denoising step every image's noise prediction moves by sum_k w_k (eps(prompt + group k) -
eps(prompt)), through the same batched primitive as `assign` (adaptors.assign.generate_directed).
The weights are the only parameters: one vector per attribute and calibrated prompt, found by
the `ida` trainer for one sampler setting (steps, CFG scale, warm-up), which the manifest records
so the `guidance` strategy applies a calibration only where it holds. Unlike He et al.'s
negative (away-from-group) form, a positive weight here pulls towards its group; the two are
the same family with the sign flipped. No pipeline state changes, so attaching is free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from adaptors.assign import ClassTexts, Direction, augment_prompt
from adaptors.base import Adaptor

IDA_WEIGHTS_NAME = "ida.safetensors"
WEIGHTS_KEY = "weights"


@dataclass(frozen=True)
class GuidanceDirections:
    """What the inference worker passes to generate_directed for every image of a guidance request."""

    rows: list[Direction]
    warmup_steps: int


def ida_directions(prompt: str, weights: dict[str, dict[str, float]], texts: ClassTexts) -> list[Direction]:
    """The per-image directions of one prompt's calibrated weights."""
    return [(augment_prompt(prompt, {attr: cls}, texts), w) for attr, ws in weights.items() for cls, w in ws.items()]


class IdaAdaptor(Adaptor):
    """Tensor `weights` [prompts x sum of classes]; the manifest's hyperparameters name both axes."""

    kind: ClassVar[str] = "ida"
    weights_name: ClassVar[str] = IDA_WEIGHTS_NAME

    def __init__(self, manifest, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(manifest, tensors)
        hp = manifest.hyperparameters or {}
        self.prompts: list[str] = list(hp.get("prompts", []))
        self.classes: dict[str, list[str]] = {a: list(c) for a, c in (hp.get("classes") or {}).items()}
        width = sum(len(c) for c in self.classes.values())
        w = tensors.get(WEIGHTS_KEY)
        if set(tensors) != {WEIGHTS_KEY} or w is None or tuple(w.shape) != (len(self.prompts), width) or not self.prompts:
            raise ValueError(f"ida adaptor {manifest.id!r}: needs one tensor {WEIGHTS_KEY!r} of shape "
                             f"[{len(self.prompts)} prompts, {width} classes]")  # fmt: skip
        if not torch.isfinite(w).all():
            raise ValueError(f"ida adaptor {manifest.id!r}: weights must be finite")
        self.class_texts = ClassTexts.from_dict(hp["class_texts"])
        self.warmup_steps = int((manifest.sampler or {}).get("warmup_steps", 0))

    @classmethod
    def build(cls, manifest, prompts: list[str], weights: list[dict[str, dict[str, float]]], texts: ClassTexts) -> IdaAdaptor:
        """From per-prompt weights; fills the manifest fields the adaptor reads back."""
        classes = {a: list(ws) for a, ws in weights[0].items()}
        manifest.kind = cls.kind
        manifest.hyperparameters = {**(manifest.hyperparameters or {}), "prompts": list(prompts), "classes": classes,
                                    "class_texts": _texts_dict(texts)}  # fmt: skip
        rows = [[w[a][c] for a in classes for c in classes[a]] for w in weights]
        return cls(manifest, {WEIGHTS_KEY: torch.tensor(rows, dtype=torch.float32)})

    def weights_for(self, prompt: str) -> dict[str, dict[str, float]] | None:
        """The calibrated weights of `prompt`, None when it was not calibrated."""
        if prompt not in self.prompts:
            return None
        row = self.tensors[WEIGHTS_KEY][self.prompts.index(prompt)].tolist()
        out, k = {}, 0
        for attr, names in self.classes.items():
            out[attr] = {c: round(row[k + i], 6) for i, c in enumerate(names)}
            k += len(names)
        return out

    def directions(self, prompt: str) -> list[Direction] | None:
        weights = self.weights_for(prompt)
        return None if weights is None else ida_directions(prompt, weights, self.class_texts)

    def attach(self, pipe) -> None:
        """Nothing to load: the weights act at generation time."""

    def activate(self, pipe) -> None:
        """Nothing to switch."""

    def deactivate(self, pipe) -> None:
        """Nothing to switch."""

    def detach(self, pipe) -> None:
        """Nothing to free."""


def _texts_dict(texts: ClassTexts) -> dict[str, Any]:
    data = asdict(texts)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
