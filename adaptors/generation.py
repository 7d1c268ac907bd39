"""The generation core: load a base pipeline, pick device and dtype, generate with per-image seeds.

Every caller (CLI, inference worker, trainers, benchmarks) generates through here so that
"image i of a request with seed s" means the same pixels everywhere, whatever the batch size,
chunking or which other images share the batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from common.settings import TESTBED

logger = logging.getLogger(__name__)

PromptEncoder = Callable[[list[str]], torch.Tensor]
"""Maps prompts to text-encoder hidden states (N x tokens x dim), replacing the default encoding."""

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, steps total) across all chunks."""


class GenerationCancelled(Exception):
    """Raised from a step callback to stop a generation between steps."""


def resolve_device(preference: str = "auto") -> tuple[torch.device, torch.dtype]:
    """cuda with fp16 when there is a GPU (or one is asked for), otherwise cpu with fp32."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(preference)
    return device, (torch.float16 if device.type == "cuda" else torch.float32)


def configure_threads(threads: int = 0) -> int:
    """Set torch's CPU threads; 0 picks half the cores (1 to 4).

    Several busy processes each running as many threads as cores make every tiny op wait on
    preempted threads (measured here: a 2-step testbed generation took 5-9 s with 2 threads on a
    loaded 2-core machine, 0.1 s with 1), so workers never take every core by default.
    """
    if threads <= 0:
        threads = max(1, min(4, (os.cpu_count() or 2) // 2))
    torch.set_num_threads(threads)
    return threads


def resolve_model_path(model: str) -> str:
    """A profile's shipped pipeline folder where it has one; anything else is a local folder or a hub id."""
    from adaptors.profiles import get_profile

    profile = get_profile(model)
    return str(profile.pipeline_path) if profile is not None and profile.pipeline_path is not None else model


def load_pipeline(model: str = TESTBED, device: str = "auto", offline: bool = True) -> StableDiffusionPipeline:
    """Load a StableDiffusionPipeline once; a hub id is only read from the local cache when offline."""
    path = resolve_model_path(model)
    is_local = Path(path).is_dir()
    dev, dtype = resolve_device(device)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path,
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=is_local or offline,
        )
    except (OSError, ValueError) as exc:
        hint = "" if is_local else " (offline: a hub id must already be in the local Hugging Face cache)"
        raise FileNotFoundError(f"cannot load base model {model!r} from {path!r}{hint}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded base model %s on %s (%s)", model, dev, dtype)
    return pipe.to(dev)


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a request with `seed`; no two (seed, index) pairs collide simply."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def initial_latents(pipe: StableDiffusionPipeline, seed: int, indices: Sequence[int], height: int, width: int) -> torch.Tensor:
    """Starting noise for the given image indices, drawn on the CPU so every device agrees."""
    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, i))) for i in indices]
    return torch.stack(rows).to(pipe.device, pipe.unet.dtype)


def default_size(pipe: StableDiffusionPipeline) -> int:
    return int(pipe.unet.config.sample_size) * pipe.vae_scale_factor


@dataclass
class GenerationSpec:
    """One request's sampling settings; `prompts` may give each image its own prompt."""

    prompt: str
    num_images: int = 1
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 5.0
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    prompts: list[str] | None = None
    start_index: int = 0

    def prompt_list(self) -> list[str]:
        if self.prompts is not None:
            if len(self.prompts) != self.num_images:
                raise ValueError(f"prompts has {len(self.prompts)} entries for num_images={self.num_images}")
            return list(self.prompts)
        return [self.prompt] * self.num_images


def generate(
    pipe: StableDiffusionPipeline,
    spec: GenerationSpec,
    max_batch: int = 16,
    on_step: StepCallback | None = None,
    encode_prompt: PromptEncoder | None = None,
) -> torch.Tensor:
    """Images in [0, 1] as an N x 3 x H x W float tensor on the CPU.

    Runs in chunks of `max_batch`; `on_step` may raise GenerationCancelled to stop between steps.
    `encode_prompt` replaces the text encoder's embedding of the (positive) prompts: adaptors
    that work in embedding space (prefix tokens) plug in here without touching base weights.
    """
    height = spec.height or default_size(pipe)
    width = spec.width or default_size(pipe)
    prompts = spec.prompt_list()
    chunks = [range(i, min(i + max_batch, spec.num_images)) for i in range(0, spec.num_images, max_batch)]
    total = spec.steps * len(chunks)
    outputs: list[torch.Tensor] = []
    for c, chunk in enumerate(chunks):
        done_before = c * spec.steps

        def _callback(_pipe, step: int, _t, kwargs: dict, _base: int = done_before) -> dict:
            if on_step is not None:
                on_step(_base + step + 1, total)
            return kwargs

        latents = initial_latents(pipe, spec.seed, [spec.start_index + i for i in chunk], height, width)
        chunk_prompts = [prompts[i] for i in chunk]
        negative = [spec.negative_prompt or ""] * len(chunk)
        with torch.inference_mode():
            if encode_prompt is not None:
                text = {
                    "prompt_embeds": encode_prompt(chunk_prompts),
                    "negative_prompt_embeds": pipe.encode_prompt(negative, pipe.device, 1, False)[0],
                }
            else:
                text = {"prompt": chunk_prompts, "negative_prompt": negative if spec.negative_prompt else None}
            out = pipe(
                **text,
                height=height,
                width=width,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                latents=latents,
                output_type="pt",
                callback_on_step_end=_callback,
            ).images
        outputs.append(out.float().cpu())
    return torch.cat(outputs)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N x 3 x H x W in [0, 1] to N x H x W x 3 uint8 for PNGs."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
