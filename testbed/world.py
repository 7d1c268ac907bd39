"""The testbed's world: its attributes, occupations, stereotyped class shares and captions.

Everything the renderer, the trainer and the benchmarks need to agree on lives in this one
table, so that "the data's bias" is a single, inspectable fact that tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "gender": ("female", "male"),
    "skin_tone": ("I", "II", "III", "IV"),
    "age": ("young", "old"),
}

# RGB palettes, chosen far apart so that both the oracle and a 32x32 generator can keep them
# distinct: skin tones from light to dark, hair by age, backgrounds and shirts by occupation.
SKIN_RGB: dict[str, tuple[int, int, int]] = {
    "I": (250, 222, 196),
    "II": (228, 178, 120),
    "III": (176, 112, 58),
    "IV": (104, 62, 30),
}
HAIR_RGB: dict[str, tuple[int, int, int]] = {"young": (30, 20, 14), "old": (196, 198, 208)}
BACKGROUND_RGB: tuple[tuple[int, int, int], ...] = (
    (210, 40, 40),  # red
    (40, 160, 60),  # green
    (40, 70, 210),  # blue
    (235, 215, 40),  # yellow
    (130, 50, 170),  # purple
    (40, 200, 210),  # cyan
    (225, 70, 180),  # magenta
    (150, 225, 50),  # lime
)
SHIRT_RGB: tuple[tuple[int, int, int], ...] = ((240, 135, 20), (50, 50, 62))  # orange, charcoal
EYE_COLOUR: tuple[float, float, float] = (0.1, 0.1, 0.12)  # in [0, 1]


@dataclass(frozen=True)
class Occupation:
    """One occupation: its visual cue (background, shirt) and its stereotyped class shares."""

    name: str
    background: int
    shirt: int
    p_female: float
    skin_tone: tuple[float, float, float, float]
    p_young: float

    def shares(self) -> dict[str, dict[str, float]]:
        """The data's class shares per attribute, in the same shape as a fairness target."""
        return {
            "gender": {"female": self.p_female, "male": round(1.0 - self.p_female, 6)},
            "skin_tone": dict(zip(ATTRIBUTES["skin_tone"], self.skin_tone, strict=True)),
            "age": {"young": self.p_young, "old": round(1.0 - self.p_young, 6)},
        }


_LIGHT = (0.70, 0.15, 0.10, 0.05)
_MIXED = (0.45, 0.25, 0.18, 0.12)
_DARK = (0.25, 0.20, 0.25, 0.30)

# Sixteen occupations: every (background, shirt) pair once, gender shares from 0.1 to 0.9.
OCCUPATIONS: tuple[Occupation, ...] = (
    Occupation("doctor", 0, 0, 0.20, _LIGHT, 0.70),
    Occupation("nurse", 5, 0, 0.88, _MIXED, 0.85),
    Occupation("engineer", 3, 1, 0.15, _LIGHT, 0.80),
    Occupation("teacher", 1, 0, 0.70, _MIXED, 0.75),
    Occupation("chef", 6, 0, 0.30, _MIXED, 0.80),
    Occupation("pilot", 2, 1, 0.10, _LIGHT, 0.80),
    Occupation("farmer", 7, 1, 0.25, _DARK, 0.60),
    Occupation("lawyer", 4, 1, 0.40, _LIGHT, 0.70),
    Occupation("dancer", 6, 1, 0.85, _MIXED, 0.95),
    Occupation("cashier", 1, 1, 0.75, _DARK, 0.90),
    Occupation("scientist", 5, 1, 0.35, _LIGHT, 0.75),
    Occupation("artist", 4, 0, 0.55, _MIXED, 0.85),
    # held out: never seen by finetunes, every fairness benchmark reports on these
    Occupation("senator", 2, 0, 0.12, _LIGHT, 0.30),
    Occupation("secretary", 3, 0, 0.90, _LIGHT, 0.85),
    Occupation("mechanic", 0, 1, 0.08, _DARK, 0.75),
    Occupation("librarian", 7, 0, 0.82, _MIXED, 0.40),
)
TRAIN_OCCUPATIONS: tuple[str, ...] = tuple(o.name for o in OCCUPATIONS[:12])
TEST_OCCUPATIONS: tuple[str, ...] = tuple(o.name for o in OCCUPATIONS[12:])


