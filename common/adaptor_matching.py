"""Which stored adaptor or guidance calibration fits a request: pure rules over manifest data.

Torch-free and Redis-free, so the gateway (to answer 409 at once) and the inference worker (to
decide when the job runs) apply exactly the same rules.

An adaptor is trained for one target, and its manifest records how well it met that target on
evaluation prompts. `auto` may pick it only when that measured fit qualifies (`fit_to_target`
at most the deployment's `auto_max_tv`); a fit that was never measured, or measured on the
training prompts alone, does not qualify, so one poorly trained adaptor cannot silently change
what every client gets.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from common.bias import total_variation
from common.schemas import TARGET_TOLERANCE

GUIDANCE_KIND = "ida"  # calibrated guidance weights: applied by the `guidance` strategy, not as an `adaptor`
LATENT_KIND = "gmm"  # per-prompt latent mixtures: applied by the `latent` strategy, for any target their classes carry
PER_PROMPT_KINDS = (GUIDANCE_KIND, LATENT_KIND)  # calibrated per prompt and sampler setting, not trained for a target
_WHAT = {GUIDANCE_KIND: "guidance weights", LATENT_KIND: "latent mixtures"}
# kinds trained without a fairness_target (InvDiff's invariance across inferred groups): never matched to a
# target, served only when a request names them by adaptor_id
TARGETLESS_KINDS = frozenset({"unet_delta"})


def has_no_target(manifest: Any) -> bool:
    return manifest_field(manifest, "kind") in TARGETLESS_KINDS or not manifest_target(manifest)


def manifest_field(manifest: Any, *names: str) -> Any:
    """Read a manifest field whether the manifest is a dataclass/object or a plain dict."""
    for name in names:
        if isinstance(manifest, Mapping):
            if name in manifest:
                return manifest[name]
        elif hasattr(manifest, name):
            return getattr(manifest, name)
    return None


def manifest_target(manifest: Any) -> Mapping[str, Mapping[str, float]] | None:
    return manifest_field(manifest, "target", "fairness_target", "trained_target")


def targets_match(
    a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]], tol: float = TARGET_TOLERANCE
) -> bool:
    """Same attributes, and each class's probability equal within `tol` (a missing class counts as 0)."""
    if set(a) != set(b):
        return False
    for attr in a:
        classes = set(a[attr]) | set(b[attr])
        for cls in classes:
            if abs(float(a[attr].get(cls, 0.0)) - float(b[attr].get(cls, 0.0))) > tol:
                return False
    return True


def find_matching_adaptor(
    manifests: Iterable[Any],
    target: Mapping[str, Mapping[str, float]],
    base_models: Collection[str],
    tol: float = TARGET_TOLERANCE,
    max_tv: float | None = None,
) -> Any | None:
    """The stored adaptor trained for exactly this target on this base model, or None.

    With `max_tv`, only an adaptor whose measured held-out fit (`fit_to_target`) is at most
    `max_tv` counts: that is how `auto` picks. Several matches: the newest (by `created`, then
    by id) wins, so the choice is deterministic
    and a retrained adaptor supersedes an older one without retiring it.
    """
    matches = []
    for manifest in manifests:
        if manifest_field(manifest, "base_model") not in base_models or manifest_field(manifest, "kind") in PER_PROMPT_KINDS:
            continue
        if manifest_field(manifest, "kind") in TARGETLESS_KINDS:
            continue
        trained = manifest_target(manifest)
        if not trained or not targets_match(trained, target, tol):
            continue
        if max_tv is not None and not _qualifies(fit_to_target(manifest, None), max_tv):
            continue
        matches.append(manifest)
    if not matches:
        return None
    return max(matches, key=lambda m: (str(manifest_field(m, "created") or ""), str(manifest_field(m, "id") or "")))


def _qualifies(fit: dict[str, Any] | None, max_tv: float) -> bool:
    return fit is not None and fit.get("tv") is not None and float(fit["tv"]) <= max_tv


def _mean_tv(realised: Mapping[str, Mapping[str, float]], target: Mapping[str, Mapping[str, float]]) -> float | None:
    """Mean over the target's attributes of the total variation between realised and target shares."""
    if not realised or any(a not in realised for a in target):
        return None
    return round(sum(total_variation(realised[a], target[a]) for a in target) / len(target), 4)


