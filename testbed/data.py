"""Rendered training sets: images with their true classes and captions, in memory."""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np

from testbed.renderer import Person, render_batch, render_empty
from testbed.world import sample_people


@dataclass
class RenderedSet:
    """N images in [-1, 1] (N x 3 x H x W) with per-image class indices and captions."""

    images: np.ndarray
    occupation: np.ndarray
    gender: np.ndarray
    skin_tone: np.ndarray
    age: np.ndarray
    captions: list[str]


def _render_chunk(args: tuple[list[Person], list[int]]) -> np.ndarray:
    people, seeds = args
    return render_batch(people, seeds).astype(np.float32)


def render_set(n: int, seed: int, workers: int = 2, **caption_kwargs: Any) -> RenderedSet:
    """Draw n people from the stereotyped table and render them (in `workers` processes)."""
    rng = np.random.default_rng(seed)
    samples = sample_people(n, rng, **caption_kwargs)
    people = [Person(s.occupation, s.gender, s.skin_tone, s.age) for s in samples]
    seeds = [seed * 1_000_003 + i for i in range(n)]
    chunk = max(1, -(-n // (workers * 4)))
    parts = [(people[i : i + chunk], seeds[i : i + chunk]) for i in range(0, n, chunk)]
    if workers > 1 and n > 256:
        with get_context("fork").Pool(workers) as pool:
            images = np.concatenate(pool.map(_render_chunk, parts))
    else:
        images = np.concatenate([_render_chunk(p) for p in parts])
    return RenderedSet(
        images=images,
        occupation=np.asarray([s.occupation for s in samples]),
        gender=np.asarray([s.gender for s in samples]),
        skin_tone=np.asarray([s.skin_tone for s in samples]),
        age=np.asarray([s.age for s in samples]),
        captions=[s.caption for s in samples],
    )


def render_balanced(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n people with uniformly drawn classes (for classifier and oracle accuracy), and labels.

    Labels are an N x 4 array: occupation, gender, skin_tone, age.
    """
    rng = np.random.default_rng(seed)
    labels = np.stack(
        [rng.integers(16, size=n), rng.integers(2, size=n), rng.integers(4, size=n), rng.integers(2, size=n)],
        axis=1,
    )
    people = [Person(*map(int, row)) for row in labels]
    return render_batch(people, [seed * 7919 + i for i in range(n)]).astype(np.float32), labels


def render_empties(n: int, seed: int) -> np.ndarray:
    """n images with no person, in [-1, 1]."""
    arr = np.stack([render_empty(seed * 104_729 + i) for i in range(n)])
    return (arr.transpose(0, 3, 1, 2) * 2.0 - 1.0).astype(np.float32)


def write_caption_folder(folder, n: int, seed: int) -> None:
    """Write n images drawn from the stereotyped table (the data the testbed's bias came from) as PNGs with a
    `metadata.jsonl` (`file_name`, `text`), the layout of diffusers' text-to-image examples; each row also keeps
    the drawn classes (`gender`, `skin_tone`, `age`, `occupation`), which a trainer may report agreement with but
    never trains on."""
    import json
    from pathlib import Path

    from PIL import Image

    from testbed.world import ATTRIBUTES, OCCUPATIONS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = render_set(n, seed)
    pixels = np.clip((data.images.transpose(0, 2, 3, 1) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    rows = []
    for i in range(n):
        name = f"{i:06d}.png"
        Image.fromarray(pixels[i]).save(folder / name)
        rows.append({"file_name": name, "text": data.captions[i],
                     "gender": ATTRIBUTES["gender"][data.gender[i]], "skin_tone": ATTRIBUTES["skin_tone"][data.skin_tone[i]],
                     "age": ATTRIBUTES["age"][data.age[i]], "occupation": OCCUPATIONS[data.occupation[i]].name})  # fmt: skip
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
