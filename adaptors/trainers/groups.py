"""InvDiff's stage 1: soft groups of training examples on which the frozen model's denoising loss differs most.

With no bias labels, the examples a biased model fits worst are the evidence of its bias (the
minority of each stereotyped prompt). Soft assignments W (N x K, rows on the simplex) are chosen
to maximise the spread (standard deviation) of the group-mean losses L_g = sum_i W_ig l_i / sum_i W_ig;
the rows are a softmax of free logits, optimised with Adam from a small random start. l_i is each
example's noise-prediction error (the target is the noise: the authors' code compares with the
clean latent, which measures the latent's scale, not the model's fit). Losses are standardised
first, so the learning rate does not depend on the model's loss scale.

Also here: how far inferred groups agree with labels a set happens to carry (normalised mutual
information), reported, never trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def infer_groups(losses: np.ndarray, k: int, iterations: int = 500, lr: float = 0.05, seed: int = 0) -> np.ndarray:
    """Soft assignments (N x k, rows sum to 1) maximising the std of the group-mean losses.

    `losses` holds each example's loss (N) or several draws of it (N x D, averaged)."""
    table = np.asarray(losses, dtype=np.float64)
    loss = table.mean(axis=1) if table.ndim == 2 else table
    z = torch.from_numpy((loss - loss.mean()) / (loss.std() + 1e-12))
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    logits = (0.01 * torch.randn(len(z), k, generator=gen, dtype=torch.float64)).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    for _ in range(iterations):
        w = torch.softmax(logits, dim=1)
        group_loss = (w * z[:, None]).sum(0) / w.sum(0).clamp(min=1e-8)
        spread = group_loss.std(unbiased=False)
        opt.zero_grad(set_to_none=True)
        (-spread).backward()
        opt.step()
    return torch.softmax(logits.detach(), dim=1).numpy()


def group_losses(per_example: torch.Tensor, weights: torch.Tensor, min_mass: float = 1e-3) -> torch.Tensor:
    """Each group's weighted mean loss over a batch (groups with under `min_mass` of the batch are left out)."""
    mass = weights.sum(0)
    keep = mass > min_mass * len(per_example)
    return (weights[:, keep] * per_example[:, None]).sum(0) / mass[keep]


def invariance_loss(
    per_example: torch.Tensor, weights: torch.Tensor, variance_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InvDiff's min step: mean + lambda * variance of the group losses; returns (loss, the group losses)."""
    groups = group_losses(per_example, weights)
    return groups.mean() + variance_weight * groups.var(unbiased=False), groups.detach()


def normalised_mutual_information(a: Sequence, b: Sequence) -> float:
    """NMI of two labelings (arithmetic-mean normalisation, as scikit-learn's default): 0 independent, 1 identical."""
    _, ia = np.unique(np.asarray(a), return_inverse=True)
    _, ib = np.unique(np.asarray(b), return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha, hb = -float((pa[pa > 0] * np.log(pa[pa > 0])).sum()), -float((pb[pb > 0] * np.log(pb[pb > 0])).sum())
    if ha == 0.0 or hb == 0.0:
        return 1.0 if ha == hb else 0.0
    return max(0.0, mi / ((ha + hb) / 2))