def fit_to_target(manifest: Any, prompt: str | None) -> dict[str, Any] | None:
    """How well this adaptor met its own target, as its manifest measured it; None when never measured.

    A finetune (`dft`, `prefix`): mean per-prompt total variation to the target on its evaluation
    prompts, counted only when they were held out from training. A guidance calibration (`ida`):
    the total variation on held-out seeds for `prompt` (None for a prompt it was not calibrated on).
    """
    metrics = manifest_field(manifest, "metrics") or {}
    target = manifest_target(manifest) or {}
    if manifest_field(manifest, "kind") == GUIDANCE_KIND:
        row = (metrics.get("per_prompt") or {}).get(prompt) if prompt is not None else None
        tv = _mean_tv(row.get("realised_after") or {}, target) if row else None
        return None if tv is None else {"tv": tv, "measured_on": "held-out seeds of this prompt", "held_out": True}
    after = metrics.get("after") or {}
    tv = after.get("mean_prompt_tv")
    if tv is None:
        return None
    held_out = bool(metrics.get("eval_prompts_held_out"))
    return {
        "tv": float(tv) if held_out else None,
        "measured_tv": float(tv),
        "measured_on": f"{len(metrics.get('eval_prompts') or [])} evaluation prompts"
        + (" held out from training" if held_out else " that it was trained on"),
        "held_out": held_out,
    }


def adaptor_conflict(
    manifest: Any,
    target: Mapping[str, Mapping[str, float]] | None,
    prompt: str,
    steps: int | None,
    guidance_scale: float | None,
    tol: float = TARGET_TOLERANCE,
) -> tuple[str, str] | None:
    """(code, message) when an explicitly named adaptor cannot serve this request, else None.

    The request's fairness_target (when it names one) must be the target the adaptor was trained
    for; a per-prompt calibration (guidance weights, latent mixtures) must also have been calibrated
    for this prompt, steps and CFG scale. Latent mixtures serve any target whose classes they carry
    (`uncovered_class` says which one they do not), so for them the target is not compared.
    """
    aid = manifest_field(manifest, "id")
    kind = manifest_field(manifest, "kind")
    trained = manifest_target(manifest) or {}
    if target and kind != LATENT_KIND and has_no_target(manifest):
        return ("adaptor_has_no_target",
                f"adaptor {aid!r} was trained without a fairness_target (kind {manifest_field(manifest, 'kind')!r}); "
                "omit fairness_target to use it, or name an adaptor trained for this target")  # fmt: skip
    if kind != LATENT_KIND and target and not targets_match(trained, target, tol):
        return ("adaptor_target_mismatch",
                f"adaptor {aid!r} was trained for fairness_target {dict(trained)}, not the requested one; "
                "omit fairness_target to use the adaptor's own, or name an adaptor trained for this target")  # fmt: skip
    if kind not in PER_PROMPT_KINDS:
        return None
    what, method = _WHAT[kind], kind
    hp = manifest_field(manifest, "hyperparameters") or {}
    if prompt not in hp.get("prompts", manifest_field(manifest, "prompts") or []):
        return ("adaptor_prompt_mismatch",
                f"{what} {aid!r} were calibrated for other prompts; calibrate this prompt "
                f"(POST /v1/admin/finetunes with method {method!r}) or use strategy 'assign'")  # fmt: skip
    sampler = manifest_field(manifest, "sampler") or {}
    if steps is not None and sampler.get("steps") not in (None, steps):
        return ("adaptor_sampler_mismatch", f"{what} {aid!r} were calibrated at steps={sampler.get('steps')}, not {steps}")
    gs = sampler.get("guidance_scale")
    if guidance_scale is not None and gs is not None and abs(float(gs) - guidance_scale) > 1e-6:
        return ("adaptor_sampler_mismatch",
                f"{what} {aid!r} were calibrated at guidance_scale={gs}, not {guidance_scale}")  # fmt: skip
    return None


def component_classes(manifest: Any, prompt: str) -> list[dict[str, str]] | None:
    """The classes of each of a latent calibration's components for `prompt`; None when it has no mixture for it."""
    hp = manifest_field(manifest, "hyperparameters") or {}
    prompts = list(hp.get("prompts") or [])
    classes = hp.get("component_classes") or []
    if prompt not in prompts or len(classes) != len(prompts):
        return None
    return [dict(c) for c in classes[prompts.index(prompt)]]


