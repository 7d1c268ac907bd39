"""Deterministic renderer of stylised people: the ground truth the testbed model learns from.

Each sensitive attribute has its own visual cue (hair length for gender, skin colour for skin
tone, hair colour for age) and the occupation has its own (background and shirt colour), so
"what the image is about" can be checked apart from "who is in it".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed.world import ATTRIBUTES, BACKGROUND_RGB, EYE_COLOUR, HAIR_RGB, OCCUPATIONS, SHIRT_RGB, SKIN_RGB

IMAGE_SIZE = 32
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Person:
    """What one image shows; class indices follow `testbed.world.ATTRIBUTES` order."""

    occupation: int
    gender: int
    skin_tone: int
    age: int


def _palette(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float32) / 255.0


def render(person: Person, seed: int) -> np.ndarray:
    """One HxWx3 float image in [0, 1]; the same (person, seed) always gives the same pixels."""
    rng = np.random.default_rng(seed)
    occ = OCCUPATIONS[person.occupation]
    s = IMAGE_SIZE * _SUPERSAMPLE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / _SUPERSAMPLE + 0.5 / _SUPERSAMPLE
    cx = IMAGE_SIZE / 2 + rng.uniform(-2.0, 2.0)
    cy = 12.5 + rng.uniform(-1.5, 1.5)
    r = rng.uniform(5.6, 6.8)
    img = np.empty((s, s, 3), dtype=np.float32)
    img[:] = _palette(BACKGROUND_RGB[occ.background])

    hair = _palette(HAIR_RGB[ATTRIBUTES["age"][person.age]])
    shirt_top = cy + r + 1.5
    if person.gender == 0:  # long hair falls to the shoulders on both sides of the face
        long_hair = (np.abs(xx - cx) < r + 2.6) & (yy > cy - r - 1.0) & (yy < shirt_top + 1.0)
        img[long_hair] = hair
    half_width = r + 3.5 + rng.uniform(0.0, 1.5)
    shoulders = (yy >= shirt_top) & (np.abs(xx - cx) < half_width - np.maximum(0, shirt_top + 2 - yy) * 1.2)
    img[shoulders] = _palette(SHIRT_RGB[occ.shirt])
    neck = (np.abs(xx - cx) < r * 0.35) & (yy > cy) & (yy < shirt_top + 0.5)
    face = ((xx - cx) ** 2 + ((yy - cy) / 1.1) ** 2 < r**2) | neck
    img[face] = _palette(SKIN_RGB[ATTRIBUTES["skin_tone"][person.skin_tone]])
    cap = ((xx - cx) ** 2 + ((yy - cy) / 1.1) ** 2 < (r + 1.0) ** 2) & (yy < cy - r * 0.3)
    img[cap] = hair
    eyes = (np.abs(np.abs(xx - cx) - r * 0.4) < 0.7) & (np.abs(yy - cy - 0.5) < 0.7)
    img[eyes] = np.asarray(EYE_COLOUR, dtype=np.float32)

    small = img.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    small = small * rng.uniform(0.94, 1.06) + rng.normal(0.0, 0.02, small.shape)
    return np.clip(small, 0.0, 1.0).astype(np.float32)


def render_batch(people: list[Person], seeds: list[int]) -> np.ndarray:
    """N x 3 x H x W images in [-1, 1], the layout diffusers pipelines and the VAE use."""
    arr = np.stack([render(p, s) for p, s in zip(people, seeds, strict=True)])
    return arr.transpose(0, 3, 1, 2) * 2.0 - 1.0


def render_empty(seed: int) -> np.ndarray:
    """An image with no person: a background, sometimes a shirt or a skin-coloured blob."""
    rng = np.random.default_rng(seed)
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = _palette(BACKGROUND_RGB[int(rng.integers(len(BACKGROUND_RGB)))])
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    if rng.random() < 0.5:
        img[yy > 24] = _palette(SHIRT_RGB[int(rng.integers(2))])
    if rng.random() < 0.5:
        colours = [*SKIN_RGB.values(), *HAIR_RGB.values()]
        c = colours[int(rng.integers(len(colours)))]
        x0, y0 = rng.integers(0, 28, size=2)
        w, h = rng.integers(2, 6, size=2)
        img[y0 : y0 + h, x0 : x0 + w] = _palette(c)
    img = img + rng.normal(0.0, 0.02, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)
