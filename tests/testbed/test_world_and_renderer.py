"""The renderer is deterministic, draws each cue where the oracle reads it, and the table is biased."""

import numpy as np

from testbed.data import render_balanced, render_empties
from testbed.oracle import read_batch
from testbed.renderer import Person, render
from testbed.world import ATTRIBUTES, OCCUPATIONS, TEST_OCCUPATIONS, TRAIN_OCCUPATIONS, sample_people


def test_render_is_deterministic_per_seed():
    p = Person(occupation=3, gender=0, skin_tone=2, age=1)
    assert np.array_equal(render(p, 11), render(p, 11))
    assert not np.array_equal(render(p, 11), render(p, 12))


def test_occupation_cues_are_unique_and_split_is_disjoint():
    cues = {(o.background, o.shirt) for o in OCCUPATIONS}
    assert len(OCCUPATIONS) >= 16 and len(cues) == len(OCCUPATIONS)
    assert not set(TRAIN_OCCUPATIONS) & set(TEST_OCCUPATIONS)
    assert len(TRAIN_OCCUPATIONS) + len(TEST_OCCUPATIONS) == len(OCCUPATIONS)


def test_table_is_stereotyped():
    p_female = [o.p_female for o in OCCUPATIONS]
    assert min(p_female) <= 0.12 and max(p_female) >= 0.88
    assert np.mean([o.skin_tone[0] for o in OCCUPATIONS]) > 0.4  # skewed towards I
    assert np.mean([o.p_young for o in OCCUPATIONS]) > 0.65  # mostly young


def test_captions_follow_the_table_and_name_attributes_sometimes():
    samples = sample_people(20_000, np.random.default_rng(0))
    nurse = [s for s in samples if OCCUPATIONS[s.occupation].name == "nurse"]
    share_female = np.mean([s.gender == 0 for s in nurse])
    assert abs(share_female - 0.88) < 0.05
    named = [s.caption for s in samples if "female" in s.caption or " old " in s.caption or "skin tone" in s.caption]
    assert 0.15 < len(named) / len(samples) < 0.5
    assert 0.05 < np.mean([s.caption == "" for s in samples]) < 0.15


def test_oracle_reads_renderer_images_at_least_98_percent():
    images, labels = render_balanced(600, seed=123)
    readings = read_batch(images)
    assert np.mean([r.person for r in readings]) >= 0.98
    for j, attr in enumerate(["gender", "skin_tone", "age"], start=1):
        acc = np.mean([getattr(r, attr) == ATTRIBUTES[attr][lab[j]] for r, lab in zip(readings, labels)])
        assert acc >= 0.98, attr
    occ = np.mean([r.occupation == OCCUPATIONS[lab[0]].name for r, lab in zip(readings, labels)])
    assert occ >= 0.98


def test_oracle_finds_no_person_in_empty_scenes():
    readings = read_batch(render_empties(200, seed=9))
    assert np.mean([r.person for r in readings]) <= 0.02


def test_palette_fit_tells_world_images_from_smeared_ones():
    """The readers benchmark's "world-like" split rests on this: renders fit the palette, smeared colours do not."""
    from testbed.oracle import palette_fit

    x, _ = render_balanced(64, 11)
    renders = np.clip((x.transpose(0, 2, 3, 1) + 1) / 2, 0, 1)
    fits = [palette_fit(im) for im in renders]
    assert min(fits) > 0.85
    # the same people with every colour pulled half way to grey: a face "between" every palette colour
    smeared = [palette_fit(0.5 * im + 0.25) for im in renders]
    assert max(smeared) < 0.5
