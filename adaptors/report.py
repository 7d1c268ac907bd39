"""Contact sheets: the images of a run side by side, each with its predicted attributes beneath."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_ABBREV = {"female": "F", "male": "M", "young": "young", "old": "old"}


def caption_lines(attributes: dict[str, dict], person: bool) -> list[str]:
    """Short text for one image: e.g. ['F .97', 'II .88', 'young .99'], or ['no person']."""
    if not person:
        return ["no person"]
    lines = []
    for attr in ("gender", "skin_tone", "age"):
        if attr in attributes:
            cls = str(attributes[attr]["class"])
            lines.append(f"{_ABBREV.get(cls, cls)} {float(attributes[attr]['confidence']):.2f}")
    return lines


def contact_sheet(images: np.ndarray, captions: list[list[str]], columns: int = 8, scale: int = 3) -> Image.Image:
    """Tile N x H x W x 3 uint8 images, upscaled by `scale`, with caption lines under each."""
    n, h, w, _ = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    font = ImageFont.load_default()
    line_h = 11
    lines = max((len(c) for c in captions), default=0)
    cell_w, cell_h = max(w * scale, 64), h * scale + lines * line_h + 6
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        tile = Image.fromarray(images[i]).resize((w * scale, h * scale), Image.NEAREST)
        sheet.paste(tile, (x + (cell_w - w * scale) // 2, y + 2))
        for j, text in enumerate(captions[i] if i < len(captions) else []):
            draw.text((x + 3, y + h * scale + 4 + j * line_h), text, fill="black", font=font)
    return sheet
