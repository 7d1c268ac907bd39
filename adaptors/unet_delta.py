"""Adaptor kind `unet_delta`: a LoRA G on the base UNet served as a second denoiser pass, mixed with ratio r.

InvDiff (Hou et al.) leaves the base model frozen and adds a noise-prediction module G; the
denoiser in effect is (1 - r) * eps_base + r * eps_G. Here G is the base UNet with a LoRA, so the
store, the hot-swap and the cache serve it like any LoRA; what differs is how it is applied: a
forward hook on the UNet runs each call twice (LoRA on, then off) and mixes the two predictions.
No change to the pipeline's loop, so every caller of `adaptors.generation.generate` (CFG batches,
per-image seeds, step callbacks) works unchanged, at about twice the UNet cost.

r = 0 gives the base model's prediction exactly: 1.0 * eps_base + 0.0 * eps_G adds zeros.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from adaptors.lora import LoraAdaptor, switch_adapter
from common.adaptor_manifest import AdaptorManifest

logger = logging.getLogger(__name__)

MIX_RATIO_KEY = "mix_ratio"  # in the manifest's hyperparameters
INSTALLED_ATTR = "_fairdiff_two_pass"  # the mix installed on a UNet, so a new one replaces it


class TwoPassMix:
    """While installed, `unet(...)` returns (1 - r) * unet_without(adapter) + r * unet_with(adapter).

    The adapter must be the one in effect on `unet` when a call starts (the hook computes eps_G from the
    call itself, then the base pass with the adapter's layers switched off, without gradient)."""

    def __init__(self, unet: torch.nn.Module, adapter: str, ratio: float) -> None:
        self.unet, self.adapter, self.ratio = unet, adapter, float(ratio)
        self.layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})]
        self._handle: Any = None
        self._inner = False

    @property
    def installed(self) -> bool:
        return self._handle is not None

    def install(self) -> None:
        """Install on the UNet, replacing any other two-pass mix there (one denoiser pair at a time)."""
        other = getattr(self.unet, INSTALLED_ATTR, None)
        if other is not None and other is not self:
            other.remove()
        if self._handle is None:
            self._handle = self.unet.register_forward_hook(self._hook, with_kwargs=True)
            setattr(self.unet, INSTALLED_ATTR, self)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            if getattr(self.unet, INSTALLED_ATTR, None) is self:
                delattr(self.unet, INSTALLED_ATTR)

    def in_effect(self) -> bool:
        """Whether the adapter is the one the UNet's LoRA layers run (another adaptor may have been switched in)."""
        layer = self.layers[0] if self.layers else None
        return layer is not None and not layer.disable_adapters and self.adapter in layer.active_adapters

    def base_pass(self, args: tuple, kwargs: dict) -> Any:
        """The UNet's output with the adapter's layers off (no gradient: the base model is frozen)."""
        grads = [[p.requires_grad for p in layer.parameters()] for layer in self.layers]
        self._inner = True
        try:
            for layer in self.layers:
                layer.enable_adapters(False)
            with torch.no_grad():
                return self.unet(*args, **kwargs)
        finally:
            for layer, flags in zip(self.layers, grads, strict=True):
                layer.enable_adapters(True)
                for p, flag in zip(layer.parameters(), flags, strict=True):  # enable_adapters marks them trainable
                    p.requires_grad_(flag)
            self._inner = False

    def _hook(self, module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._inner or not self.in_effect():
            return None  # the base pass itself, or another adapter in effect: keep the output as it is
        base = self.base_pass(args, kwargs)
        mixed = mix(_sample(base), _sample(output), self.ratio)
        if isinstance(output, tuple):
            return (mixed, *output[1:])
        return type(output)(sample=mixed)


def mix(eps_base: torch.Tensor, eps_g: torch.Tensor, ratio: float) -> torch.Tensor:
    """(1 - r) * eps_base + r * eps_G, InvDiff's combined prediction."""
    return (1.0 - ratio) * eps_base + ratio * eps_g


def _sample(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


class UnetDeltaAdaptor(LoraAdaptor):
    """A UNet LoRA applied as G in a second pass; its mixing ratio r is in the manifest (`mix_ratio`)."""

    kind: ClassVar[str] = "unet_delta"

    def __init__(self, manifest: AdaptorManifest, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(manifest, tensors)
        if any(not k.startswith("unet.") for k in tensors):
            raise ValueError("a unet_delta adaptor holds UNet LoRA weights only")
        ratio = (manifest.hyperparameters or {}).get(MIX_RATIO_KEY)
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"manifest hyperparameters.{MIX_RATIO_KEY} must be a number between 0 and 1, not {ratio!r}")
        self.ratio = float(ratio)
        self._mixers: dict[int, TwoPassMix] = {}  # per pipeline (by id) it is attached to

    def _mixer(self, pipe) -> TwoPassMix:
        key = id(pipe)
        if key not in self._mixers:
            self._mixers[key] = TwoPassMix(pipe.unet, self.id, self.ratio)
        return self._mixers[key]

    def activate(self, pipe) -> None:
        switch_adapter(pipe, self.id)
        self._mixer(pipe).install()

    def deactivate(self, pipe) -> None:
        mixer = self._mixers.get(id(pipe))
        if mixer is not None:
            mixer.remove()
        switch_adapter(pipe, None)

    def detach(self, pipe) -> None:
        mixer = self._mixers.pop(id(pipe), None)
        if mixer is not None:
            if mixer.installed:
                switch_adapter(pipe, None)
            mixer.remove()
        super().detach(pipe)

    def file_metadata(self) -> dict[str, str]:
        return {"format": "pt", "fairdiff_adaptor": json.dumps({"id": self.id, "kind": self.kind, MIX_RATIO_KEY: self.ratio})}
