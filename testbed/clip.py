"""The testbed's tiny CLIP: transformers' CLIPModel trained contrastively on renders and their captions.

It is the testbed's audit reader (the CNN steers and trains), so the real-SD code path (a CLIP folder,
zero-shot class prompts, prompt retrieval for the subject) runs end to end on the testbed. Captions name
a random subset of what an image shows (occupation, gender, age, skin tone) in the words prompts use;
person-less images (backgrounds, random-latent decodes, blends of two people) are "a photo". A caption
is a positive for every image of the batch it is true of (a soft-target contrastive loss), and the
zero-shot class prompts of `READER_SPEC` get a classification term, so zero-shot reading is what the
model is trained for. Half the people go through the testbed VAE first: generated images share its blur.

    python -m testbed.clip --out testbed/weights/clip

The folder loads with plain `CLIPModel.from_pretrained`; its reader.json makes it a zero-shot reader.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from testbed.world import ATTRIBUTES, CLASS_WORDS, OCCUPATIONS

logger = logging.getLogger(__name__)

NO_PERSON_CAPTION = "a photo"
PERSON_PROMPT = "a photo of the face of a person"


def class_prompt(attr: str, cls: str) -> str:
    """The zero-shot prompt of one class, in the captions' grammar."""
    word = CLASS_WORDS[attr][cls]
    if attr == "skin_tone":
        return f"{PERSON_PROMPT} with {word}"
    return f"a photo of the face of {'an' if word[0] in 'aeiou' else 'a'} {word} person"


READER_SPEC: dict = {
    "attributes": {a: {c: [class_prompt(a, c)] for c in classes} for a, classes in ATTRIBUTES.items()},
    "person": {"yes": [PERSON_PROMPT], "no": [NO_PERSON_CAPTION]},
}


def caption(facts: dict[str, int], rng: np.random.Generator) -> tuple[str, dict[str, int]]:
    """A caption naming a random non-empty subset of a person's facts, and that subset."""
    keys = ["occupation", *ATTRIBUTES]
    named = {k: facts[k] for k in keys if rng.random() < (0.6 if k == "occupation" else 0.5)}
    if not named:
        k = keys[int(rng.integers(len(keys)))]
        named = {k: facts[k]}
    words = [CLASS_WORDS[a][ATTRIBUTES[a][named[a]]] for a in ("age", "gender") if a in named]
    subject = " ".join([*words, OCCUPATIONS[named["occupation"]].name if "occupation" in named else "person"])
    text = f"a photo of the face of {'an' if subject[0] in 'aeiou' else 'a'} {subject}"
    if "occupation" in named:
        text += ", a person"
    if "skin_tone" in named:
        text += f" with {CLASS_WORDS['skin_tone'][ATTRIBUTES['skin_tone'][named['skin_tone']]]}"
    return text, named


