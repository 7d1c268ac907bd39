"""Soft prefix tokens: K learned input embeddings inserted right after BOS of the positive prompt.

In the style of Shen et al.'s soft-prompt finetuning: the base weights are never changed; the
adaptor only replaces how the positive prompt is encoded (a `PromptEncoder` plugged into
`adaptors.generation.generate`). The encoder runs the frozen CLIP text model on input
embeddings, so it is differentiable in the prefix vectors and trainers optimise them directly.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from transformers.masking_utils import create_causal_mask

from adaptors.base import Adaptor
from adaptors.generation import PromptEncoder

logger = logging.getLogger(__name__)

PREFIX_WEIGHTS_NAME = "prefix.safetensors"
PREFIX_KEY = "prefix"
DEFAULT_NUM_TOKENS = 5


def tokenize_for_prefix(pipe, prompts: list[str], num_tokens: int) -> torch.Tensor:
    """Token ids of length model_max_length - K (BOS ... EOS, pad), so the result keeps the usual length."""
    tokenizer = pipe.tokenizer
    length = tokenizer.model_max_length - num_tokens
    if length < 2:
        raise ValueError(f"{num_tokens} prefix tokens leave no room in a {tokenizer.model_max_length}-token prompt")
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def encode_with_prefix(text_encoder, input_ids: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """The text encoder's last hidden state (what SD conditions on) with `prefix` (K x dim) after BOS.

    Mirrors CLIPTextModel.forward (token + position embeddings, causal mask, encoder, final layer
    norm) but on input embeddings; with no prefix it equals `text_encoder(input_ids)[0]`.
    """
    ids = input_ids.to(text_encoder.device)
    embeds = text_encoder.embeddings.token_embedding(ids)
    if prefix is not None and prefix.shape[0] > 0:
        soft = prefix.to(embeds.device, embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        embeds = torch.cat([embeds[:, :1], soft, embeds[:, 1:]], dim=1)
    return encode_embeddings(text_encoder, embeds)


def encode_embeddings(text_encoder, embeds: torch.Tensor) -> torch.Tensor:
    """The last hidden state from token embeddings (B x L x dim) instead of ids: position embeddings added here."""
    hidden = text_encoder.embeddings(inputs_embeds=embeds)
    mask = create_causal_mask(config=text_encoder.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None)
    out = text_encoder.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
    return text_encoder.final_layer_norm(out.last_hidden_state)


def make_prompt_encoder(pipe, prefix: torch.Tensor) -> PromptEncoder:
    """A PromptEncoder closing over `prefix`; differentiable when `prefix` requires grad."""
    num_tokens = int(prefix.shape[0])

    def encode(prompts: list[str]) -> torch.Tensor:
        ids = tokenize_for_prefix(pipe, list(prompts), num_tokens)
        return encode_with_prefix(pipe.text_encoder, ids, prefix)

    return encode


def init_prefix(pipe, num_tokens: int = DEFAULT_NUM_TOKENS, seed: int = 0, scale: float = 0.1) -> torch.Tensor:
    """Start vectors: the mean token embedding plus small seeded noise (near the embedding manifold)."""
    table = pipe.text_encoder.embeddings.token_embedding.weight.detach().float().cpu()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_tokens, table.shape[1], generator=g) * table.std() * scale
    return table.mean(0, keepdim=True) + noise


class PrefixAdaptor(Adaptor):
    kind: ClassVar[str] = "prefix_tokens"
    weights_name: ClassVar[str] = PREFIX_WEIGHTS_NAME

    def __init__(self, manifest, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(manifest, tensors)
        if set(tensors) != {PREFIX_KEY} or tensors[PREFIX_KEY].ndim != 2:
            raise ValueError(f"prefix adaptor {manifest.id!r} needs exactly one 2-D tensor named {PREFIX_KEY!r}")
        self._device_prefix: torch.Tensor | None = None

    @property
    def prefix(self) -> torch.Tensor:
        return self.tensors[PREFIX_KEY]

    @property
    def num_tokens(self) -> int:
        return int(self.prefix.shape[0])

    def attach(self, pipe) -> None:
        dim = pipe.text_encoder.config.hidden_size
        if self.prefix.shape[1] != dim:
            raise ValueError(f"prefix adaptor {self.id!r} has width {self.prefix.shape[1]}, the text encoder {dim}")
        self._device_prefix = self.prefix.to(pipe.text_encoder.device, pipe.text_encoder.dtype)

    def activate(self, pipe) -> None:
        """Nothing to switch in the pipeline: the prompt encoder carries the prefix."""

    def deactivate(self, pipe) -> None:
        """The base weights were never touched."""

    def detach(self, pipe) -> None:
        self._device_prefix = None

    def prompt_encoder(self, pipe) -> PromptEncoder:
        prefix = self._device_prefix if self._device_prefix is not None else self.prefix
        return make_prompt_encoder(pipe, prefix)
