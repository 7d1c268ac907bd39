"""Exact per-request class assignment and the per-image conditioning that realises it.

The `assign` strategy meets a request's `fairness_target` without any training: the request's
images are first split into exact per-class counts (each the floor or ceiling of its quota, the
leftover images drawn from the seed so no class is favoured: 8 images at 30/70 are 2/6 or 3/5,
2.4 women on average), each image index is given its class, and then every image is conditioned
on its own class inside one batched denoising pass. The split functions are pure and torch-free;
the conditioning part is the primitive that IDA reuses, so it takes explicit class texts rather than knowing about any one model.

Two conditioning modes, both per image:
- "prompt": the image's prompt names its classes ("a photo of the face of an old female
  senator, a person"); no extra cost over plain generation.
- "guidance": group-direction guidance in the style of Fair Diffusion / semantic guidance:
  eps = eps_u + gs (eps_p - eps_u) + w (eps_assigned - eps_p) - w/(K-1) sum_other (eps_other - eps_p),
  per attribute, after `warmup_steps`, with every text condition of a chunk in one UNet forward.
  (The eps_p terms cancel: the group term is w (eps_assigned - mean of the other groups' eps).)
- "both": CFG towards the augmented prompt, group directions on top; for one attribute the
  augmented prompt is the assigned group's text, so it costs no extra UNet rows over "guidance".

Measured on the testbed (held-out occupations, 50/50 gender, 20 steps, gs 5): the attribute
prompt alone barely moves held-out occupations (female senators: ~0-15% of female-assigned
images), while guidance at w = 30 gets ~.81-.94 per image on senator and ~.97 on secretary,
occupation kept; w >= 40 starts to lose the occupation. Guidance costs ~2x plain generation on
CPU (4 UNet rows per image instead of 2 for one two-class attribute).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # torch and diffusers only when images are made; the split functions stay cheap to import
    import torch
    from diffusers import StableDiffusionPipeline

    from adaptors.classifiers import AttributeClassifier
    from adaptors.generation import GenerationSpec, StepCallback

logger = logging.getLogger(__name__)

Target = Mapping[str, Mapping[str, float]]
"""{attribute: {class: probability}}, as validated by common.schemas.validate_target."""

Assignment = dict[str, str]
"""One image's classes: {attribute: class}."""

Mode = Literal["prompt", "guidance", "both"]

_ROUND = 9  # quotas are rounded to this many decimals so 10 * 0.7 = 7.000000000000001 floors to 7


# --------------------------------------------------------------------------------------------
# Exact splitting
# --------------------------------------------------------------------------------------------


def _quotas(n: int, shares: Mapping[str, float]) -> dict[str, float]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not shares:
        raise ValueError("shares must name at least one class")
    if any(not math.isfinite(p) or p < 0 for p in shares.values()):
        raise ValueError(f"shares must be finite and >= 0, got {dict(shares)}")
    total = float(sum(shares.values()))
    if total <= 0:
        raise ValueError(f"shares must not all be 0, got {dict(shares)}")
    return {c: round(n * p / total, _ROUND) for c, p in shares.items()}