def uncovered_class(manifest: Any, prompt: str, target: Mapping[str, Mapping[str, float]]) -> str | None:
    """The field (`fairness_target.<attribute>.<class>`) of a class with a positive share that no component of the
    latent calibration carries for `prompt`, joint classes included (independent marginals make every combination
    of positive classes needed); None when every one is carried."""
    comps = component_classes(manifest, prompt)
    if comps is None:
        return f"fairness_target.{next(iter(target))}"
    attrs = list(target)
    wanted = [[c for c, p in target[a].items() if float(p) > 0] for a in attrs]
    for attr, classes in zip(attrs, wanted):
        for cls in classes:
            if not any(comp.get(attr) == cls for comp in comps):
                return f"fairness_target.{attr}.{cls}"
    for combo in itertools.product(*wanted):
        if not any(all(comp.get(a) == c for a, c in zip(attrs, combo)) for comp in comps):
            return f"fairness_target.{attrs[0]}.{combo[0]}"
    return None


def latent_fit(manifest: Any, prompt: str) -> dict[str, Any] | None:
    """A latent calibration's measured within-one rates for `prompt`, its own and `assign`'s on the same held-out
    requests (the rule `auto` reads); None when never measured."""
    row = ((manifest_field(manifest, "metrics") or {}).get("per_prompt") or {}).get(prompt)
    if not row or "within_one" not in row:
        return None
    within = row["within_one"]
    return {"within_one": within.get("latent"), "assign_within_one": within.get("assign"),
            "exact": (row.get("exact") or {}).get("latent"), "cost_vs_none": (row.get("cost_vs_none") or {}).get("latent"),
            "measured_on": f"{row.get('requests')} held-out requests of {row.get('images_per_request')} images, "
            f"target {dict(manifest_target(manifest) or {})}"}  # fmt: skip


def find_latent_calibration(
    manifests: Iterable[Any],
    target: Mapping[str, Mapping[str, float]],
    base_models: Collection[str],
    prompt: str,
    steps: int | None,
    guidance_scale: float | None,
) -> Any | None:
    """The newest latent calibration for this base model, prompt and sampler whose components are named over the
    target's attributes; one carrying every class of the target wins over one that does not (whose uncovered class
    the caller then names)."""
    matches = []
    for manifest in manifests:
        if manifest_field(manifest, "kind") != LATENT_KIND or manifest_field(manifest, "base_model") not in base_models:
            continue
        if not set(target) <= set(manifest_field(manifest, "attributes") or []):
            continue
        if adaptor_conflict(manifest, None, prompt, steps, guidance_scale) is not None:
            continue
        matches.append(manifest)
    if not matches:
        return None
    return max(matches, key=lambda m: (uncovered_class(m, prompt, target) is None, str(manifest_field(m, "created") or ""),
                                       str(manifest_field(m, "id") or "")))  # fmt: skip


def find_calibration(
    manifests: Iterable[Any],
    target: Mapping[str, Mapping[str, float]],
    base_models: Collection[str],
    prompt: str,
    steps: int | None,
    guidance_scale: float | None,
    tol: float = TARGET_TOLERANCE,
    max_tv: float | None = None,
) -> Any | None:
    """The newest IDA calibration for this target, base model, prompt and sampler setting, or None.

    Guidance weights hold only for the steps and CFG scale they were calibrated at, and only for
    the prompts they were calibrated on, so every one of those must match; with `max_tv`, its
    measured fit for this prompt must also be at most `max_tv` (how `auto` picks).
    """
    matches = []
    for manifest in manifests:
        if manifest_field(manifest, "kind") != GUIDANCE_KIND or manifest_field(manifest, "base_model") not in base_models:
            continue
        trained = manifest_target(manifest)
        sampler = manifest_field(manifest, "sampler") or {}
        hp = manifest_field(manifest, "hyperparameters") or {}
        if not trained or not targets_match(trained, target, tol) or prompt not in hp.get("prompts", []):
            continue
        if steps is not None and sampler.get("steps") != steps:
            continue
        if guidance_scale is not None and abs(float(sampler.get("guidance_scale", -1.0)) - guidance_scale) > 1e-6:
            continue
        if max_tv is not None and not _qualifies(fit_to_target(manifest, prompt), max_tv):
            continue
        matches.append(manifest)
    if not matches:
        return None
    return max(matches, key=lambda m: (str(manifest_field(m, "created") or ""), str(manifest_field(m, "id") or "")))


# Other names a manifest may carry for a base model: the embedded testbed's pipeline id. Plain data, so that the
# torch-free gateway matches adaptors without importing the model (tests/test_imports.py checks it against
# adaptors.profiles, which workers read).
BASE_MODEL_ALIASES: dict[str, tuple[str, ...]] = {"testbed": ("fairdiff-testbed",)}


def base_model_names(base_model: str) -> set[str]:
    """Names a manifest may carry for this base model (the setting, and its aliases)."""
    return {base_model, *BASE_MODEL_ALIASES.get(base_model, ())}
