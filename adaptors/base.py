"""The adaptor interface: every kind applies to and removes from a live pipeline without reloading it.

One file per kind registers itself in `KINDS`; `adaptors.loading.load_adaptor(path)` dispatches on the
manifest's `kind`. Weights are always safetensors next to a manifest.json (see common.adaptor_manifest).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adaptors.generation import PromptEncoder
from common.adaptor_manifest import AdaptorManifest, now_iso, sha256_file

logger = logging.getLogger(__name__)

KINDS: dict[str, type[Adaptor]] = {}


class Adaptor(ABC):
    """A small artefact changing what the base pipeline generates.

    Life cycle on one pipeline: `attach` once (from the in-memory tensors: never a disk read),
    then any number of `activate`/`deactivate` switches, then `detach` to free it.
    """

    kind: ClassVar[str]
    weights_name: ClassVar[str]

    def __init__(self, manifest: AdaptorManifest, tensors: dict[str, torch.Tensor]) -> None:
        if manifest.kind != self.kind:
            raise ValueError(f"manifest kind {manifest.kind!r} given to a {self.kind!r} adaptor")
        self.manifest = manifest
        self.tensors = tensors

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            KINDS[cls.kind] = cls

    @property
    def id(self) -> str:
        return self.manifest.id

    def nbytes(self) -> int:
        """Memory the weights take once attached (what the cache budgets)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @abstractmethod
    def attach(self, pipe) -> None:
        """Register with the pipeline (first use); leaves it inactive or active as the kind needs."""

    @abstractmethod
    def activate(self, pipe) -> None:
        """Make this adaptor the one in effect: cheap, no loading."""

    @abstractmethod
    def deactivate(self, pipe) -> None:
        """Back to the base model's behaviour, keeping the adaptor registered."""

    @abstractmethod
    def detach(self, pipe) -> None:
        """Remove from the pipeline and free what it held there."""

    def prompt_encoder(self, pipe) -> PromptEncoder | None:
        """Embedding-space kinds replace the positive prompt's encoding; weight-space kinds return None."""
        return None

    def application(self, prompt: str) -> dict[str, Any] | None:
        """For kinds that may skip a prompt (a mapping's keyword detector): {applied, reason}; None for the rest."""
        return None

    def save(self, folder: str | Path) -> Path:
        """Write the weights (safetensors) and manifest.json; the manifest's files/size are filled in."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.weights_name
        save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, str(path), self.file_metadata())
        self.manifest.files = {self.weights_name: sha256_file(path)}
        self.manifest.size_bytes = path.stat().st_size
        self.manifest.created = self.manifest.created or now_iso()
        self.manifest.write(folder)
        return folder

    def file_metadata(self) -> dict[str, str] | None:
        """Safetensors header metadata written with the weights (the LoRA kind stores its config here)."""
        return None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Adaptor:
        """Read without integrity checks: the store verifies hashes before calling this."""
        folder = Path(folder)
        manifest = AdaptorManifest.read(folder)
        return cls(manifest, load_tensors(folder / cls.weights_name))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, base_model={self.manifest.base_model!r})"


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"cannot read adaptor weights {str(path)!r}: {exc}") from exc
