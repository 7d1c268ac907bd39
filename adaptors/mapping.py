"""Fair Mapping adaptors (Li et al., arXiv 2311.17695): a small network M after the frozen text encoder.

The positive prompt's text-encoder hidden states h (tokens x dim, what the UNet conditions on)
are replaced by M(h) = h + f(h), f a per-token MLP whose last layer starts at zero, so a fresh map
is the identity. Base weights are never touched: the adaptor is a `PromptEncoder` plugged into
the one batched generation path (adaptors.generation.generate), like soft prefix tokens.

A keyword detector skips the map for a prompt that already names a class of an attribute the map
was trained for (the base model's class words, adaptors.assign.ClassTexts) or any configured
keyword: such a prompt asks for a group explicitly and must get it. Skipped prompts keep the base
model's embedding exactly; `application(prompt)` says for each prompt whether the map applied and why.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from adaptors.assign import ClassTexts
from adaptors.base import Adaptor
from adaptors.generation import PromptEncoder

MAPPING_WEIGHTS_NAME = "mapping.safetensors"


class ResidualMap(nn.Module):
    """h + f(h), f = `depth` linear layers (width `dim`) with GELU between; the last starts at zero."""

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"a mapping needs at least one layer, not {depth}")
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nn.functional.gelu(x)
        return h + x

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ResidualMap:
        depth = len([k for k in tensors if k.endswith(".weight")])
        names = {f"layers.{i}.{p}" for i in range(depth) for p in ("weight", "bias")}
        if depth < 1 or set(tensors) != names:
            raise ValueError(f"mapping tensors must be layers.<i>.weight/bias for i < depth, got {sorted(tensors)}")
        dim = int(tensors["layers.0.weight"].shape[1])
        module = cls(dim, depth)
        module.load_state_dict({k: v.float() for k, v in tensors.items()})
        return module


@dataclass(frozen=True)
class KeywordDetector:
    """Finds the words in a prompt that name a group explicitly (whole words or phrases, case-insensitive)."""

    keywords: tuple[str, ...]

    @classmethod
    def build(cls, texts: ClassTexts, attributes: Iterable[str], extra: Iterable[str] = ()) -> KeywordDetector:
        words = {texts.word(a, c).lower() for a in attributes for c in texts.classes(a)}
        words.update(w.strip().lower() for w in extra if w.strip())
        return cls(tuple(sorted(words)))

    def __post_init__(self) -> None:
        alternatives = "|".join(re.escape(w) for w in sorted(self.keywords, key=len, reverse=True))
        object.__setattr__(self, "_pattern", re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.I) if alternatives else None)

    def find(self, prompt: str) -> list[str]:
        pattern = self.__dict__["_pattern"]
        return sorted({m.group(0).lower() for m in pattern.finditer(prompt)}) if pattern is not None else []


class MappingAdaptor(Adaptor):
    """Tensors `layers.<i>.weight/bias` of the ResidualMap; the manifest's hyperparameters carry the detector's words."""

    kind: ClassVar[str] = "mapping"
    weights_name: ClassVar[str] = MAPPING_WEIGHTS_NAME

    def __init__(self, manifest, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(manifest, tensors)
        try:
            self.module = ResidualMap.from_tensors(tensors).eval().requires_grad_(False)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"mapping adaptor {manifest.id!r}: {exc}") from exc
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise ValueError(f"mapping adaptor {manifest.id!r}: weights must be finite")
        hp = manifest.hyperparameters or {}
        self.detector = KeywordDetector(tuple(hp.get("detector_keywords", ())))
        self._device_module: nn.Module | None = None

    @classmethod
    def build(cls, manifest, module: ResidualMap, detector: KeywordDetector) -> MappingAdaptor:
        """From a trained map; fills the manifest fields the adaptor reads back."""
        manifest.kind = cls.kind
        manifest.hyperparameters = {**(manifest.hyperparameters or {}), "detector_keywords": list(detector.keywords)}
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
        return cls(manifest, tensors)

    def application(self, prompt: str) -> dict[str, Any]:
        """Whether the map applies to `prompt`, and why not when it does not."""
        found = self.detector.find(prompt)
        if found:
            return {"applied": False, "reason": f"the prompt names {', '.join(repr(w) for w in found)}: the map is skipped"}
        return {"applied": True, "reason": "the prompt names no group: its embedding is mapped"}

    def attach(self, pipe) -> None:
        dim = pipe.text_encoder.config.hidden_size
        width = int(self.tensors["layers.0.weight"].shape[1])
        if width != dim:
            raise ValueError(f"mapping adaptor {self.id!r} has width {width}, the text encoder {dim}")
        self._device_module = self.module.to(pipe.text_encoder.device, pipe.text_encoder.dtype)

    def activate(self, pipe) -> None:
        """Nothing to switch in the pipeline: the prompt encoder carries the map."""

    def deactivate(self, pipe) -> None:
        """The base weights were never touched."""

    def detach(self, pipe) -> None:
        self._device_module = None

    def prompt_encoder(self, pipe) -> PromptEncoder:
        module = self._device_module if self._device_module is not None else self.module
        return make_mapping_encoder(pipe, module, self.detector)


def base_embeddings(pipe, prompts: list[str]) -> torch.Tensor:
    """The base model's positive-prompt hidden states, exactly as the pipeline computes them."""
    return pipe.encode_prompt(list(prompts), pipe.device, 1, False)[0]


def make_mapping_encoder(pipe, module: nn.Module, detector: KeywordDetector) -> PromptEncoder:
    """A PromptEncoder mapping every prompt the detector passes; the others keep the base embedding."""

    def encode(prompts: list[str]) -> torch.Tensor:
        h = base_embeddings(pipe, prompts)
        keep = [i for i, p in enumerate(prompts) if not detector.find(p)]
        if not keep:
            return h
        out = h.clone()
        out[keep] = module(h[keep].to(next(module.parameters()).dtype)).to(h.dtype)
        return out

    return encode
