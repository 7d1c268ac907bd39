"""GMM adaptors: a per-prompt Gaussian mixture over the latent after step t*, each component named by a class.

The `latent` strategy (Pal et al., "Gaussian Harmony" / GAMMA-FACE) moves each image's latent, after
denoising step t*, into a component of the class the image was assigned, and lets the rest of the
denoising run as usual: no weights change and no extra denoiser pass is made. The move keeps the
image's own trajectory and replaces only its component mean, x' = x + m_target - sum_k r_k m_k
(r: the image's posterior over the components, m: the components' means in the whole latent),
towards the most likely component of the assigned class; docs/methods/gmm.md gives the measurements
behind that choice over drawing a fresh latent from the component.

Tensors per calibrated prompt p (all float32): `p.center` [D] and `p.basis` [d x D] (the principal
components the mixture lives in), `p.means` [K x d], `p.precisions_cholesky` [K x d x d] and
`p.log_weights` [K] (the mixture), `p.latent_means` [K x D] (each component's mean in the latent).
The manifest's hyperparameters name the prompts, each component's classes ({attribute: class}) and t*.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from adaptors.base import Adaptor

GMM_WEIGHTS_NAME = "gmm.safetensors"
_PARTS = ("center", "basis", "means", "precisions_cholesky", "log_weights", "latent_means")


@dataclass
class PromptMixture:
    """One prompt's mixture, ready to move latents (see the module docstring for the tensors)."""

    center: torch.Tensor
    basis: torch.Tensor
    means: torch.Tensor
    precisions_cholesky: torch.Tensor
    log_weights: torch.Tensor
    latent_means: torch.Tensor
    classes: list[dict[str, str]]

    def posterior(self, latents: torch.Tensor) -> torch.Tensor:
        """N x K: each latent's responsibility of each component."""
        z = (latents.reshape(len(latents), -1).float() - self.center) @ self.basis.T
        diff = z[:, None, :] - self.means[None]  # N x K x d
        y = torch.einsum("nkd,kde->nke", diff, self.precisions_cholesky)
        log_det = torch.log(torch.diagonal(self.precisions_cholesky, dim1=-2, dim2=-1)).sum(-1)
        log_p = -0.5 * (y**2).sum(-1) + log_det - 0.5 * z.shape[1] * math.log(2 * math.pi) + self.log_weights
        return torch.softmax(log_p, dim=-1)

    def carriers(self, classes: Mapping[str, str]) -> list[int]:
        """The components whose classes include `classes` (a component named for more attributes carries each)."""
        return [k for k, named in enumerate(self.classes) if all(named.get(a) == c for a, c in classes.items())]

    def move(self, latents: torch.Tensor, assigned: Sequence[Mapping[str, str]]) -> torch.Tensor:
        """Each latent with its component mean replaced by that of the most likely component of its assigned class."""
        post = self.posterior(latents)
        flat = latents.reshape(len(latents), -1).float()
        out = flat.clone()
        for i, classes in enumerate(assigned):
            carriers = self.carriers(classes)
            if not carriers:
                raise ValueError(f"no component carries {dict(classes)}")
            target = carriers[int(post[i, carriers].argmax())]
            out[i] = flat[i] + self.latent_means[target] - post[i] @ self.latent_means
        return out.reshape(latents.shape).to(latents.dtype)


class GmmAdaptor(Adaptor):
    """Per-prompt mixtures for the `latent` strategy; nothing is attached to the pipeline."""

    kind: ClassVar[str] = "gmm"
    weights_name: ClassVar[str] = GMM_WEIGHTS_NAME

    def __init__(self, manifest, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(manifest, tensors)
        hp = manifest.hyperparameters or {}
        self.prompts: list[str] = list(hp.get("prompts", []))
        components = hp.get("component_classes") or []
        self.at_step = int(hp.get("at_step", -1))
        if not self.prompts or len(components) != len(self.prompts) or self.at_step < 0:
            raise ValueError(f"gmm adaptor {manifest.id!r}: needs prompts, their components' classes and at_step")
        expected = {f"{p}.{part}" for p in range(len(self.prompts)) for part in _PARTS}
        if set(tensors) != expected:
            raise ValueError(f"gmm adaptor {manifest.id!r}: needs the tensors {sorted(expected)}")
        self.mixtures = [self._mixture(p, components[p]) for p in range(len(self.prompts))]

    def _mixture(self, p: int, classes: list[dict[str, str]]) -> PromptMixture:
        t = {part: self.tensors[f"{p}.{part}"].float() for part in _PARTS}
        k, d = t["means"].shape
        dim = t["center"].shape[0]
        shapes = {"basis": (d, dim), "precisions_cholesky": (k, d, d), "log_weights": (k,), "latent_means": (k, dim)}
        bad = [part for part, shape in shapes.items() if tuple(t[part].shape) != shape]
        if bad or len(classes) != k or not all(torch.isfinite(v).all() for v in t.values()):
            raise ValueError(f"gmm adaptor {self.manifest.id!r}: prompt {p}'s mixture is malformed ({bad or 'classes'})")
        return PromptMixture(**t, classes=[dict(c) for c in classes])

    @classmethod
    def build(cls, manifest, prompts: list[str], mixtures: list[PromptMixture], at_step: int) -> GmmAdaptor:
        """From fitted mixtures; fills the manifest fields the adaptor reads back."""
        manifest.kind = cls.kind
        manifest.hyperparameters = {**(manifest.hyperparameters or {}), "prompts": list(prompts), "at_step": int(at_step),
                                    "component_classes": [m.classes for m in mixtures]}  # fmt: skip
        tensors = {f"{p}.{part}": getattr(m, part).float().contiguous() for p, m in enumerate(mixtures) for part in _PARTS}
        return cls(manifest, tensors)

    def mixture_for(self, prompt: str) -> PromptMixture | None:
        return self.mixtures[self.prompts.index(prompt)] if prompt in self.prompts else None

    def attach(self, pipe) -> None:
        """Nothing to load: the mixture acts on latents during generation."""

    def activate(self, pipe) -> None:
        """Nothing to switch."""

    def deactivate(self, pipe) -> None:
        """Nothing to switch."""

    def detach(self, pipe) -> None:
        """Nothing to free."""


def generate_balanced(
    pipe,
    spec,
    assignment: Sequence[Mapping[str, str]],
    mixture: PromptMixture,
    at_step: int,
    on_step=None,
    max_batch: int = 16,
) -> torch.Tensor:
    """Images in [0, 1] (N x 3 x H x W, CPU), image i moved into a component of assignment[i] after step `at_step`.

    One plain generation pass: image i starts from generate()'s noise for image i, so where its latent already
    sits in a component of its class the move is small and the image close to the plain one.
    """
    from adaptors.generation import generate

    if len(assignment) != spec.num_images:
        raise ValueError(f"assignment has {len(assignment)} entries for num_images={spec.num_images}")
    missing = [dict(a) for a in assignment if not mixture.carriers(a)]
    if missing:
        raise ValueError(f"no component carries {missing[0]}")
    return generate(pipe, spec, max_batch=max_batch, on_step=on_step, on_latents=latent_hook(mixture, at_step, assignment))


def latent_hook(mixture: PromptMixture, at_step: int, assignment: Sequence[Mapping[str, str]]) -> Any:
    """The generation hook (adaptors.generation.LatentHook) that moves each chunk's latents after step `at_step`."""

    def hook(step: int, latents: torch.Tensor, rows: Sequence[int]) -> torch.Tensor | None:
        if step != at_step:
            return None
        return mixture.move(latents.cpu(), [assignment[i] for i in rows]).to(latents.device)

    return hook