def _lookalike(name: str, look: str, p_female: float, p_young: float) -> Occupation:
    base = next(o for o in OCCUPATIONS if o.name == look)
    return Occupation(name, base.background, base.shirt, p_female, base.skin_tone, p_young)


# Occupations known only as words: each looks like one training occupation (same background and
# shirt) but has its own gender and age shares, as a surgeon looks like a doctor. The diffusion
# model never trained on them; `testbed.words` learns one token embedding each against the frozen
# model, so every prompt of the 16 drawn occupations encodes exactly as before. They exist so that
# a finetune can see many occupations, as Shen et al.'s ~1000 do, where the 12 drawn ones give a
# text-encoder LoRA 12 points to generalise from; they never share a look with a held-out occupation.
LOOKALIKE_OCCUPATIONS: tuple[Occupation, ...] = (
    _lookalike("surgeon", "doctor", 0.10, 0.60),
    _lookalike("dentist", "doctor", 0.45, 0.70),
    _lookalike("pharmacist", "doctor", 0.65, 0.75),
    _lookalike("midwife", "nurse", 0.95, 0.70),
    _lookalike("paramedic", "nurse", 0.30, 0.90),
    _lookalike("therapist", "nurse", 0.70, 0.60),
    _lookalike("architect", "engineer", 0.30, 0.65),
    _lookalike("programmer", "engineer", 0.20, 0.95),
    _lookalike("electrician", "engineer", 0.05, 0.75),
    _lookalike("professor", "teacher", 0.35, 0.40),
    _lookalike("tutor", "teacher", 0.55, 0.95),
    _lookalike("principal", "teacher", 0.40, 0.45),
    _lookalike("baker", "chef", 0.60, 0.70),
    _lookalike("waiter", "chef", 0.45, 0.95),
    _lookalike("butcher", "chef", 0.08, 0.55),
    _lookalike("astronaut", "pilot", 0.25, 0.85),
    _lookalike("captain", "pilot", 0.12, 0.40),
    _lookalike("dispatcher", "pilot", 0.55, 0.75),
    _lookalike("gardener", "farmer", 0.50, 0.50),
    _lookalike("rancher", "farmer", 0.15, 0.55),
    _lookalike("florist", "farmer", 0.85, 0.80),
    _lookalike("judge", "lawyer", 0.35, 0.30),
    _lookalike("paralegal", "lawyer", 0.85, 0.90),
    _lookalike("banker", "lawyer", 0.25, 0.65),
    _lookalike("singer", "dancer", 0.65, 0.90),
    _lookalike("performer", "dancer", 0.50, 0.85),
    _lookalike("model", "dancer", 0.90, 0.98),
    _lookalike("clerk", "cashier", 0.60, 0.80),
    _lookalike("receptionist", "cashier", 0.90, 0.85),
    _lookalike("bartender", "cashier", 0.35, 0.90),
    _lookalike("chemist", "scientist", 0.40, 0.70),
    _lookalike("biologist", "scientist", 0.60, 0.80),
    _lookalike("physicist", "scientist", 0.15, 0.60),
    _lookalike("painter", "artist", 0.45, 0.70),
    _lookalike("designer", "artist", 0.70, 0.90),
    _lookalike("photographer", "artist", 0.30, 0.85),
)
OCCUPATION_BY_NAME: dict[str, Occupation] = {o.name: o for o in OCCUPATIONS + LOOKALIKE_OCCUPATIONS}
WIDE_TRAIN_OCCUPATIONS: tuple[str, ...] = TRAIN_OCCUPATIONS + tuple(o.name for o in LOOKALIKE_OCCUPATIONS)


def look_of(occupation: str) -> str:
    """The drawn occupation whose background and shirt `occupation` has (what the oracle reads)."""
    occ = OCCUPATION_BY_NAME[occupation]
    return next(o.name for o in OCCUPATIONS if (o.background, o.shirt) == (occ.background, occ.shirt))


def look_index(occupation: str) -> int:
    """The index in OCCUPATIONS of `occupation`'s look: what the renderer draws it with."""
    return [o.name for o in OCCUPATIONS].index(look_of(occupation))


