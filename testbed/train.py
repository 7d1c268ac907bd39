"""Train the testbed's tiny Stable Diffusion on the stereotyped world, on a CPU.

Stages run in order and each saves what it made, so a stage can be re-run alone:
`vae` (autoencoder), `diffusion` (UNet and text encoder from scratch, EMA), `classifier`
(the differentiable attribute classifier, see `testbed.classifier`), `words` (the lookalike
occupations' token embeddings against the frozen model, see `testbed.words`; `all` runs it last).

    python -m testbed.train all --out testbed/weights
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from testbed.architecture import (
    build_sample_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_train_scheduler,
    build_unet,
    build_vae,
)
from testbed.data import render_set

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent


def portable(path: Path) -> str:
    """`path` relative to the repository when it lies inside it: what gets written into committed
    configs and logs, so they do not carry the trainer's machine-specific absolute paths."""
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO_ROOT).as_posix() if resolved.is_relative_to(REPO_ROOT) else str(path)


def load_vae(folder: Path) -> AutoencoderKL:
    """The saved autoencoder, its recorded origin (`_name_or_path`, saved again with every pipeline) made portable."""
    vae = AutoencoderKL.from_pretrained(folder).eval()
    vae.register_to_config(_name_or_path=portable(folder))
    return vae


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


def train_vae(images: np.ndarray, steps: int, seed: int) -> AutoencoderKL:
    """MSE + a tiny KL: the latents only need to be decodable, not a good prior."""
    torch.manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(images)
    start = time.time()
    for step, idx in zip(range(steps), _batches(len(data), 32, rng)):
        x = data[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("vae step %d/%d mse %.5f (%.0f s)", step + 1, steps, loss.item(), time.time() - start)
    vae.eval()
    with torch.no_grad():
        lat = vae.encode(data[:2048]).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    return vae


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), 512):
        dist = vae.encode(torch.from_numpy(images[i : i + 512])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1.0 - decay)


def train_diffusion(
    mean: torch.Tensor,
    std: torch.Tensor,
    captions: list[str],
    tokenizer: CLIPTokenizer,
    steps: int,
    seed: int,
    batch_size: int = 64,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Epsilon-prediction MSE, UNet and text encoder from scratch; returns the EMA copies."""
    torch.manual_seed(seed)
    unet, text_encoder = build_unet(), build_text_encoder(tokenizer)
    ema_unet, ema_te = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    sched = build_train_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    warmup = 200
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * (0.2 + 0.8 * 0.5 * (1 + np.cos(np.pi * s / steps)))  # noqa: E731
    uniq = sorted(set(captions))
    ids_by_caption = tokenizer(
        uniq, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    cap_index = torch.tensor([uniq.index(c) for c in captions]) if len(uniq) < 5000 else None
    assert cap_index is not None
    rng = np.random.default_rng(seed)
    start = time.time()
    running = None
    for step, idx in zip(range(steps), _batches(len(mean), batch_size, rng)):
        for g in opt.param_groups:
            g["lr"] = 5e-4 * lr_at(step)
        idx_t = torch.from_numpy(idx)
        x0 = mean[idx_t] + std[idx_t] * torch.randn_like(mean[idx_t])
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),))
        xt = sched.add_noise(x0, noise, t)
        emb = text_encoder(ids_by_caption[cap_index[idx_t]])[0]
        pred = unet(xt, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_te, text_encoder, decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 200 == 0 or step == steps - 1:
            logger.info("diffusion step %d/%d loss %.4f (%.0f s)", step + 1, steps, running, time.time() - start)
    return ema_unet.eval(), ema_te.eval()


def _assemble(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    """A stock SD pipeline of the trained parts, with the sampling scheduler inference uses."""
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_sample_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "diffusion", "classifier", "words", "all"])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    parser.add_argument("--images", type=int, default=40_000)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--diffusion-steps", type=int, default=6000)
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--word-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    stages = ["vae", "diffusion", "classifier", "words"] if args.stage == "all" else [args.stage]
    work = args.out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    log_path = args.out / "training_log.json"
    if log_path.exists():
        timings = json.loads(log_path.read_text()).get("wall_seconds", {})

    if "vae" in stages or "diffusion" in stages:
        t0 = time.time()
        data = render_set(args.images, seed=args.seed)
        timings["render"] = round(time.time() - t0, 1)
        logger.info("rendered %d images in %.1f s", args.images, timings["render"])

    if "vae" in stages:
        t0 = time.time()
        vae = train_vae(data.images, args.vae_steps, args.seed)
        vae.save_pretrained(work / "vae")
        timings["vae"] = round(time.time() - t0, 1)
    if "diffusion" in stages:
        t0 = time.time()
        vae = load_vae(work / "vae")
        mean, std = encode_latents(vae, data.images)
        tokenizer = build_tokenizer()
        unet, text_encoder = train_diffusion(mean, std, data.captions, tokenizer, args.diffusion_steps, args.seed)
        _assemble(vae, text_encoder, tokenizer, unet).save_pretrained(args.out / "pipeline", safe_serialization=True)
        timings["diffusion"] = round(time.time() - t0, 1)
    if "classifier" in stages:
        from testbed.classifier import train_classifier

        t0 = time.time()
        vae_dir = args.out / "pipeline" / "vae"
        vae = load_vae(vae_dir if vae_dir.exists() else work / "vae")
        classifier = train_classifier(vae, args.classifier_steps, args.seed)
        classifier.save_pretrained(args.out / "classifier")
        timings["classifier"] = round(time.time() - t0, 1)
    if "words" in stages:
        from testbed.words import learn_words

        t0 = time.time()
        pipe = StableDiffusionPipeline.from_pretrained(args.out / "pipeline", safety_checker=None, requires_safety_checker=False)
        words_log = learn_words(pipe, args.word_steps, args.seed)
        pipe.save_pretrained(args.out / "pipeline", safe_serialization=True)
        timings["words"] = round(time.time() - t0, 1)
        logger.info("words: %s", words_log)
    if log_path.exists():  # another stage may have finished meanwhile: keep its timing
        timings = {**json.loads(log_path.read_text()).get("wall_seconds", {}), **timings}
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    args_log = {k: portable(v) if isinstance(v, Path) else str(v) for k, v in vars(args).items()}
    log.update({"wall_seconds": timings, "args": args_log})
    log_path.write_text(json.dumps(log, indent=2))
    logger.info("done: %s", timings)


if __name__ == "__main__":
    main()
