"""Teach the trained testbed new occupation words without changing what it does for the old ones.

The lookalike occupations of `testbed.world` are learnt as one token embedding each against the
frozen UNet and text encoder (textual inversion, with the diffusion loss on rendered images of
that occupation). Every other weight, and the embedding row of every earlier token, is left
bit-for-bit as it was, so each prompt of the drawn occupations encodes, and generates, exactly as
before, and no benchmark of the base model moves.

    python -m testbed.train words --out testbed/weights
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from testbed.architecture import build_tokenizer, build_train_scheduler
from testbed.renderer import Person, render_batch
from testbed.world import ATTRIBUTES, LOOKALIKE_OCCUPATIONS, look_index, look_of, prompt_for

logger = logging.getLogger(__name__)


def extend_vocabulary(text_encoder: CLIPTextModel, old: CLIPTokenizer, new: CLIPTokenizer) -> list[int]:
    """Move every old token's embedding row to its id in `new`; returns the ids of the new tokens.

    A new token starts at the row of the occupation it looks like (its image is that
    occupation's, only the people in it differ), so learning it only has to find the difference.
    """
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    missing = sorted(set(old_vocab) - set(new_vocab))
    if missing:
        raise ValueError(f"the new vocabulary drops tokens of the trained one: {missing[:5]}")
    table = text_encoder.get_input_embeddings().weight.detach()
    rows = torch.empty(len(new_vocab), table.shape[1], dtype=table.dtype)
    for token, i in old_vocab.items():
        rows[new_vocab[token]] = table[i]
    fresh = sorted(set(new_vocab.values()) - {new_vocab[t] for t in old_vocab})
    rows[fresh] = table.mean(0)  # BPE intermediates that are not words keep a neutral start: the table mean
    for occ in LOOKALIKE_OCCUPATIONS:
        rows[new_vocab[occ.name + "</w>"]] = table[old_vocab[look_of(occ.name) + "</w>"]]
    embedding = torch.nn.Embedding(len(new_vocab), table.shape[1])
    embedding.weight.data.copy_(rows)
    text_encoder.set_input_embeddings(embedding)
    eos = new.convert_tokens_to_ids(new.eos_token)
    text_encoder.config.vocab_size = len(new_vocab)
    text_encoder.config.eos_token_id = text_encoder.config.pad_token_id = eos
    text_encoder.config.bos_token_id = new.convert_tokens_to_ids(new.bos_token)
    return [new_vocab[o.name + "</w>"] for o in LOOKALIKE_OCCUPATIONS]


def _render_lookalikes(per_word: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of each lookalike occupation drawn from its own shares, and the word index of each."""
    rng = np.random.default_rng(seed)
    people, words = [], []
    for w, occ in enumerate(LOOKALIKE_OCCUPATIONS):
        look = look_index(occ.name)
        for _ in range(per_word):
            g = int(rng.random() >= occ.p_female)
            s = int(rng.choice(len(ATTRIBUTES["skin_tone"]), p=np.asarray(occ.skin_tone)))
            a = int(rng.random() >= occ.p_young)
            people.append(Person(look, g, s, a))
            words.append(w)
    seeds = [seed * 2_000_003 + i for i in range(len(people))]
    return render_batch(people, seeds).astype(np.float32), np.asarray(words)


def learn_words(pipe: StableDiffusionPipeline, steps: int, seed: int, per_word: int = 400, lr: float = 5e-3) -> dict:
    """Extend `pipe`'s tokenizer with the lookalike words and learn their embeddings in place."""
    torch.manual_seed(seed)
    new_tokenizer = build_tokenizer()
    word_ids = extend_vocabulary(pipe.text_encoder, pipe.tokenizer, new_tokenizer)
    pipe.tokenizer = new_tokenizer
    te, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    for module in (te, unet, vae):
        module.requires_grad_(False)
    table = te.get_input_embeddings().weight
    before = table.detach().clone()
    table.requires_grad_(True)
    mask = torch.zeros(table.shape[0], 1)
    mask[word_ids] = 1.0
    table.register_hook(lambda grad: grad * mask)  # only the new words' rows ever get a gradient

    images, words = _render_lookalikes(per_word, seed)
    with torch.no_grad():
        dists = [vae.encode(torch.from_numpy(images[i : i + 512])).latent_dist for i in range(0, len(images), 512)]
    scale = vae.config.scaling_factor
    mean = torch.cat([d.mean for d in dists]) * scale
    std = torch.cat([d.std for d in dists]) * scale
    ids = new_tokenizer([prompt_for(o.name) for o in LOOKALIKE_OCCUPATIONS], padding="max_length",
                        max_length=new_tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
    sched = build_train_scheduler()
    # Adam without weight decay: a row whose gradient is always zero is never moved, not even by eps
    opt = torch.optim.Adam([table], lr=lr)
    rng = np.random.default_rng(seed)
    start, running = time.time(), None
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(len(mean), size=64))
        x0 = mean[idx] + std[idx] * torch.randn_like(mean[idx])
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),))
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=te(ids[words[idx.numpy()]])[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            logger.info("words step %d/%d loss %.4f (%.0f s)", step + 1, steps, running, time.time() - start)
    table.requires_grad_(False)
    keep = torch.ones(table.shape[0], dtype=torch.bool)
    keep[word_ids] = False
    if not torch.equal(table.detach()[keep], before[keep]):
        raise RuntimeError("learning the new words moved an existing embedding row")
    return {"words": len(word_ids), "steps": steps, "images_per_word": per_word, "final_loss": round(float(running), 5)}
