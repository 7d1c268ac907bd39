"""The testbed's attribute classifier: a small differentiable CNN, trainers backpropagate through it.

It predicts every sensitive attribute plus whether a person is there at all (the testbed's
stand-in for a face detector: trainers leave person-less images out of the alignment term and
the audit counts them). Saved as JSON config + safetensors, like every fairdiff artefact.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from testbed.world import ATTRIBUTES

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class TestbedClassifier(nn.Module):
    """Images in [-1, 1] (N x 3 x 32 x 32) to logits per attribute and a person logit."""

    def __init__(self, width: int = 32, attributes: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        self.width = width
        self.attributes = {k: list(v) for k, v in (attributes or ATTRIBUTES).items()}
        w = width
        self.trunk = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * w, 4 * w), nn.SiLU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({a: nn.Linear(4 * w, len(c)) for a, c in self.attributes.items()})
        self.person_head = nn.Linear(4 * w, 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's features: what semantics-preservation losses compare."""
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(images)
        out = {a: head(h) for a, head in self.heads.items()}
        out["person"] = self.person_head(h).squeeze(-1)
        return out

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps({"width": self.width, "attributes": self.attributes}, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TestbedClassifier:
        path = Path(path)
        model = cls(**json.loads((path / CONFIG_NAME).read_text()))
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return model.eval()


@torch.no_grad()
def _vae_roundtrip(vae, images: torch.Tensor) -> torch.Tensor:
    """What an image looks like after the testbed VAE: generated images share its blur."""
    return torch.cat([vae.decode(vae.encode(images[i : i + 256]).latent_dist.sample()).sample
                      for i in range(0, len(images), 256)]).clamp(-1, 1)  # fmt: skip


@torch.no_grad()
def _junk(vae, n: int, seed: int) -> torch.Tensor:
    """Person-less images: backgrounds, random-latent decodes and blends of two people."""
    from testbed.data import render_balanced, render_empties

    g = torch.Generator().manual_seed(seed)
    third = n // 3
    empties = torch.from_numpy(render_empties(third, seed))
    latents = torch.randn(third, 4, 8, 8, generator=g) * 1.2
    decoded = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    a, _ = render_balanced(n - 2 * third, seed + 1)
    b, _ = render_balanced(n - 2 * third, seed + 2)
    shift = torch.from_numpy(b).roll(shifts=int(8 + seed % 8), dims=-1)
    blends = 0.5 * torch.from_numpy(a) + 0.5 * shift
    return torch.cat([empties, decoded, blends])


def train_classifier(vae, steps: int, seed: int, n_people: int = 24_000, n_junk: int = 6_000) -> TestbedClassifier:
    """Train on clean renders, their VAE round-trips, and junk; returns the classifier in eval mode."""
    from testbed.data import render_balanced

    torch.manual_seed(seed)
    x, labels = render_balanced(n_people, seed + 100)
    x = torch.from_numpy(x)
    half = n_people // 2
    x[:half] = _vae_roundtrip(vae, x[:half])
    junk = _junk(vae, n_junk, seed + 200)
    images = torch.cat([x, junk])
    person = torch.cat([torch.ones(n_people), torch.zeros(len(junk))])
    y = torch.cat([torch.from_numpy(labels[:, 1:]).long(), torch.full((len(junk), 3), -100)])
    model = TestbedClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(seed)
    start = time.time()
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(len(images), size=128))
        xb = images[idx] + 0.03 * torch.randn_like(images[idx])
        out = model(xb)
        loss = F.binary_cross_entropy_with_logits(out["person"], person[idx])
        for j, attr in enumerate(ATTRIBUTES):
            loss = loss + F.cross_entropy(out[attr], y[idx, j], ignore_index=-100)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            logger.info("classifier step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(), time.time() - start)
    return model.eval()
