"""Resumable trainer state in safetensors + JSON: the weights, their EMA and the optimiser moments.

A killed training worker's task is redelivered; the trainer then continues from the last
checkpoint instead of starting over. The weights file is replaced before the JSON that names
the finished iteration, so a crash between the two never pairs new state with old weights.
Nothing here is a pickle.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

WEIGHTS = "trainer_checkpoint.safetensors"
STATE = "trainer_checkpoint.json"


def save_checkpoint(
    folder: Path, params: list[torch.nn.Parameter], ema: EMAModel, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach().cpu().contiguous()
        tensors[f"ema.{i}"] = ema.shadow_params[i].detach().cpu().contiguous()
        moments = opt.state.get(p, {})
        if moments:
            tensors[f"adam.{i}.exp_avg"] = moments["exp_avg"].detach().cpu().contiguous()
            tensors[f"adam.{i}.exp_avg_sq"] = moments["exp_avg_sq"].detach().cpu().contiguous()
            steps[str(i)] = float(moments["step"])
    full = {**state, "adam_steps": steps, "ema_step": ema.optimization_step}
    tmp_w, tmp_s = folder / (WEIGHTS + ".tmp"), folder / (STATE + ".tmp")
    save_file(tensors, str(tmp_w))
    tmp_s.write_text(json.dumps(full))
    os.replace(tmp_w, folder / WEIGHTS)
    os.replace(tmp_s, folder / STATE)


def load_checkpoint(
    folder: Path, params: list[torch.nn.Parameter], ema: EMAModel, opt: torch.optim.Optimizer, config: dict[str, Any]
) -> dict[str, Any] | None:
    """Restore into `params`/`ema`/`opt` and return the saved state; None when there is none that fits."""
    if not (folder / STATE).is_file() or not (folder / WEIGHTS).is_file():
        return None
    state = json.loads((folder / STATE).read_text())
    if state.get("config") != config:
        logger.warning("ignoring checkpoint in %s: it was made with other settings", folder)
        return None
    tensors = load_file(str(folder / WEIGHTS))
    if any(f"param.{i}" not in tensors or tensors[f"param.{i}"].shape != p.shape for i, p in enumerate(params)):
        logger.warning("ignoring checkpoint in %s: its tensors do not fit this model", folder)
        return None
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"].to(p.device, p.dtype))
            ema.shadow_params[i].copy_(tensors[f"ema.{i}"].to(p.device, p.dtype))
            if str(i) in state["adam_steps"]:
                opt.state[p] = {
                    "step": torch.tensor(state["adam_steps"][str(i)]),
                    "exp_avg": tensors[f"adam.{i}.exp_avg"].to(p.device),
                    "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(p.device),
                }
    ema.optimization_step = int(state["ema_step"])
    logger.info("resuming training from %s at iteration %d", folder, state["iteration"])
    return state
