"""A reader's per-attribute agreement with the oracle on images saved by disagreements.py.

python research/testbed_clip/accuracy.py IMAGES.pt [--clip FOLDER | --reader NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adaptors.readers.registry import load_reader, load_reader_folder  # noqa: E402
from benchmarks.readers import oracle_accuracy  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--clip", type=Path)
    p.add_argument("--reader", default="testbed-clip")
    a = p.parse_args()
    torch.set_num_threads(1)
    reader = load_reader_folder(a.clip) if a.clip else load_reader(a.reader)
    for f in a.images:
        print(f, json.dumps(oracle_accuracy(reader, torch.load(f))))
