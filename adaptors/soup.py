"""The mean of several LoRA adaptors' weight changes (a "soup"), written as one exact LoRA.

Why: on the shared-axis testbed, every seed of one DFT recipe fits the training prompts about as
well as the others, but how far each carries over to occupations it never saw depends on the
seed. What the seeds agree on is what the training prompts determine; what each adds on its own
is noise, as far as unseen prompts are concerned. Averaging the changes keeps the first and
shrinks the second by about the square root of the number of seeds.

Averaging the factors A and B separately would not average the changes (the mean of products is
not the product of means), so the soup stacks them: for N adaptors of rank r on one layer, the mean
change (1/N) sum B_i A_i equals [B_1 ... B_N] / N times [A_1; ...; A_N], a rank N*r LoRA. The file
stays in the layout `pipe.load_lora_weights` reads, at scale 1, so stock diffusers loads it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adaptors.lora import LoraAdaptor
from common.adaptor_manifest import AdaptorManifest

# (down, up) key endings of one layer's factors in the file layouts diffusers writes: down is [r, in], up [out, r]
FACTOR_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
)


def _layer_factors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Layer prefix -> (down key, up key); ValueError for a key that is not one half of a pair."""
    layers: dict[str, tuple[str, str]] = {}
    for key in tensors:
        for down, up in FACTOR_SUFFIXES:
            if key.endswith(down) and key[: -len(down)] + up in tensors:
                layers[key[: -len(down)]] = (key, key[: -len(down)] + up)
                break
    paired = {k for pair in layers.values() for k in pair}
    unpaired = sorted(set(tensors) - paired)
    if unpaired:
        raise ValueError(f"LoRA tensors without a down/up partner: {unpaired[:3]}")
    return layers


def average_loras(adaptors: Sequence[LoraAdaptor], manifest: AdaptorManifest) -> LoraAdaptor:
    """One LoRA whose change to every layer is the mean of the adaptors' changes (see the module docstring).

    The adaptors must be for the same base model and train the same layers; `manifest` describes
    the result (its kind is set here)."""
    if len(adaptors) < 2:
        raise ValueError("a soup needs at least two adaptors")
    bases = {a.manifest.base_model for a in adaptors}
    if len(bases) > 1:
        raise ValueError(f"adaptors for different base models cannot be averaged: {sorted(bases)}")
    layers = [_layer_factors(a.tensors) for a in adaptors]
    if any(set(lay) != set(layers[0]) for lay in layers[1:]):
        raise ValueError("adaptors train different layers; a soup needs the same layers in each")
    n = len(adaptors)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, (down_key, up_key) in layers[0].items():
        downs = [a.tensors[lay[prefix][0]].float() for a, lay in zip(adaptors, layers, strict=True)]
        ups = [a.tensors[lay[prefix][1]].float() for a, lay in zip(adaptors, layers, strict=True)]
        tensors[down_key] = torch.cat(downs, dim=0).contiguous()
        tensors[up_key] = (torch.cat(ups, dim=1) / n).contiguous()
    manifest.kind = LoraAdaptor.kind
    return LoraAdaptor(manifest, tensors)