def build_clip(tokenizer, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(image_size=32, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def training_set(n_people: int, n_junk: int, seed: int, vae, roundtrip_share: float = 0.5) -> tuple[torch.Tensor, np.ndarray]:
    """Images in [0, 1] and facts (occupation, gender, skin_tone, age; -1 for no person), people first."""
    from testbed.classifier import _junk, _vae_roundtrip
    from testbed.data import render_balanced

    x, labels = render_balanced(n_people, seed + 100)
    x = torch.from_numpy(x)
    k = int(n_people * roundtrip_share)
    x[:k] = _vae_roundtrip(vae, x[:k])
    junk = _junk(vae, n_junk, seed + 200)
    images = (torch.cat([x, junk]) + 1) / 2
    facts = np.concatenate([labels, np.full((len(junk), 4), -1)])
    return images.clamp(0, 1), facts


def _pooled(out) -> torch.Tensor:
    """Projected features (transformers 5 returns them as the output's pooler_output)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _tokens(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="longest", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


def _soften(xb: torch.Tensor, rng: np.random.Generator, share: float = 0.3) -> torch.Tensor:
    """Blur a share of the batch by a random amount: generated images are softer than renders."""
    pick = torch.from_numpy(rng.random(len(xb)) < share)
    if not pick.any():
        return xb
    blurred = F.avg_pool2d(F.pad(xb[pick], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    alpha = torch.from_numpy(rng.uniform(0.3, 1.0, int(pick.sum()))).float().view(-1, 1, 1, 1)
    xb = xb.clone()
    xb[pick] = alpha * blurred + (1 - alpha) * xb[pick]
    return xb


def train(steps: int, seed: int, n_people: int = 24_000, n_junk: int = 6_000, batch: int = 128, lr: float = 1e-3,
          init: Path | None = None, roundtrip_share: float = 0.5, soften: float = 0.0):  # fmt: skip
    """Train from scratch, or continue from `init` (a saved folder) on a fresh draw of images."""
    from transformers import AutoTokenizer

    from testbed import PIPELINE_DIR
    from testbed.train import load_vae

    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(PIPELINE_DIR / "tokenizer")
    vae = load_vae(PIPELINE_DIR / "vae")
    images, facts = training_set(n_people, n_junk, seed, vae, roundtrip_share)
    logger.info("training set: %d images in %.0fs", len(images), time.time() - start)
    if init is not None:
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(init).train()
    else:
        model = build_clip(tokenizer, seed)
    prompts = [p for a in ATTRIBUTES for c in ATTRIBUTES[a] for p in READER_SPEC["attributes"][a][c]]
    prompt_ids = _tokens(tokenizer, prompts + [PERSON_PROMPT, NO_PERSON_CAPTION])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    keys = ["occupation", *ATTRIBUTES]
    log = []
    for step in range(steps):
        idx = rng.integers(len(images), size=batch)
        xb = _soften(images[idx], rng, soften) + 0.02 * torch.randn(batch, 3, 32, 32)
        fb = facts[idx]
        texts, named = [], []
        for row in fb:
            if row[0] < 0:
                texts.append(NO_PERSON_CAPTION)
                named.append(None)
            else:
                t, n = caption(dict(zip(keys, map(int, row))), rng)
                texts.append(t)
                named.append(n)
        # consistent[i, j]: caption i is true of image j
        person = torch.from_numpy(fb[:, 0] >= 0)
        consistent = torch.zeros(batch, batch, dtype=torch.bool)
        ft = torch.from_numpy(fb)
        for i, n in enumerate(named):
            if n is None:
                consistent[i] = ~person
            else:
                ok = person.clone()
                for k, v in n.items():
                    ok &= ft[:, keys.index(k)] == v
                consistent[i] = ok
        img = F.normalize(_pooled(model.get_image_features(pixel_values=(xb - 0.5) / 0.25)), dim=-1)
        txt = F.normalize(torch.cat([_pooled(model.get_text_features(input_ids=_tokens(tokenizer, texts))),
                                     _pooled(model.get_text_features(input_ids=prompt_ids))]), dim=-1)  # fmt: skip
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * txt[:batch] @ img.T  # captions x images
        target = consistent.float()
        loss_t = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        loss_i = -(target.T / target.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        # zero-shot classification term: each attribute's class prompts, and person vs no person
        cls = scale * img @ txt[batch:].T
        loss_c, o = 0.0, 0
        for j, a in enumerate(ATTRIBUTES):
            k = len(ATTRIBUTES[a])
            y = ft[:, j + 1].long()
            if person.any():
                loss_c = loss_c + F.cross_entropy(cls[person, o : o + k], y[person])
            o += k
        loss_c = loss_c + F.cross_entropy(cls[:, o : o + 2], (~person).long())
        loss = 0.5 * (loss_t + loss_i) + loss_c
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            entry = {"step": step + 1, "loss": round(loss.item(), 4), "contrastive": round(float(0.5 * (loss_t + loss_i)), 4),
                     "prompts": round(float(loss_c), 4), "seconds": round(time.time() - start, 1)}  # fmt: skip
            log.append(entry)
            logger.info("clip step %d/%d loss %.4f (contrastive %.4f, prompts %.4f) %.0fs", step + 1, steps, entry["loss"],
                        entry["contrastive"], entry["prompts"], entry["seconds"])  # fmt: skip
    return model.eval(), tokenizer, log, time.time() - start


def save(model, tokenizer, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reader = {"kind": "clip-zero-shot", "clip": ".", "name": "testbed-clip", "face_detector": "none", **READER_SPEC}
    (out / "reader.json").write_text(json.dumps(reader, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3, "crop_size": 32}) + "\n"
    )
    (out / "training_log.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights" / "clip")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--people", type=int, default=8_000)
    parser.add_argument("--junk", type=int, default=2_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--init", type=Path, help="continue from this saved folder (on a fresh draw: use another --seed)")
    parser.add_argument("--roundtrip-share", type=float, default=0.5, help="share of people seen through the testbed VAE")
    parser.add_argument("--soften", type=float, default=0.0, help="share of each batch blurred by a random amount")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    model, tokenizer, log, seconds = train(args.steps, args.seed, args.people, args.junk, lr=args.lr, init=args.init,
                                           roundtrip_share=args.roundtrip_share, soften=args.soften)  # fmt: skip
    previous = json.loads((args.init / "training_log.json").read_text()) if args.init else None
    meta = {"steps": args.steps, "seed": args.seed, "people": args.people, "junk": args.junk, "lr": args.lr,
            "roundtrip_share": args.roundtrip_share, "soften": args.soften, "continued_from": previous,
            "wall_seconds": round(seconds, 1), "log": log}  # fmt: skip
    save(model, tokenizer, args.out, meta)
    logger.info("trained in %.0fs, saved to %s", seconds, args.out)
    logger.info("accuracy against the oracle: python benchmarks/readers.py --clip-accuracy %s", args.out)


if __name__ == "__main__":
    main()
