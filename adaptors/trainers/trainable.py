"""What a finetune trains, behind one interface: LoRA (text encoder, UNet or both) or prefix tokens.

The trainer only needs the parameters, a way to encode prompts with them, a way to run the
frozen base model (the semantics reference and the "before" numbers), and a way to turn the
final (EMA) weights into an adaptor and leave the shared pipeline as it found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from adaptors.base import Adaptor
from adaptors.generation import PromptEncoder
from adaptors.lora import LoraAdaptor, lora_state_dict, remove_adapter
from adaptors.prefix import PREFIX_KEY, PrefixAdaptor, init_prefix, make_prompt_encoder
from common.adaptor_manifest import AdaptorManifest

TRAIN_ADAPTER = "fairdiff-training"
TEXT_ENCODER_MODULES: dict[str, list[str] | str] = {
    "attention_mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
# "cross_attention_kv": only the projections that read the text (a PEFT regex, matched in full); a low-rank
# edit there can remove a direction of the text embedding for every prompt at once, as closed-form concept
# editing does, instead of learning a change per training prompt
UNET_MODULES: dict[str, list[str] | str] = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "cross_attention_kv": r".*attn2\.(to_k|to_v)",
}


class Trainable:
    params: list[torch.nn.Parameter]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Hidden states of the positive prompts with the trained weights (differentiable)."""
        raise NotImplementedError

    def encode_negative(self, prompts: list[str]) -> torch.Tensor:
        """The unconditional branch, encoded as inference will encode it."""
        raise NotImplementedError

    def prompt_encoder(self) -> PromptEncoder | None:
        """What `generate` needs to sample with the trained weights (None: the pipeline already has them)."""
        return None

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The base model, for as long as the block runs."""
        yield

    def export(self, manifest: AdaptorManifest) -> Adaptor:
        raise NotImplementedError

    def remove(self) -> None:
        """Leave the pipeline as it was before training."""


def _encode(pipe, prompts: list[str]) -> torch.Tensor:
    return pipe.encode_prompt(list(prompts), pipe.device, 1, False)[0]


class LoraTrainable(Trainable):
    """PEFT LoRA on the chosen components; Shen et al.'s init (A ~ N(0, 1/r), B = 0) and scale 1."""

    def __init__(
        self, pipe, where: str, rank: int, seed: int, text_modules: str = "attention_mlp", unet_modules: str = "attention"
    ) -> None:
        self.pipe = pipe
        self.components = {"text_encoder": ["text_encoder"], "unet": ["unet"], "both": ["text_encoder", "unet"]}[where]
        with torch.random.fork_rng(devices=[]):  # a seeded init, so a job is reproducible
            torch.manual_seed(seed)
            for component in self.components:
                modules = TEXT_ENCODER_MODULES[text_modules] if component == "text_encoder" else UNET_MODULES[unet_modules]
                config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=modules)
                getattr(pipe, component).add_adapter(config, adapter_name=TRAIN_ADAPTER)
        self.params = [p for c in self.components for n, p in getattr(pipe, c).named_parameters() if TRAIN_ADAPTER in n]
        for p in self.params:
            p.requires_grad_(True)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return _encode(self.pipe, prompts)

    def encode_negative(self, prompts: list[str]) -> torch.Tensor:
        return _encode(self.pipe, prompts)

    def _layers(self) -> list[BaseTunerLayer]:
        return [m for c in self.components for m in getattr(self.pipe, c).modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        layers = self._layers()
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            for p in self.params:
                p.requires_grad_(True)

    def export(self, manifest: AdaptorManifest) -> Adaptor:
        manifest.kind = LoraAdaptor.kind
        return LoraAdaptor(manifest, lora_state_dict(self.pipe, TRAIN_ADAPTER))

    def remove(self) -> None:
        remove_adapter(self.pipe, TRAIN_ADAPTER)


class PrefixTrainable(Trainable):
    """K soft tokens after BOS of the positive prompt; the negative prompt stays the plain "" encoding."""

    def __init__(self, pipe, num_tokens: int, seed: int, init_scale: float) -> None:
        self.pipe = pipe
        prefix = init_prefix(pipe, num_tokens, seed, init_scale).to(pipe.device)
        self.params = [torch.nn.Parameter(prefix)]
        self._encoder = make_prompt_encoder(pipe, self.params[0])

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self._encoder(list(prompts))

    def encode_negative(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return _encode(self.pipe, prompts)

    def prompt_encoder(self) -> PromptEncoder:
        return self._encoder

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        saved, self._encoder = self._encoder, (lambda prompts: _encode(self.pipe, list(prompts)))
        try:
            yield
        finally:
            self._encoder = saved

    def export(self, manifest: AdaptorManifest) -> Adaptor:
        manifest.kind = PrefixAdaptor.kind
        return PrefixAdaptor(manifest, {PREFIX_KEY: self.params[0].detach().float().cpu().clone()})


def make_trainable(
    pipe,
    train: str,
    rank: int,
    num_tokens: int,
    seed: int,
    init_scale: float,
    text_modules: str = "attention_mlp",
    unet_modules: str = "attention",
) -> Trainable:
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    if train == "prefix":
        return PrefixTrainable(pipe, num_tokens, seed, init_scale)
    return LoraTrainable(pipe, train, rank, seed, text_modules, unet_modules)
