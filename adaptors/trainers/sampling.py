"""Sampling that is differentiable in the trained weights: the core of direct finetuning.

Following Shen et al.'s adjusted DFT: every step of the chain is differentiated, but the
denoiser sees its latent input detached, so gradients reach the weights only through each
step's noise prediction and the solver's update (never through the denoiser's Jacobian in the
latent, which explodes over many steps). Each step's gradient is multiplied by
c_t = sqrt(abar_t) sqrt(1 - abar_t) / beta_t, standardised by the geometric mean over the
sampled steps: without it the last few steps dominate the update. The UNet runs under
activation checkpointing, so memory stays flat in the number of steps.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def step_scales(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-step gradient multipliers c_t / geomean(c_t), from the 1000-step training schedule."""
    t = timesteps.long().cpu()
    abar = scheduler.alphas_cumprod.double()[t]
    beta = scheduler.betas.double()[t]
    c = abar.sqrt() * (1.0 - abar).sqrt() / beta
    return (c / c.log().mean().exp()).float()


def sample(
    pipe,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    latents: torch.Tensor,
    steps: int,
    guidance_scale: float,
    adjusted: bool = True,
) -> torch.Tensor:
    """Decoded images in [0, 1] from `latents` with the pipeline's own sampler.

    Differentiable (through checkpointed UNet calls) whenever grad mode is on; `uncond` None
    means no classifier-free guidance. `adjusted=False` is plain DFT: the gradient of the whole chain, the
    denoiser's Jacobian in its latent input included, with no per-step rescaling (checkpointed all the same),
    kept so that the adjustment's benefit can be measured against it.
    """
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=latents.device)
    scales = step_scales(scheduler, scheduler.timesteps) if adjusted else None
    x = latents * scheduler.init_noise_sigma
    use_cfg = uncond is not None and guidance_scale > 1.0
    emb = torch.cat([uncond, cond]) if use_cfg else cond
    differentiable = torch.is_grad_enabled()

    def eps_fn(inp: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return pipe.unet(inp, t, encoder_hidden_states=e).sample

    for i, t in enumerate(scheduler.timesteps):
        xin = x.detach() if adjusted else x
        xin = scheduler.scale_model_input(torch.cat([xin, xin]) if use_cfg else xin, t)
        eps = checkpoint(eps_fn, xin, t, emb, use_reentrant=False) if differentiable else eps_fn(xin, t, emb)
        if use_cfg:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance_scale * (e_c - e_u)
        if scales is not None and eps.requires_grad:
            scale = float(scales[i])
            eps.register_hook(lambda g, s=scale: g * s)
        x = scheduler.step(eps, t, x).prev_sample
    decoded = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (decoded.float() / 2 + 0.5).clamp(0, 1)
