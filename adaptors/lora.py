"""LoRA adaptors on the text encoder and/or UNet, in the plain diffusers/PEFT file layout.

`pytorch_lora_weights.safetensors` loads with `pipe.load_lora_weights(folder)` in stock
diffusers. Each adaptor lives in the pipeline as a named PEFT adapter (its id); switching is
`set_adapter` on the LoRA layers, never fusing, so the base weights are never touched.
The PEFT scaling (alpha / r) is folded into lora_B when saving, so every file has scale 1.0 and
needs no alpha metadata to reproduce exactly.
"""

from __future__ import annotations

import json
import logging
from typing import ClassVar

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from adaptors.base import Adaptor
from common.adaptor_manifest import AdaptorManifest

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
COMPONENTS = ("unet", "text_encoder")


def _tuner_layers(model: torch.nn.Module | None) -> list[BaseTunerLayer]:
    if model is None:
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_names(model: torch.nn.Module | None) -> set[str]:
    return set(getattr(model, "peft_config", {}) or {}) if model is not None else set()


def loaded_adapters(pipe) -> dict[str, set[str]]:
    """Adapter names registered per LoRA-capable component of the pipeline."""
    return {c: _adapter_names(getattr(pipe, c, None)) for c in COMPONENTS}


def switch_adapter(pipe, adapter: str | None) -> None:
    """Enable exactly `adapter` on every component that has it and disable LoRA everywhere else."""
    for component in COMPONENTS:
        layers = _tuner_layers(getattr(pipe, component, None))
        if not layers:
            continue
        present = adapter is not None and adapter in _adapter_names(getattr(pipe, component))
        for layer in layers:
            # an embedding LoRA keeps its weights in lora_embedding_A, not lora_A
            if present and (adapter in getattr(layer, "lora_A", {}) or adapter in getattr(layer, "lora_embedding_A", {})):
                layer.enable_adapters(True)
                layer.set_adapter(adapter)
                for p in layer.parameters():  # set_adapter marks the active adapter trainable
                    p.requires_grad_(False)
            else:
                layer.enable_adapters(False)


def active_adapter(pipe) -> str | None:
    """The adapter in effect (as `switch_adapter` leaves it), None when LoRA is off everywhere."""
    for component in COMPONENTS:
        for layer in _tuner_layers(getattr(pipe, component, None)):
            if not layer.disable_adapters and layer.active_adapters:
                return layer.active_adapters[0]
    return None


class LoraAdaptor(Adaptor):
    kind: ClassVar[str] = "lora"
    weights_name: ClassVar[str] = LORA_WEIGHTS_NAME

    def components(self) -> list[str]:
        return sorted({k.split(".", 1)[0] for k in self.tensors})

    def attach(self, pipe) -> None:
        if self.id in set().union(*loaded_adapters(pipe).values()):
            raise ValueError(f"adaptor {self.id!r} is already attached to this pipeline")
        # a copy: diffusers pops and renames keys of the dict it is given
        state = {k: v.to(pipe.device, pipe.unet.dtype) for k, v in self.tensors.items()}
        active = active_adapter(pipe)
        pipe.load_lora_weights(state, adapter_name=self.id)
        switch_adapter(pipe, active)  # attaching does not change what the pipeline generates
        logger.debug("attached LoRA %s (%s)", self.id, ", ".join(self.components()))

    def activate(self, pipe) -> None:
        switch_adapter(pipe, self.id)

    def deactivate(self, pipe) -> None:
        switch_adapter(pipe, None)

    def detach(self, pipe) -> None:
        remove_adapter(pipe, self.id)

    def file_metadata(self) -> dict[str, str]:
        return {"format": "pt", "fairdiff_adaptor": json.dumps({"id": self.id, "kind": self.kind})}


def remove_adapter(pipe, name: str) -> None:
    """Delete adapter `name` from the pipeline, leaving whatever else was in effect as it was."""
    if name not in set().union(*loaded_adapters(pipe).values()):
        return
    active = active_adapter(pipe)
    pipe.delete_adapters([name])
    remaining = set().union(*loaded_adapters(pipe).values())
    if not remaining:
        pipe.unload_lora_weights()  # no adapter left: remove the LoRA wrappers, restoring the base modules
    else:
        # PEFT promotes another adapter when the active one is deleted: put back what was in effect
        switch_adapter(pipe, active if active in remaining else None)


def to_file_layout(component: str, peft_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One component's PEFT keys (`<module>.lora_A.weight`, scale 1) as our weights file stores them.

    The one place that decides the file's key layout, shared by trainers and importers, so every
    LoRA in the store has the layout `pipe.load_lora_weights` reads (what diffusers' own training
    scripts write).
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    return {f"{component}.{k}": v.contiguous() for k, v in convert_state_dict_to_diffusers(peft_sd).items()}


def lora_state_dict(pipe, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The diffusers-layout state dict of PEFT adapter `adapter_name` on the pipeline's UNet and text encoder.

    The layer's scaling is folded into lora_B so that the result loads at scale 1.0 anywhere.
    """
    out: dict[str, torch.Tensor] = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if adapter_name not in _adapter_names(model):
            continue
        peft_sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
        peft_sd = {k: v.detach().clone().float().cpu() for k, v in peft_sd.items()}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_B:
                key = f"{name}.lora_B.weight"
                if key in peft_sd:
                    peft_sd[key] = peft_sd[key] * float(module.scaling[adapter_name])
        out.update(to_file_layout(component, peft_sd))
    if not out:
        raise ValueError(f"the pipeline has no LoRA adapter named {adapter_name!r}")
    return out


def lora_from_pipe(pipe, manifest: AdaptorManifest, adapter_name: str = "default") -> LoraAdaptor:
    """Trainers' exit: wrap the adapter they trained (added with `add_adapter`) as a LoraAdaptor."""
    manifest.kind = LoraAdaptor.kind
    return LoraAdaptor(manifest, lora_state_dict(pipe, adapter_name))