def largest_remainder(n: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Exact integer counts summing to `n`, as close to `n * share` as integers allow, ties to the first class.

    Deterministic and seed-free, for places that need one fixed split (DFT's alignment targets);
    a request's split uses `fair_round`, which does not favour any class.
    """
    quotas = _quotas(n, shares)
    counts = {c: math.floor(q) for c, q in quotas.items()}
    left = n - sum(counts.values())
    names = list(quotas)
    order = sorted(range(len(names)), key=lambda i: (-(quotas[names[i]] % 1.0), i))
    for i in order[:left]:
        counts[names[i]] += 1
    return counts


def _rng(seed: int, *salt: str) -> np.random.Generator:
    """A generator that depends only on the seed and the names given, so every worker draws the same."""
    entropy = [int(seed) & 0xFFFFFFFF, 0xFA1D, *(zlib.crc32(s.encode()) for s in salt)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _spread(seed: int, *salt: str) -> float:
    """A point in [0, 1) for this seed: frac(seed * alpha + beta), alpha an irrational number chosen by `salt`.

    Uniform over random seeds, so a class's chance equals its fractional quota; and consecutive seeds
    (0, 1, 2, ... as clients often send them) spread evenly over [0, 1), so a run of one-image requests
    follows the target far closer than independent draws would (a low-discrepancy sequence). Different
    attributes get different alphas, so their draws are not tied to each other."""
    key = zlib.crc32("\x1f".join(salt).encode())
    alpha = math.sqrt(2 + key % 9973) % 1.0 or (math.sqrt(5) - 1) / 2  # sqrt of a non-square: irrational
    beta = (key >> 8) / float(1 << 24)
    return (int(seed) * alpha + beta) % 1.0


def fair_round(n: int, shares: Mapping[str, float], seed: int) -> dict[str, int]:
    """Exact integer counts summing to `n`, each the floor or ceiling of `n * share`, drawn so no class is favoured.

    Every class gets the floor of its quota; the images left over go to classes drawn by
    systematic sampling over the fractional parts from one point per seed (`_spread`), so a class
    gets its extra image with probability equal to its fractional quota. Over many requests each
    class's expected count is exactly `n * share`: a stream of 1-image requests at 30/70 is 30%
    female on average, where largest remainder made it all male. Deterministic for a given
    (n, shares, seed).
    """
    quotas = _quotas(n, shares)
    counts = {c: math.floor(q) for c, q in quotas.items()}
    left = n - sum(counts.values())
    if left <= 0:
        return counts
    point, edge, chosen = _spread(seed, *quotas), 0.0, []
    for name in quotas:
        edge += quotas[name] % 1.0
        if point < edge and len(chosen) < left:
            chosen.append(name)
            point += 1.0
    for name in sorted(quotas, key=lambda c: -(quotas[c] % 1.0)):  # float slack: top up from the largest fractions
        if len(chosen) >= left:
            break
        if name not in chosen:
            chosen.append(name)
    for name in chosen:
        counts[name] += 1
    return counts


def joint_classes(target: Target) -> list[tuple[str, ...]]:
    """Every combination of classes, attributes in target order, classes in their listed order."""
    return list(itertools.product(*[list(dist) for dist in target.values()]))


def joint_shares(target: Target) -> dict[tuple[str, ...], float]:
    """The joint distribution of independent marginals: the product of the marginal shares."""
    attrs = list(target)
    out: dict[tuple[str, ...], float] = {}
    for combo in joint_classes(target):
        p = 1.0
        for attr, cls in zip(attrs, combo):
            total = float(sum(target[attr].values()))
            p *= float(target[attr][cls]) / total
        out[combo] = p
    return out


def joint_key(classes: Mapping[str, str], attributes: Sequence[str]) -> str:
    """A stable string for a joint class ("gender=female,age=old"), usable as a Redis hash field."""
    return ",".join(f"{a}={classes[a]}" for a in attributes)


def joint_counts(n: int, target: Target, seed: int = 0) -> dict[tuple[str, ...], int]:
    """Exact counts over the joint classes, summing to `n`, whose marginals follow each attribute's fair split.

    Each attribute's counts are drawn by `fair_round`; the joint classes get the floors of their
    quotas, and each leftover image goes to the joint class whose marginal classes are most
    behind those counts, then the largest fractional part, then a seeded order (never the
    order the classes were named in). Marginals then match their own split (within 1 in every
    case the tests try, exactly in almost all).
    """
    attrs = list(target)
    shares = joint_shares(target)
    quotas = _quotas(n, shares)
    counts = {c: math.floor(q) for c, q in quotas.items()}
    marginal_goal = {a: fair_round(n, target[a], seed) for a in attrs}
    marginal = {a: dict.fromkeys(target[a], 0) for a in attrs}
    for combo, k in counts.items():
        for a, c in zip(attrs, combo):
            marginal[a][c] += k
    shuffled = _rng(seed, "joint", *attrs).permutation(len(quotas))
    order = {combo: int(shuffled[i]) for i, combo in enumerate(quotas)}
    candidates = {combo for combo, q in quotas.items() if q % 1.0 > 0}
    for _ in range(n - sum(counts.values())):
        pool = candidates or set(quotas)

        def rank(combo: tuple[str, ...]) -> tuple[float, float, int]:
            deficit = sum(marginal_goal[a][c] - marginal[a][c] for a, c in zip(attrs, combo))
            return (-deficit, -(quotas[combo] % 1.0), order[combo])

        best = min(pool, key=rank)
        candidates.discard(best)
        counts[best] += 1
        for a, c in zip(attrs, best):
            marginal[a][c] += 1
    return counts


def joint_assignment(n: int, target: Target, seed: int) -> list[Assignment]:
    """Each of `n` image indices with its classes; exact joint counts, seeded shuffle of who gets what.

    The shuffle decides which image index (and so which initial noise) gets which class; it is
    seeded so that a request repeated with the same seed gives the same images.
    """
    attrs = list(target)
    flat: list[tuple[str, ...]] = []
    for combo, k in joint_counts(n, target, seed).items():
        flat.extend([combo] * k)
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 0xA551]))
    order = perm.permutation(len(flat))
    return [dict(zip(attrs, flat[int(i)])) for i in order]


def deficit_assignment(n: int, target: Target, delivered_counts: Mapping[str, int]) -> list[Assignment]:
    """Classes for the next `n` images of a ledger: each goes to the joint class most behind its share.

    `delivered_counts` maps joint_key(...) strings to images delivered so far (keys of other
    joint classes are ignored). Image by image, the class with the largest deficit
    share * (delivered + 1) - count gets it (ties to the class listed first), and counts as
    delivered for the next one; this keeps every class within one image of its share, so a
    stream of single-image requests at 30/70 is exactly 60/140 after 200 images.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    attrs = list(target)
    shares = joint_shares(target)
    counts = {combo: int(delivered_counts.get(joint_key(dict(zip(attrs, combo)), attrs), 0)) for combo in shares}
    total = sum(counts.values())
    out: list[Assignment] = []
    for _ in range(n):
        best = max(shares, key=lambda c: (round(shares[c] * (total + 1) - counts[c], _ROUND), -list(shares).index(c)))
        counts[best] += 1
        total += 1
        out.append(dict(zip(attrs, best)))
    return out


# --------------------------------------------------------------------------------------------
# Naming classes in prompts
# --------------------------------------------------------------------------------------------

SUBJECT_PATTERN = r"^(?P<head>[^,]*\b)(?P<article>an?) (?P<subject>[^,]+?)(?P<tail>(?:,.*)?)$"


@dataclass(frozen=True)
class ClassTexts:
    """How a base model's prompts name each class; a base model config may override it via from_dict.

    `adjectives` are attributes named before the subject noun ("an old female senator"), in that
    order; `with_attributes` are named after the prompt ("..., a person with skin tone i"); any
    other attribute, or every attribute when the prompt has no "a/an <subject>" to insert into,
    is appended as ", <words>". `subject_pattern` finds the subject (None: always append).
    """

    words: dict[str, dict[str, str]]
    adjectives: tuple[str, ...] = ("age", "gender")
    with_attributes: tuple[str, ...] = ()
    subject_pattern: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassTexts:
        """Build from a plain mapping (JSON config); unknown keys are an error so typos are caught."""
        known = {"words", "adjectives", "with_attributes", "subject_pattern"}
        extra = set(data) - known
        if extra:
            raise ValueError(f"unknown ClassTexts keys {sorted(extra)}; known: {sorted(known)}")
        if "words" not in data:
            raise ValueError("ClassTexts needs 'words': {attribute: {class: text}}")
        return cls(
            words={a: {c: str(t) for c, t in ws.items()} for a, ws in data["words"].items()},
            adjectives=tuple(data.get("adjectives", ("age", "gender"))),
            with_attributes=tuple(data.get("with_attributes", ())),
            subject_pattern=data.get("subject_pattern"),
        )

    def word(self, attr: str, cls: str) -> str:
        """The text for one class; an unlisted class is named by itself (underscores as spaces)."""
        return self.words.get(attr, {}).get(cls, cls.replace("_", " "))

    def classes(self, attr: str) -> list[str]:
        return list(self.words.get(attr, {}))


def class_texts_for_testbed() -> ClassTexts:
    """The embedded testbed's caption phrasing, from its profile (for tests and benchmarks, which name it)."""
    from common.settings import TESTBED

    return class_texts_for(TESTBED)


GENERIC_CLASS_TEXTS = ClassTexts(
    words={
        "gender": {"female": "woman", "male": "man"},
        "age": {"young": "young", "old": "old"},
        "race": {
            "white": "white",
            "black": "black",
            "asian": "asian",
            "east_asian": "east asian",
            "southeast_asian": "southeast asian",
            "indian": "indian",
            "latino_hispanic": "latino",
            "middle_eastern": "middle eastern",
        },
    },
    adjectives=(),
)
"""For real Stable Diffusion: appended words (", woman, old"), which works for any prompt shape."""


def class_texts_for(model: str, override: Mapping[str, Any] | None = None) -> ClassTexts:
    """The class texts of a base model: the config's override, its profile's phrasing, or the generic one."""
    from adaptors.profiles import get_profile

    if override:
        return ClassTexts.from_dict(override)
    profile = get_profile(model)
    return profile.class_texts() if profile is not None and profile.class_texts is not None else GENERIC_CLASS_TEXTS


def augment_prompt(prompt: str, classes: Mapping[str, str], texts: ClassTexts) -> str:
    """The prompt naming `classes`: adjectives before the subject where the prompt has one, the rest appended."""
    adjective_words = [texts.word(a, classes[a]) for a in texts.adjectives if a in classes]
    with_words = [texts.word(a, classes[a]) for a in texts.with_attributes if a in classes]
    rest = [texts.word(a, c) for a, c in classes.items() if a not in texts.adjectives and a not in texts.with_attributes]
    text = prompt
    match = re.match(texts.subject_pattern, prompt) if texts.subject_pattern and classes else None
    if match:
        subject = " ".join([*adjective_words, match["subject"]])
        article = "an" if subject[:1].lower() in "aeiou" else "a"
        text = f"{match['head']}{article} {subject}{match['tail']}"
    else:
        rest = adjective_words + rest
    if with_words:
        text += " with " + " and ".join(with_words)
    if rest:
        text += ", " + ", ".join(rest)
    return text


# --------------------------------------------------------------------------------------------
# Generation with per-image classes
# --------------------------------------------------------------------------------------------


@dataclass
class _Conditions:
    """The text rows of one chunk: unique texts and, per image, which rows it reads."""

    texts: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    def add(self, text: str) -> int:
        if text not in self.index:
            self.index[text] = len(self.texts)
            self.texts.append(text)
        return self.index[text]


def generate_assigned(
    pipe: StableDiffusionPipeline,
    spec: GenerationSpec,
    assignment: Sequence[Mapping[str, str]],
    texts: ClassTexts,
    mode: Mode = "prompt",
    guidance_weight: float = 5.0,
    warmup_steps: int = 0,
    on_step: StepCallback | None = None,
    max_batch: int = 16,
    groups: Mapping[str, Sequence[str]] | None = None,
    classifier: AttributeClassifier | None = None,
    classifier_scale: float = 0.0,
) -> torch.Tensor:
    """Images in [0, 1] (N x 3 x H x W, CPU), image i conditioned on assignment[i].

    Image i starts from the same noise as generate()'s image i (spec.seed, spec.start_index), so
    with mode "guidance" and weight 0 the pixels equal plain generation. `groups` lists each
    attribute's classes to guide away from (default: the classes `texts` names, else the classes
    present in the assignment).

    With a `classifier` and `classifier_scale` > 0, attributes with more than two classes that the
    classifier reads are steered by classifier guidance towards each image's assigned class
    instead of text group directions: "away from the mean of the other groups" lands between
    them, which for skin tone is the middle classes the image was NOT assigned (testbed, senator,
    w = 30: tone II 0/32, III 3/32; classifier guidance 0.3 without text directions: 14/16 each,
    occupation kept). Two-class attributes keep their text directions, which land ~.95 of images
    already; adding classifier guidance to them lowered senator's gender hits on the benchmark.
    """
    from adaptors.generation import generate

    if len(assignment) != spec.num_images:
        raise ValueError(f"assignment has {len(assignment)} entries for num_images={spec.num_images}")
    base_prompts = spec.prompt_list()
    if mode not in ("prompt", "guidance", "both"):
        raise ValueError(f"mode must be 'prompt', 'guidance' or 'both', got {mode!r}")
    steer = None
    if classifier is not None and classifier_scale > 0:
        steered = {a for a, names in classifier.attributes.items() if len(names) > 2}
        per_image = [{a: c for a, c in classes.items() if a in steered} for classes in assignment]
        if any(per_image):
            steer = ClassifierGuidance(classifier, per_image, classifier_scale)
    if mode == "prompt":
        prompts = [augment_prompt(p, a, texts) for p, a in zip(base_prompts, assignment)]
        if steer is None:
            return generate(pipe, replace(spec, prompts=prompts), max_batch=max_batch, on_step=on_step)
        no_directions: list[list[Direction]] = [[] for _ in assignment]
        return generate_directed(pipe, replace(spec, prompts=prompts), no_directions, 0, on_step, max_batch, steer)
    cfg_prompts, directions = _assigned_conditions(base_prompts, assignment, texts, mode, guidance_weight, groups,
                                                   steer.classes if steer is not None else ())  # fmt: skip
    return generate_directed(pipe, replace(spec, prompts=cfg_prompts), directions, warmup_steps, on_step, max_batch, steer)


def assigned_rows(
    spec: GenerationSpec,
    assignment: Sequence[Mapping[str, str]],
    texts: ClassTexts,
    mode: Mode = "prompt",
    guidance_weight: float = 5.0,
) -> list[ImageRow]:
    """generate_assigned's images as rows for a shared pass (denoise_rows), without classifier guidance: what a
    request contributes to a batch of several requests. Same texts and directions, so the same pixels."""
    if len(assignment) != spec.num_images:
        raise ValueError(f"assignment has {len(assignment)} entries for num_images={spec.num_images}")
    base_prompts = spec.prompt_list()
    if mode == "prompt":
        prompts = [augment_prompt(p, a, texts) for p, a in zip(base_prompts, assignment)]
        return image_rows(replace(spec, prompts=prompts))
    cfg_prompts, directions = _assigned_conditions(base_prompts, assignment, texts, mode, guidance_weight, None, ())
    return image_rows(replace(spec, prompts=cfg_prompts), directions)


def _assigned_conditions(
    base_prompts: Sequence[str],
    assignment: Sequence[Mapping[str, str]],
    texts: ClassTexts,
    mode: Mode,
    guidance_weight: float,
    groups: Mapping[str, Sequence[str]] | None,
    steered: Sequence[Mapping[str, str]],
) -> tuple[list[str], list[list[Direction]]]:
    """(CFG prompt, group directions) per image for modes "guidance" and "both"; attributes in `steered` are left
    to classifier guidance."""
    group_classes = _group_classes(assignment, texts, groups)
    if steered:  # multi-class attributes the classifier reads are steered by it alone
        group_classes = {a: c for a, c in group_classes.items() if not any(a in classes for classes in steered)}
    cfg_prompts = list(base_prompts)
    if mode == "both":  # CFG towards the augmented prompt, group directions on top
        cfg_prompts = [augment_prompt(p, a, texts) for p, a in zip(base_prompts, assignment)]
    directions: list[list[Direction]] = []
    for prompt, classes in zip(base_prompts, assignment):
        rows: list[Direction] = []
        for attr, names in group_classes.items():
            if attr not in classes:
                continue
            others = [c for c in names if c != classes[attr]]
            rows.append((augment_prompt(prompt, {attr: classes[attr]}, texts), guidance_weight))
            rows += [(augment_prompt(prompt, {attr: c}, texts), -guidance_weight / len(others)) for c in others]
        directions.append(rows)
    return cfg_prompts, directions


def _group_classes(
    assignment: Sequence[Mapping[str, str]], texts: ClassTexts, groups: Mapping[str, Sequence[str]] | None
) -> dict[str, list[str]]:
    attrs: list[str] = []
    for a in assignment:
        attrs.extend(k for k in a if k not in attrs)
    out: dict[str, list[str]] = {}
    for attr in attrs:
        if groups is not None and attr in groups:
            classes = list(groups[attr])
        else:
            classes = texts.classes(attr) or sorted({a[attr] for a in assignment if attr in a})
        missing = {a[attr] for a in assignment if attr in a} - set(classes)
        if missing:
            raise ValueError(f"assigned classes {sorted(missing)} of {attr!r} are not among its groups {classes}")
        out[attr] = classes
    return out


Direction = tuple[str, float]
"""(text, coefficient): the image's noise prediction moves by coefficient * (eps(text) - eps(prompt))."""


@dataclass(frozen=True)
class ClassifierGuidance:
    """Per-image classifier guidance towards assigned classes, on top of the text directions.

    Text directions move an image along whatever axis the text encoder learned; for an ordinal
    attribute (skin tone) "towards class II, away from the others" overshoots past the middle
    classes (measured on the testbed: 0 of 32 senators assigned tone II came out II). The
    gradient of the steering reader's log-probability of the assigned class, taken on the
    predicted clean image, steers by what the image actually shows, so middle classes become
    reachable. `classes[i]` is image i's {attribute: class}; `scale` multiplies the gradient in
    the usual classifier-guidance form eps -= scale * sqrt(1 - abar) / sqrt(abar) * grad(x0);
    images with no person found are also pushed towards "person".
    """

    classifier: AttributeClassifier
    classes: Sequence[Mapping[str, str]]
    scale: float


def generate_directed(
    pipe: StableDiffusionPipeline,
    spec: GenerationSpec,
    directions: Sequence[Sequence[Direction]],
    warmup_steps: int = 0,
    on_step: StepCallback | None = None,
    max_batch: int = 16,
    classifier_guidance: ClassifierGuidance | None = None,
) -> torch.Tensor:
    """The denoising loop of StableDiffusionPipeline with per-image text directions added to CFG.

    The one conditioning primitive of request-time fairness: `assign` moves each image towards
    its assigned group and away from the others; IDA (the `guidance` strategy) moves every image
    by calibrated per-group weights. All texts of a chunk share one UNet batch per step, and
    the first `warmup_steps` steps run plain CFG (as semantic guidance's warm-up), also for
    `classifier_guidance`.
    """
    import torch

    if len(directions) != spec.num_images:
        raise ValueError(f"directions has {len(directions)} entries for num_images={spec.num_images}")
    if classifier_guidance is not None and len(classifier_guidance.classes) != spec.num_images:
        raise ValueError(f"classifier_guidance has {len(classifier_guidance.classes)} entries for num_images={spec.num_images}")
    rows = image_rows(spec, directions)
    chunks = [range(i, min(i + max_batch, spec.num_images)) for i in range(0, spec.num_images, max_batch)]
    total = spec.steps * len(chunks)
    outputs: list[torch.Tensor] = []
    for c, chunk in enumerate(chunks):

        def _step(s: int, _base: int = c * spec.steps) -> None:
            if on_step is not None:
                on_step(_base + s, total)

        outputs.append(denoise_rows(pipe, [rows[i] for i in chunk], spec.steps, spec.height, spec.width, warmup_steps,
                                    _step, classifier_guidance, list(chunk)))  # fmt: skip
    logger.debug("directed %d images in %d chunks (warm-up %d)", spec.num_images, len(chunks), warmup_steps)
    return torch.cat(outputs)


@dataclass(frozen=True)
class ImageRow:
    """One image of a shared denoising pass: its starting noise (seed, index), texts, CFG scale and directions.

    Images of different requests (prompts, seeds, guidance scales, assigned classes) share a pass
    as rows of one UNet batch; only steps and size must agree.
    """

    seed: int
    index: int
    prompt: str
    negative_prompt: str = ""
    guidance_scale: float = 5.0
    directions: tuple[Direction, ...] = ()


def image_rows(spec: GenerationSpec, directions: Sequence[Sequence[Direction]] | None = None) -> list[ImageRow]:
    """The rows of a request: image i starts from generate()'s noise for (spec.seed, spec.start_index + i)."""
    prompts = spec.prompt_list()
    return [
        ImageRow(spec.seed, spec.start_index + i, prompts[i], spec.negative_prompt or "", spec.guidance_scale,
                 tuple(directions[i]) if directions is not None else ())
        for i in range(spec.num_images)
    ]  # fmt: skip


def denoise_rows(
    pipe: StableDiffusionPipeline,
    rows: Sequence[ImageRow],
    steps: int,
    height: int | None = None,
    width: int | None = None,
    warmup_steps: int = 0,
    on_step: Callable[[int], None] | None = None,
    classifier_guidance: ClassifierGuidance | None = None,
    guidance_indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """Images in [0, 1] (N x 3 x H x W, CPU) for `rows`, all in one batch: every text in one encoder call, every
    (image, text) pair in one UNet call per step. `on_step(s)` is called after step s (1-based) and may raise
    GenerationCancelled. `guidance_indices[j]` is row j's index into `classifier_guidance.classes`.

    A row with guidance scale <= 1 has no unconditional pass (as the pipeline). A row's pixels do not depend on
    the other rows beyond the last bits of batched float arithmetic (measured on CPU: at most 1/255 on a handful
    of pixels between a batch of 16 and one image alone).
    """
    import torch

    from adaptors.generation import default_size, initial_latents

    n = len(rows)
    height = height or default_size(pipe)
    width = width or default_size(pipe)
    cfg = [row.guidance_scale > 1.0 for row in rows]  # as the pipeline: no unconditional pass at scale <= 1
    conds = _Conditions()
    uncond = [conds.add(row.negative_prompt) if cfg[j] else -1 for j, row in enumerate(rows)]
    prompt_rows = [conds.add(row.prompt) for row in rows]
    image_dirs = [[(conds.add(text), coef) for text, coef in row.directions if coef != 0.0] for row in rows]
    with_cfg = [j for j in range(n) if cfg[j]]
    # classifier guidance takes a gradient inside the loop, which inference_mode would forbid
    steering = classifier_guidance is not None and classifier_guidance.scale > 0
    indices = list(guidance_indices) if guidance_indices is not None else list(range(n))
    with torch.no_grad() if steering else torch.inference_mode():
        embeds = pipe.encode_prompt(conds.texts, pipe.device, 1, False)[0]
        # rows of the UNet batch: (image, text row); warm-up steps need only the CFG rows
        base_pairs = [(j, uncond[j]) for j in with_cfg]
        base_pairs += [(j, prompt_rows[j]) for j in range(n)]
        dir_pairs = sorted({(j, r) for j in range(n) for r, _ in image_dirs[j]} - set(base_pairs))
        scales = torch.tensor([rows[j].guidance_scale for j in with_cfg], device=pipe.device).view(-1, 1, 1, 1)
        uniform = len(with_cfg) == n and len({row.guidance_scale for row in rows}) == 1
        pipe.scheduler.set_timesteps(steps, device=pipe.device)
        latents = torch.cat([initial_latents(pipe, row.seed, [row.index], height, width) for row in rows])
        latents = latents * pipe.scheduler.init_noise_sigma
        phases: dict[bool, tuple[Any, Any, dict[tuple[int, int], int]]] = {}

        def phase(guided: bool) -> tuple[Any, Any, dict[tuple[int, int], int]]:
            """(image index per UNet row, text embedding per UNet row, row of each pair): fixed within a phase."""
            if guided not in phases:
                pairs = base_pairs + (dir_pairs if guided else [])
                img_idx = torch.tensor([p[0] for p in pairs], device=pipe.device)
                txt_idx = torch.tensor([p[1] for p in pairs], device=pipe.device)
                phases[guided] = (img_idx, embeds[txt_idx], {pair: k for k, pair in enumerate(pairs)})
            return phases[guided]

        prompt_pos = len(with_cfg)  # the prompt rows follow the unconditional ones, image by image
        for s, t in enumerate(pipe.scheduler.timesteps):
            guided = s >= warmup_steps and any(image_dirs)
            img_idx, text_embeds, row_of = phase(guided)
            model_in = pipe.scheduler.scale_model_input(latents[img_idx], t)
            eps_rows = pipe.unet(model_in, t, encoder_hidden_states=text_embeds, return_dict=False)[0]
            eps_prompt = eps_rows[prompt_pos : prompt_pos + n]
            if uniform:  # one scale for every row: the pipeline's own arithmetic
                eps_uncond = eps_rows[:n]
                eps = eps_uncond + rows[0].guidance_scale * (eps_prompt - eps_uncond)
            else:
                eps = eps_prompt.clone()
                if with_cfg:
                    eps_uncond = eps_rows[: len(with_cfg)]
                    eps[with_cfg] = eps_uncond + scales * (eps_prompt[with_cfg] - eps_uncond)
            if guided:
                for j in range(n):
                    for r, coef in image_dirs[j]:
                        eps[j] += coef * (eps_rows[row_of[(j, r)]] - eps_prompt[j])
            if steering and s >= warmup_steps:
                eps = eps - _classifier_push(pipe, classifier_guidance, indices, latents, eps, t)
            latents = pipe.scheduler.step(eps, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(s + 1)
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * n)
    return image.float().cpu()


def _classifier_push(pipe, guidance: ClassifierGuidance, indices: Sequence[int], latents, eps, t):
    """scale * sqrt(1 - abar) / sqrt(abar) * d log p(assigned | decode(x0_hat)) / d x0_hat, per image.

    The UNet's prediction is held fixed (no backward pass through it): only the VAE decoder and
    the classifier are differentiated, which keeps the step at about one decode's cost.
    """
    import torch

    abar = pipe.scheduler.alphas_cumprod[int(t)].to(latents.device, latents.dtype)
    with torch.enable_grad():
        x0 = ((latents - (1 - abar).sqrt() * eps) / abar.sqrt()).detach().requires_grad_(True)
        decoded = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor, return_dict=False)[0]
        logits = guidance.classifier.logits((decoded / 2 + 0.5).clamp(0, 1))
        log_prob = torch.nn.functional.logsigmoid(logits["person"].float())
        for attr, names in guidance.classifier.attributes.items():
            rows = [r for r, i in enumerate(indices) if attr in guidance.classes[i]]
            if rows:
                wanted = [names.index(guidance.classes[indices[r]][attr]) for r in rows]
                per_row = torch.log_softmax(logits[attr].float(), dim=-1)[rows, wanted]
                log_prob = log_prob.index_add(0, torch.tensor(rows, device=log_prob.device), per_row)
        (grad,) = torch.autograd.grad(log_prob.sum(), x0)
    return guidance.scale * ((1 - abar).sqrt() / abar.sqrt()) * grad
