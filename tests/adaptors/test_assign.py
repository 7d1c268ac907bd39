"""Exact class assignment (fair rounding, joint classes, ledger deficits) and per-image conditioning."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from adaptors.assign import (
    ClassifierGuidance,
    ClassTexts,
    augment_prompt,
    class_texts_for_testbed,
    deficit_assignment,
    fair_round,
    generate_assigned,
    generate_directed,
    joint_assignment,
    joint_key,
    largest_remainder,
)
from adaptors.generation import GenerationCancelled, GenerationSpec, generate
from testbed.oracle import read_batch
from testbed.world import ATTRIBUTES, OCCUPATIONS, attribute_prompt, prompt_for
from tests.support.models import load_testbed_classifier, load_testbed_pipeline

GENDER_AGE = {"gender": {"female": 0.5, "male": 0.5}, "age": {"young": 0.3, "old": 0.7}}
HALF = {"gender": {"female": 0.5, "male": 0.5}}
# Measured on the committed testbed (50/50, 20 steps, gs 5): weight 30 gives per-image accuracy ~.81-.94 on senator
# (female-assigned .63-.88, male-assigned 1.0) and ~.98 on secretary with the occupation kept in >= 97% of images;
# 40 and above start to lose the occupation (.80-.90), 50 loses it badly (.56-.66).
GUIDANCE_WEIGHT = 30.0


# ------------------------------------------------------------------ splitting


@pytest.mark.parametrize(
    ("n", "shares", "expected"),
    [
        (1, {"female": 0.3, "male": 0.7}, {"female": 0, "male": 1}),
        (8, {"female": 0.3, "male": 0.7}, {"female": 2, "male": 6}),  # 2.4 / 5.6
        (10, {"female": 0.3, "male": 0.7}, {"female": 3, "male": 7}),
        (7, {"female": 0.5, "male": 0.5}, {"female": 4, "male": 3}),  # tie: the class listed first
        (7, {"male": 0.5, "female": 0.5}, {"male": 4, "female": 3}),
        (10, {"I": 0.4, "II": 0.3, "III": 0.2, "IV": 0.1}, {"I": 4, "II": 3, "III": 2, "IV": 1}),
        (7, {"I": 0.4, "II": 0.3, "III": 0.2, "IV": 0.1}, {"I": 3, "II": 2, "III": 1, "IV": 1}),  # 2.8 2.1 1.4 .7
        (0, {"female": 0.5, "male": 0.5}, {"female": 0, "male": 0}),
        (3, {"female": 1.0, "male": 0.0}, {"female": 3, "male": 0}),
    ],
)
def test_largest_remainder_hand_cases(n, shares, expected):
    assert largest_remainder(n, shares) == expected


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 13, 64, 999, 1000])
def test_largest_remainder_sums_to_n_and_stays_within_one_of_the_quota(n):
    shares = {"I": 0.4, "II": 0.3, "III": 0.2, "IV": 0.1}
    counts = largest_remainder(n, shares)
    assert sum(counts.values()) == n
    assert all(abs(counts[c] - n * p) < 1 for c, p in shares.items())
    if n == 1000:
        assert counts == {"I": 400, "II": 300, "III": 200, "IV": 100}


def test_largest_remainder_rejects_bad_shares():
    with pytest.raises(ValueError):
        largest_remainder(4, {"a": 0.0, "b": 0.0})
    with pytest.raises(ValueError):
        largest_remainder(4, {"a": -0.5, "b": 1.5})
    with pytest.raises(ValueError):
        largest_remainder(-1, {"a": 1.0})


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 13, 64, 999, 1000])
def test_fair_round_sums_to_n_and_gives_each_class_the_floor_or_ceiling_of_its_quota(n):
    shares = {"I": 0.4, "II": 0.3, "III": 0.2, "IV": 0.1}
    for seed in range(20):
        counts = fair_round(n, shares, seed)
        assert sum(counts.values()) == n
        assert all(abs(counts[c] - n * p) < 1 for c, p in shares.items()), (seed, counts)
        assert counts == fair_round(n, shares, seed)  # deterministic for (n, shares, seed)


@pytest.mark.parametrize(
    ("n", "shares"),
    [
        (1, {"female": 0.5, "male": 0.5}),
        (1, {"female": 0.3, "male": 0.7}),
        (3, {"female": 0.5, "male": 0.5}),
        (1, {"I": 0.25, "II": 0.25, "III": 0.25, "IV": 0.25}),
        (7, {"I": 0.4, "II": 0.3, "III": 0.2, "IV": 0.1}),
    ],
)
def test_fair_round_favours_no_class_over_seeds(n, shares):
    """Over 2,000 seeds each class's mean count is n * share (4 standard errors), whichever class is named first."""
    seeds = 2000
    totals = Counter()
    for seed in range(seeds):
        totals.update(fair_round(n, shares, seed))
    for cls, p in shares.items():
        frac = n * p % 1.0
        tolerance = 4 * (frac * (1 - frac) / seeds) ** 0.5 + 1e-9
        assert abs(totals[cls] / seeds - n * p) <= tolerance, (cls, totals[cls] / seeds, n * p)


