"""Write renders (half through the testbed VAE) as PNGs with a FairFace-layout labels.csv, for
`fairdiff readers fit-probe` on the testbed CLIP.

    python research/testbed_clip/probe_folder.py OUT [--n 4000]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from testbed import PIPELINE_DIR  # noqa: E402
from testbed.classifier import _vae_roundtrip  # noqa: E402
from testbed.data import render_balanced  # noqa: E402
from testbed.train import load_vae  # noqa: E402
from testbed.world import ATTRIBUTES  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=4000)
    a = p.parse_args()
    torch.set_num_threads(1)
    x, labels = render_balanced(a.n, 777)
    x = torch.from_numpy(x)
    x[: a.n // 2] = _vae_roundtrip(load_vae(PIPELINE_DIR / "vae"), x[: a.n // 2])
    px = (((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", *ATTRIBUTES])
        for i, (img, row) in enumerate(zip(px, labels)):
            Image.fromarray(img).save(a.out / f"{i}.png")
            w.writerow([f"{i}.png", *(ATTRIBUTES[attr][int(row[j + 1])] for j, attr in enumerate(ATTRIBUTES))])
