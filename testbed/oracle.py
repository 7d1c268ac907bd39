"""Rule-based oracle: reads attributes and occupation from pixels, independently of any model.

Used for evaluation only. It shares no weights with the attribute classifier, so when
benchmarks report the oracle's numbers, a debiasing method cannot have "fooled" it the way a
finetune can learn to fool the differentiable classifier it trains against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed.world import ATTRIBUTES, BACKGROUND_RGB, EYE_COLOUR, HAIR_RGB, OCCUPATIONS, SHIRT_RGB, SKIN_RGB

_BG = np.asarray(BACKGROUND_RGB, dtype=np.float32) / 255.0
_SHIRT = np.asarray(SHIRT_RGB, dtype=np.float32) / 255.0
_SKIN = np.asarray(list(SKIN_RGB.values()), dtype=np.float32) / 255.0
_HAIR = np.asarray(list(HAIR_RGB.values()), dtype=np.float32) / 255.0
_OCC_BY_CUE = {(o.background, o.shirt): i for i, o in enumerate(OCCUPATIONS)}

# Thresholds in pixels of a 32x32 image, set from renderer images (see tests/testbed).
_MIN_SKIN = 30
_MIN_HAIR = 6
_LONG_HAIR = 8
_MAX_COLOUR_DIST = 0.28


@dataclass(frozen=True)
class OracleReading:
    """What the oracle sees; attribute fields are None when no person was found."""

    person: bool
    occupation: str | None
    gender: str | None
    skin_tone: str | None
    age: str | None

    def classes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES if getattr(self, a) is not None}


def _nearest(colour: np.ndarray, palette: np.ndarray) -> tuple[int, float]:
    d = np.linalg.norm(palette - colour, axis=-1)
    return int(d.argmin()), float(d.min())


def read(image: np.ndarray) -> OracleReading:
    """Read one H x W x 3 image in [0, 1]."""
    h, w, _ = image.shape
    border = np.concatenate([image[:3, :].reshape(-1, 3), image[:16, :2].reshape(-1, 3), image[:16, -2:].reshape(-1, 3)])
    bg, bg_dist = _nearest(np.median(border, axis=0), _BG)
    shirt, shirt_dist = _nearest(np.median(image[-3:, w // 2 - 4 : w // 2 + 4].reshape(-1, 3), axis=0), _SHIRT)
    occupation = _OCC_BY_CUE.get((bg, shirt)) if max(bg_dist, shirt_dist) < _MAX_COLOUR_DIST else None

    # Label every pixel above the shoulders by its nearest palette colour among those present.
    upper = image[: h - 7]
    palette = np.concatenate([_BG[bg : bg + 1], _SHIRT[shirt : shirt + 1], _SKIN, _HAIR])
    dist = np.linalg.norm(upper[:, :, None, :] - palette[None, None], axis=-1)
    label = dist.argmin(-1)
    close = dist.min(-1) < _MAX_COLOUR_DIST
    skin = close & (label >= 2) & (label < 6)
    hair = close & (label >= 6)
    name = OCCUPATIONS[occupation].name if occupation is not None else None
    if skin.sum() < _MIN_SKIN or hair.sum() < _MIN_HAIR:
        return OracleReading(False, name, None, None, None)

    ys, xs = np.nonzero(skin)
    cy, cx = np.median(ys), np.median(xs)
    tone = int(np.bincount(label[skin] - 2, minlength=4).argmax())
    age = int(np.bincount(label[hair] - 6, minlength=2).argmax())
    hy, hx = np.nonzero(hair)
    beside_face = (hy > cy + 1) & (np.abs(hx - cx) > 3)
    gender = 0 if beside_face.sum() >= _LONG_HAIR else 1
    return OracleReading(
        True,
        name,
        ATTRIBUTES["gender"][gender],
        ATTRIBUTES["skin_tone"][tone],
        ATTRIBUTES["age"][age],
    )


_ALL_COLOURS = np.concatenate([_BG, _SHIRT, _SKIN, _HAIR, np.asarray([EYE_COLOUR], dtype=np.float32)])
_FIT_DISTANCE = 0.15


def palette_fit(image: np.ndarray) -> float:
    """How much an H x W x 3 image in [0, 1] looks like the world: the share of its pixels above the shoulders
    within 0.15 (RGB) of one of the world's colours. Renders are near 1 and VAE round-trips of renders above
    about 0.8; smeared, off-palette generations (strong guidance gone wrong) are lower. On such images the
    oracle's per-pixel vote still gives an answer, but no reader of the world can be held to it."""
    upper = image[: image.shape[0] - 7]
    dist = np.linalg.norm(upper[:, :, None, :] - _ALL_COLOURS[None, None], axis=-1).min(-1)
    return float((dist < _FIT_DISTANCE).mean())


def read_batch(images: np.ndarray) -> list[OracleReading]:
    """Read N x 3 x H x W images in [-1, 1] (renderer and pipeline tensor layout)."""
    hwc = np.clip((np.asarray(images, dtype=np.float32).transpose(0, 2, 3, 1) + 1.0) / 2.0, 0.0, 1.0)
    return [read(img) for img in hwc]