def test_single_image_requests_follow_a_30_70_target_on_average():
    target = {"gender": {"female": 0.3, "male": 0.7}}
    female = sum(joint_assignment(1, target, seed)[0]["gender"] == "female" for seed in range(400))
    assert abs(female / 400 - 0.3) < 4 * (0.3 * 0.7 / 400) ** 0.5


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 10, 16, 33, 1000])
def test_joint_assignment_marginals_follow_each_attributes_split(n):
    assigned = joint_assignment(n, GENDER_AGE, seed=3)
    assert len(assigned) == n
    for attr, shares in GENDER_AGE.items():
        got = Counter(a[attr] for a in assigned)
        want = fair_round(n, shares, seed=3)
        assert all(abs(got[c] - want[c]) <= 1 for c in shares), (attr, dict(got), want)
    # joint counts follow the product of the marginals within one image
    joint = Counter((a["gender"], a["age"]) for a in assigned)
    for g, pg in GENDER_AGE["gender"].items():
        for y, py in GENDER_AGE["age"].items():
            assert abs(joint[(g, y)] - n * pg * py) < 1 + 1e-9


def test_balanced_joint_split_keeps_marginals_exact():
    """Two images at 50/50 x 50/50 must be one female and one male, not female/young + female/old."""
    target = {"gender": {"female": 0.5, "male": 0.5}, "age": {"young": 0.5, "old": 0.5}}
    for n in (2, 6, 10):
        assigned = joint_assignment(n, target, seed=0)
        assert Counter(a["gender"] for a in assigned) == Counter({"female": n // 2, "male": n // 2})
        assert Counter(a["age"] for a in assigned) == Counter({"young": n // 2, "old": n // 2})


def test_joint_assignment_is_deterministic_given_the_seed():
    a = joint_assignment(16, GENDER_AGE, seed=7)
    assert a == joint_assignment(16, GENDER_AGE, seed=7)
    b = joint_assignment(16, GENDER_AGE, seed=8)
    assert Counter(map(str, a)) == Counter(map(str, b))  # same counts ...
    assert a != b  # ... given to other image indices


def test_deficit_assignment_converges_for_single_image_requests():
    target = {"gender": {"female": 0.3, "male": 0.7}}
    delivered: Counter[str] = Counter()
    for _ in range(200):
        (classes,) = deficit_assignment(1, target, delivered)
        delivered[joint_key(classes, ["gender"])] += 1
        total = sum(delivered.values())
        assert abs(delivered["gender=female"] - 0.3 * total) < 1
    assert delivered == Counter({"gender=female": 60, "gender=male": 140})


def test_deficit_assignment_corrects_past_errors_first():
    target = {"gender": {"female": 0.5, "male": 0.5}}
    # 10 male delivered so far (conditioning misses): the next 4 all go to female
    assert deficit_assignment(4, target, {"gender=male": 10}) == [{"gender": "female"}] * 4
    multi = deficit_assignment(12, GENDER_AGE, {})
    assert Counter((a["gender"], a["age"]) for a in multi) == Counter(
        {("female", "old"): 4, ("male", "old"): 4, ("female", "young"): 2, ("male", "young"): 2}
    )


# ------------------------------------------------------------------ prompt texts


def test_testbed_prompts_are_phrased_like_the_training_captions():
    texts = class_texts_for_testbed()
    assert (
        augment_prompt(prompt_for("senator"), {"gender": "female", "age": "old"}, texts)
        == "a photo of the face of an old female senator, a person"
    )
    for occ in OCCUPATIONS:
        for classes in ({"gender": "male"}, {"age": "young", "gender": "female"}, {"skin_tone": "III"}):
            assert augment_prompt(prompt_for(occ.name), classes, texts) == attribute_prompt(occ.name, classes)
    for tone in ATTRIBUTES["skin_tone"]:
        full = {"gender": "male", "skin_tone": tone, "age": "old"}
        assert augment_prompt(prompt_for("engineer"), full, texts) == attribute_prompt("engineer", full)


def test_generic_texts_append_and_config_can_override():
    generic = ClassTexts.from_dict({"words": {"gender": {"female": "woman", "male": "man"}}})
    assert augment_prompt("an astronaut riding a horse", {"gender": "female"}, generic) == "an astronaut riding a horse, woman"
    inserting = ClassTexts.from_dict(
        {
            "words": {"gender": {"female": "female", "male": "male"}},
            "adjectives": ["gender"],
            "subject_pattern": r"^(?P<head>[^,]*\b)(?P<article>an?) (?P<subject>[^,]+?)(?P<tail>(?:,.*)?)$",
        }
    )
    assert augment_prompt("a photo of an engineer", {"gender": "female"}, inserting) == "a photo of a female engineer"
    with pytest.raises(ValueError, match="unknown ClassTexts keys"):
        ClassTexts.from_dict({"words": {}, "adjectivs": []})


# ------------------------------------------------------------------ generation on the testbed


def _oracle(images: torch.Tensor):
    return read_batch((images * 2 - 1).numpy())


@pytest.mark.slow
def test_guidance_at_weight_zero_is_plain_generation():
    """Same noise per image index as generate(): weight 0 (or warm-up past the end) changes no pixel."""
    pipe = load_testbed_pipeline()
    spec = GenerationSpec(prompt_for("senator"), num_images=3, seed=3, steps=6, start_index=2)
    assigned = joint_assignment(3, HALF, seed=3)
    plain = generate(pipe, spec)
    texts = class_texts_for_testbed()
    assert torch.allclose(generate_assigned(pipe, spec, assigned, texts, "guidance", 0.0, 0), plain, atol=1e-5)
    assert torch.allclose(generate_assigned(pipe, spec, assigned, texts, "guidance", 30.0, 6), plain, atol=1e-5)
    guided = generate_assigned(pipe, spec, assigned, texts, "guidance", 30.0, 0, max_batch=2)
    assert (guided - plain).abs().max() > 0.05


@pytest.mark.slow
def test_guidance_reports_progress_and_cancels_between_steps():
    pipe = load_testbed_pipeline()
    seen: list[tuple[int, int]] = []

    def on_step(step: int, total: int) -> None:
        seen.append((step, total))
        if step == 3:
            raise GenerationCancelled

    spec = GenerationSpec(prompt_for("senator"), num_images=3, steps=4)
    with pytest.raises(GenerationCancelled):
        generate_assigned(pipe, spec, joint_assignment(3, HALF, 0), class_texts_for_testbed(), "guidance", 30.0, 0, on_step, 2)
    assert seen == [(1, 8), (2, 8), (3, 8)]


def test_assignment_length_and_mode_are_checked():
    pipe = load_testbed_pipeline()
    spec = GenerationSpec(prompt_for("senator"), num_images=2, steps=2)
    with pytest.raises(ValueError, match="assignment has 1"):
        generate_assigned(pipe, spec, [{"gender": "female"}], class_texts_for_testbed())
    with pytest.raises(ValueError, match="mode"):
        generate_assigned(pipe, spec, joint_assignment(2, HALF, 0), class_texts_for_testbed(), mode="magic")  # type: ignore[arg-type]


def _female_and_occupation(occupation: str, mode: str, weight: float = 0.0) -> tuple[int, float]:
    """Female count and occupation-kept share of 16 images assigned 8 female / 8 male (oracle readings)."""
    pipe = load_testbed_pipeline()
    assigned = joint_assignment(16, HALF, seed=12)
    spec = GenerationSpec(prompt_for(occupation), num_images=16, seed=12, steps=20)
    if mode == "none":
        images = generate(pipe, spec)
    else:
        images = generate_assigned(pipe, spec, assigned, class_texts_for_testbed(), mode, weight, 0)  # type: ignore[arg-type]
    readings = _oracle(images)
    female = sum(r.gender == "female" for r in readings)
    kept = sum(r.occupation == occupation for r in readings) / len(readings)
    return female, kept


@pytest.mark.slow
def test_prompt_mode_moves_doctors_towards_the_assignment_over_several_seeds():
    """Prompt augmentation alone, read by the oracle over 5 seeds of 16 images (8 female / 8 male assigned).

    Measured over 10 seeds: 4-7 women per 16 (mean 5.6; the model's prior is ~20%), the image's gender equal to
    its assignment in 12-15 of 16, every occupation kept. It moves the split but does not reach it, which is
    why `assign` uses guidance by default."""
    pipe = load_testbed_pipeline()
    female = matched = kept = total = 0
    for seed in range(5):
        assigned = joint_assignment(16, HALF, seed)
        spec = GenerationSpec(prompt_for("doctor"), num_images=16, seed=seed, steps=20)
        readings = _oracle(generate_assigned(pipe, spec, assigned, class_texts_for_testbed(), "prompt", 0.0, 0))
        female += sum(r.gender == "female" for r in readings)
        matched += sum(r.gender == a["gender"] for r, a in zip(readings, assigned))
        kept += sum(r.occupation == "doctor" for r in readings)
        total += len(readings)
    assert 0.28 <= female / total <= 0.6
    assert matched / total >= 0.72
    assert kept / total >= 0.95


@pytest.mark.slow
def test_guidance_mode_meets_eight_of_sixteen_secretaries_and_keeps_the_occupation():
    """Held-out, ~90% female in the model: measured within 1 of 8 in 6 of 6 seeds at weight 30."""
    female, kept = _female_and_occupation("secretary", "guidance", GUIDANCE_WEIGHT)
    assert abs(female - 8) <= 1
    assert kept >= 0.9


@pytest.mark.slow
def test_guidance_mode_moves_senators_towards_the_assignment_and_keeps_the_occupation():
    """Held-out, ~12% female in the model: guidance lifts the female count well above the prior.

    Not "within 1 of 8": measured over 6 seeds at weight 30 the female counts were 4-8 of 8
    (female-assigned accuracy ~.73, male-assigned 1.0); exact counts are enforcement's job.
    """
    plain, _ = _female_and_occupation("senator", "none")
    female, kept = _female_and_occupation("senator", "guidance", GUIDANCE_WEIGHT)
    assert female >= plain + 3
    assert 4 <= female <= 9
    assert kept >= 0.9


@pytest.mark.slow
def test_guided_image_i_does_not_depend_on_chunking_and_several_attributes_run_in_one_pass():
    pipe = load_testbed_pipeline()
    target = {"gender": {"female": 0.5, "male": 0.5}, "skin_tone": {"I": 0.25, "II": 0.25, "III": 0.25, "IV": 0.25}}
    assigned = joint_assignment(5, target, seed=4)
    spec = GenerationSpec(prompt_for("teacher"), num_images=5, seed=4, steps=4)
    texts = class_texts_for_testbed()
    whole = generate_assigned(pipe, spec, assigned, texts, "guidance", 10.0, 1, max_batch=5)
    chunked = generate_assigned(pipe, spec, assigned, texts, "guidance", 10.0, 1, max_batch=2)
    assert whole.shape == (5, 3, 32, 32) and 0.0 <= whole.min() and whole.max() <= 1.0
    assert torch.allclose(whole, chunked, atol=1e-4)
    both = generate_assigned(pipe, spec, assigned, texts, "both", 10.0, 1, max_batch=5)
    assert (both - whole).abs().max() > 1e-3  # "both" conditions CFG on the augmented prompt


@pytest.mark.slow
def test_classifier_guidance_reaches_the_middle_skin_tones_text_directions_miss():
    """Tone II/III senators: text group directions land on the extremes; classifier guidance on the middle.

    Measured (16 images per class, seed 777): text directions at w=30 gave II 0/32, III 3/32; classifier
    guidance 0.3 without text directions for skin tone gave 14/16 each, occupation kept.
    """
    pipe, classifier, texts = load_testbed_pipeline(), load_testbed_classifier(), class_texts_for_testbed()
    assigned = [{"skin_tone": "II"}] * 4 + [{"skin_tone": "III"}] * 4
    spec = GenerationSpec(prompt_for("senator"), num_images=8, seed=777, steps=20, guidance_scale=5.0)
    text_only = _oracle(generate_assigned(pipe, spec, assigned, texts, "both", GUIDANCE_WEIGHT, 0))
    steered = _oracle(generate_assigned(pipe, spec, assigned, texts, "both", GUIDANCE_WEIGHT, 0,
                                        classifier=classifier, classifier_scale=0.3))  # fmt: skip
    hits = lambda readings: sum(r.skin_tone == a["skin_tone"] for r, a in zip(readings, assigned))  # noqa: E731
    assert hits(steered) >= 6, [r.skin_tone for r in steered]
    assert hits(steered) >= hits(text_only) + 3, ([r.skin_tone for r in text_only], [r.skin_tone for r in steered])
    assert sum(r.occupation == "senator" for r in steered) >= 7


def test_classifier_guidance_leaves_two_class_attributes_to_text_and_checks_its_length():
    """Scale 0, or a target of two-class attributes only, is exactly the text-direction result."""
    pipe, classifier, texts = load_testbed_pipeline(), load_testbed_classifier(), class_texts_for_testbed()
    spec = GenerationSpec(prompt_for("senator"), num_images=2, seed=4, steps=4)
    assigned = joint_assignment(2, HALF, seed=4)
    plain = generate_assigned(pipe, spec, assigned, texts, "both", 10.0, 0)
    for scale in (0.0, 0.3):
        steered = generate_assigned(pipe, spec, assigned, texts, "both", 10.0, 0, classifier=classifier, classifier_scale=scale)
        assert torch.equal(plain, steered)
    skin = [{"skin_tone": "II"}, {"skin_tone": "III"}]
    assert not torch.equal(
        generate_assigned(pipe, spec, skin, texts, "both", 10.0, 0),
        generate_assigned(pipe, spec, skin, texts, "both", 10.0, 0, classifier=classifier, classifier_scale=0.3),
    )
    with pytest.raises(ValueError, match="classifier_guidance has 1"):
        generate_directed(pipe, spec, [[], []], classifier_guidance=ClassifierGuidance(classifier, [{"gender": "male"}], 0.3))


def test_consecutive_seeds_spread_the_leftover_images_evenly():
    """Clients often number their seeds: 40 one-image requests with seeds 0-39 at 30/70 assign 12 +- 1 women, where
    independent draws would wander by +-6 (two standard deviations)."""
    target = {"gender": {"female": 0.3, "male": 0.7}}
    for start in (0, 1000, 77_777):
        female = sum(joint_assignment(1, target, seed)[0]["gender"] == "female" for seed in range(start, start + 40))
        assert abs(female - 12) <= 1, (start, female)