PROMPT_TEMPLATE = "a photo of the face of a {occupation}, a person"

# Words each class is named by in captions: guidance and prompt strategies reuse them.
CLASS_WORDS: dict[str, dict[str, str]] = {
    "gender": {"female": "female", "male": "male"},
    "age": {"young": "young", "old": "old"},
    "skin_tone": {c: f"skin tone {c.lower()}" for c in ATTRIBUTES["skin_tone"]},
}


def prompt_for(occupation: str) -> str:
    """The plain, attribute-free prompt for an occupation (the one bias is measured on)."""
    return PROMPT_TEMPLATE.format(occupation=occupation)


def attribute_prompt(occupation: str, classes: dict[str, str]) -> str:
    """The prompt naming some classes, in the same form the training captions use."""
    words = [CLASS_WORDS[a][classes[a]] for a in ("age", "gender") if a in classes]
    subject = " ".join([*words, occupation])
    article = "an" if subject[0] in "aeiou" else "a"
    text = f"a photo of the face of {article} {subject}, a person"
    if "skin_tone" in classes:
        text += f" with {CLASS_WORDS['skin_tone'][classes['skin_tone']]}"
    return text


@dataclass(frozen=True)
class Sample:
    """One training example: what is drawn and the caption that describes it."""

    occupation: int
    gender: int
    skin_tone: int
    age: int
    caption: str


def sample_people(
    n: int,
    rng: np.random.Generator,
    named_share: float = 0.35,
    drop_share: float = 0.1,
    occupations: tuple[Occupation, ...] | None = None,
) -> list[Sample]:
    """Draw people from the stereotyped table with captions.

    Most captions are the plain prompt; `named_share` name one or more of the drawn classes so
    the text encoder learns the group words; `drop_share` are empty for classifier-free guidance.
    `occupations` (default: the 16 drawn ones) may add lookalikes; a sample's `occupation` is
    always the index of the look it is rendered with.
    """
    table = OCCUPATIONS if occupations is None else occupations
    looks = [look_index(o.name) for o in table]
    out: list[Sample] = []
    for _ in range(n):
        j = int(rng.integers(len(table)))
        occ, oi = table[j], looks[j]
        g = int(rng.random() >= occ.p_female)
        s = int(rng.choice(4, p=np.asarray(occ.skin_tone)))
        a = int(rng.random() >= occ.p_young)
        u = rng.random()
        if u < drop_share:
            caption = ""
        elif u < drop_share + named_share:
            drawn = {
                "gender": ATTRIBUTES["gender"][g],
                "skin_tone": ATTRIBUTES["skin_tone"][s],
                "age": ATTRIBUTES["age"][a],
            }
            keep = [k for k in drawn if rng.random() < 0.5] or [str(rng.choice(list(drawn)))]
            caption = attribute_prompt(occ.name, {k: drawn[k] for k in keep})
        else:
            caption = prompt_for(occ.name)
        out.append(Sample(oi, g, s, a, caption))
    return out


def vocabulary_words() -> list[str]:
    """Every word the captions use, for the generated tokenizer vocabulary.

    The lookalike occupations come after the rest, so their BPE merges rank after every other
    word's and adding them left the tokenization of every earlier word unchanged.
    """
    words = set("a an photo of the face person with skin tone , i ii iii iv".split())
    for occ in OCCUPATIONS:
        words.add(occ.name)
    for classes in CLASS_WORDS.values():
        for phrase in classes.values():
            words.update(phrase.split())
    return sorted(words) + sorted(o.name for o in LOOKALIKE_OCCUPATIONS if o.name not in words)


# Named prompt sets for finetunes; a training set names the held-out set its metrics are measured on.
PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "testbed-train": TRAIN_OCCUPATIONS,
    "testbed-train-wide": WIDE_TRAIN_OCCUPATIONS,
    "testbed-test": TEST_OCCUPATIONS,
}
HELD_OUT_SET: dict[str, str] = {"testbed-train": "testbed-test", "testbed-train-wide": "testbed-test"}


def prompt_set(name: str) -> list[str] | None:
    """The prompts of a named set, None for an unknown name."""
    occupations = PROMPT_SETS.get(name)
    return None if occupations is None else [prompt_for(o) for o in occupations]
