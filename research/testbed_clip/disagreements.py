"""Where the testbed CLIP and the oracle disagree on guided images: a contact sheet and the per-pixel tone votes.

python research/testbed_clip/disagreements.py [--clip FOLDER] [--occupations ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from adaptors.assign import class_texts_for_testbed, generate_assigned, joint_assignment  # noqa: E402
from adaptors.generation import GenerationSpec, configure_threads, load_pipeline  # noqa: E402
from adaptors.readers.registry import load_reader, load_reader_folder  # noqa: E402
from common.settings import Settings  # noqa: E402
from testbed.oracle import read_batch  # noqa: E402
from testbed.world import ATTRIBUTES, prompt_for  # noqa: E402

TARGET = {"skin_tone": {"I": 0.25, "II": 0.25, "III": 0.25, "IV": 0.25}}


def guided_set(pipe, occupations, n, seed0, settings):
    steer = load_reader("testbed-cnn")
    texts = class_texts_for_testbed()
    kw = {"mode": settings.assign_mode, "guidance_weight": settings.assign_guidance_weight,
          "classifier_scale": settings.assign_classifier_scale}  # fmt: skip
    out, occ_of = [], []
    for occ in occupations:
        for tgt in (TARGET, {"gender": {"female": 0.5, "male": 0.5}}):
            spec = GenerationSpec(prompt_for(occ), num_images=n, seed=seed0, steps=settings.default_steps,
                                  guidance_scale=settings.default_guidance_scale)  # fmt: skip
            out.append(generate_assigned(pipe, spec, joint_assignment(n, tgt, seed0), texts, classifier=steer, **kw))
            occ_of += [occ] * n
    return torch.cat(out), occ_of


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clip", type=Path)
    p.add_argument("--occupations", nargs="+", default=["senator", "secretary", "mechanic", "librarian"])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--seed", type=int, default=31_000)
    p.add_argument("--out", type=Path, default=Path("/tmp/clip_dis"))
    a = p.parse_args()
    configure_threads(1)
    settings = Settings()
    pipe = load_pipeline("testbed", device="cpu")
    reader = load_reader_folder(a.clip) if a.clip else load_reader("testbed-clip")
    images, occ = guided_set(pipe, a.occupations, a.images, a.seed, settings)
    readings = read_batch(images.numpy() * 2 - 1)
    pred = reader.predict(images)
    rows = []
    for i, r in enumerate(readings):
        if not r.person:
            continue
        for attr, classes in reader.attributes.items():
            probs = pred.probs[attr][i]
            got = classes[int(probs.argmax())]
            if got != getattr(r, attr):
                rows.append({"i": i, "occ": occ[i], "attr": attr, "oracle": getattr(r, attr), "clip": got,
                             "p": [round(float(v), 3) for v in probs]})  # fmt: skip
    people = sum(r.person for r in readings)
    print(json.dumps({"images": len(images), "people": people, "wrong": len(rows),
                      "by_attr": {k: sum(x["attr"] == k for x in rows) for k in ATTRIBUTES}}))  # fmt: skip
    for x in rows:
        print(json.dumps(x))
    a.out.mkdir(parents=True, exist_ok=True)
    torch.save(images, a.out / "images.pt")
    from PIL import Image

    idx = [x["i"] for x in rows][:48]
    if idx:
        tiles = (images[idx].clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
        cols = 12
        sheet = np.full(((len(tiles) + cols - 1) // cols * 34, cols * 34, 3), 255, np.uint8)
        for k, t in enumerate(tiles):
            r, c = divmod(k, cols)
            sheet[r * 34 + 1 : r * 34 + 33, c * 34 + 1 : c * 34 + 33] = t
        Image.fromarray(sheet).resize((sheet.shape[1] * 4, sheet.shape[0] * 4), Image.NEAREST).save(a.out / "wrong.png")


if __name__ == "__main__":
    main()
