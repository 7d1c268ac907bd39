"""An image + caption training set on disk, read and checked before any training starts.

Two layouts, the ones people already have:
- a folder of images with `metadata.jsonl`, one JSON object per line with `file_name` and `text`
  (diffusers' text-to-image examples and Hugging Face `imagefolder` use it);
- a CSV file with columns `image` and `caption` (paths relative to the CSV's folder).

Every listed file must exist and open as an image, and every row must carry a caption (an empty
string is a caption: the unconditional examples of classifier-free guidance). A bad set fails
with one error naming the row and the problem, before a model is touched. Other string columns
(e.g. attribute labels a curated set happens to carry) are kept as `labels`: trainers may report
agreement with them but never train on them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

METADATA = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FIELD = "hyperparameters.dataset"


class DatasetError(ValueError):
    """A training set that cannot be used; the message names the field, the file and the row."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{FIELD}: {message}")


@dataclass
class CaptionSet:
    """The checked rows of a training set: image paths, captions, and any label columns (row-aligned)."""

    root: Path
    files: list[Path]
    captions: list[str]
    labels: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, n: int, seed: int) -> CaptionSet:
        """At most n rows, drawn without replacement (all of them, in order, when there are fewer)."""
        if n >= len(self):
            return self
        rows = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return CaptionSet(self.root, [self.files[i] for i in rows], [self.captions[i] for i in rows],
                          {k: [v[i] for i in rows] for k, v in self.labels.items()})  # fmt: skip

    def images(self, size: int) -> torch.Tensor:
        """N x 3 x size x size in [-1, 1] (RGB, resized when the files differ in size)."""
        out = np.empty((len(self), size, size, 3), dtype=np.float32)
        for i, path in enumerate(self.files):
            with Image.open(path) as img:
                rgb = img.convert("RGB")
                if rgb.size != (size, size):
                    rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
                out[i] = np.asarray(rgb, dtype=np.float32)
        return torch.from_numpy(out).permute(0, 3, 1, 2) / 127.5 - 1.0


def read_caption_set(path: str | Path) -> CaptionSet:
    """The checked training set at `path` (a folder with metadata.jsonl, or a CSV); DatasetError otherwise."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{str(path)!r} does not exist on the training worker")
    if path.is_dir():
        rows = _jsonl_rows(path)
        root = path
    elif path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
        root = path.parent
    else:
        raise DatasetError(f"{str(path)!r} is neither a folder with {METADATA} nor a .csv file")
    if not rows:
        raise DatasetError(f"{str(path)!r} lists no images")
    files, captions = [], []
    label_keys = [k for k in rows[0][2] if all(isinstance(r[2].get(k), str) for r in rows)]
    for where, (name, caption, _) in enumerate(rows, start=1):
        files.append(_check_image(root, name, f"{path.name} row {where}"))
        captions.append(caption)
    labels = {k: [str(r[2][k]) for r in rows] for k in label_keys}
    return CaptionSet(root, files, captions, labels)


def _jsonl_rows(folder: Path) -> list[tuple[str, str, dict]]:
    meta = folder / METADATA
    if not meta.is_file():
        if not any(folder.iterdir()):
            raise DatasetError(f"folder {str(folder)!r} is empty")
        raise DatasetError(f"folder {str(folder)!r} has no {METADATA} (one JSON line per image: file_name, text)")
    rows = []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{METADATA} line {n} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{METADATA} line {n} is not a JSON object")
        rows.append(_row(row, "file_name", "text", f"{METADATA} line {n}"))
    return rows


def _csv_rows(path: Path) -> list[tuple[str, str, dict]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
                raise DatasetError(f"{path.name} needs the columns 'image' and 'caption', has {reader.fieldnames}")
            return [_row(row, "image", "caption", f"{path.name} row {n}") for n, row in enumerate(reader, start=1)]
    except UnicodeDecodeError:
        raise DatasetError(f"{path.name} is not UTF-8 text") from None


def _row(row: dict, file_key: str, text_key: str, where: str) -> tuple[str, str, dict]:
    name, caption = row.get(file_key), row.get(text_key)
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"{where} has no {file_key!r}")
    if not isinstance(caption, str):
        raise DatasetError(f"{where} ({name}) has no caption ({text_key!r})")
    rest = {k: v for k, v in row.items() if k not in (file_key, text_key)}
    return name, caption, rest


def _check_image(root: Path, name: str, where: str) -> Path:
    file = (root / name).resolve()
    if not file.is_relative_to(root.resolve()):
        raise DatasetError(f"{where}: {name!r} lies outside the training set's folder")
    if not file.is_file():
        raise DatasetError(f"{where}: image {name!r} does not exist")
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise DatasetError(f"{where}: {name!r} is not an image file (expected one of {list(IMAGE_SUFFIXES)})")
    try:
        with Image.open(file) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{where}: image {name!r} cannot be read ({type(exc).__name__})") from None
    return file
