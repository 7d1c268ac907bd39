"""Are the images the readers disagree with the oracle on broken? Palette fit (`testbed.oracle.palette_fit`): the
share of pixels above the shoulders within 0.15 (RGB, 0-1) of a colour of the world. Renders and their VAE
round-trips are near 1; smeared, off-palette generations are low. An image is "world-like" when its fit is at
least the 1st percentile of VAE round-trips of fresh renders (what the decoder's blur alone does).

    python research/testbed_clip/broken.py IMAGES.pt [--clip FOLDER | --reader NAME]
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

from adaptors.readers.registry import load_reader, load_reader_folder  # noqa: E402
from testbed import oracle  # noqa: E402
from testbed.data import render_balanced  # noqa: E402
from testbed.oracle import palette_fit  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("images", type=Path)
    p.add_argument("--clip", type=Path)
    p.add_argument("--reader", default="testbed-clip")
    a = p.parse_args()
    torch.set_num_threads(1)
    reader = load_reader_folder(a.clip) if a.clip else load_reader(a.reader)
    from testbed import PIPELINE_DIR
    from testbed.classifier import _vae_roundtrip
    from testbed.train import load_vae

    x, _ = render_balanced(400, 5)
    rt = _vae_roundtrip(load_vae(PIPELINE_DIR / "vae"), torch.from_numpy(x))
    renders = ((rt + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    images = torch.load(a.images)
    hwc = images.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    readings = oracle.read_batch(images.numpy() * 2 - 1)
    pred = reader.predict(images)
    fits = np.asarray([palette_fit(im) for im in hwc])
    wrong = np.zeros(len(images), bool)
    person = np.asarray([r.person for r in readings])
    for attr, classes in reader.attributes.items():
        got = [classes[int(v.argmax())] for v in pred.probs[attr]]
        wrong |= np.asarray([r.person and g != getattr(r, attr) for g, r in zip(got, readings)])
    render_fit = np.asarray([palette_fit(im) for im in renders])
    cut = float(np.quantile(render_fit, 0.01))
    out = {"roundtrip_fit_p01": round(cut, 3), "roundtrip_fit_median": round(float(np.median(render_fit)), 3),
           "generated_fit_median": round(float(np.median(fits[person])), 3),
           "agree_fit_median": round(float(np.median(fits[person & ~wrong])), 3),
           "disagree_fit_median": round(float(np.median(fits[wrong])), 3),
           "share_below_roundtrip_p01": round(float((fits[person] < cut).mean()), 3),
           "disagreements": int(wrong.sum()), "disagreements_below_roundtrip_p01": int((wrong & (fits < cut)).sum()),
           "people": int(person.sum())}  # fmt: skip
    for attr, classes in reader.attributes.items():
        got = [classes[int(v.argmax())] for v in pred.probs[attr]]
        ok = np.asarray([g == getattr(r, attr) for g, r in zip(got, readings)])
        keep = person & (fits >= cut)
        out[f"{attr}_accuracy_all"] = round(float(ok[person].mean()), 4)
        out[f"{attr}_accuracy_world_like"] = round(float(ok[keep].mean()), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
