"""Which stored adaptor or guidance calibration fits a request: pure rules over manifest data.

Torch-free and Redis-free, so the gateway (to answer 409 at once) and the inference worker (to
decide when the job runs) apply exactly the same rules.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from common.schemas import TARGET_TOLERANCE

GUIDANCE_KIND = "ida"  # calibrated guidance weights: applied by the `guidance` strategy, not as an `adaptor`


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
) -> Any | None:
    """The stored adaptor trained for exactly this target on this base model, or None.

    Several matches: the newest (by `created`, then by id) wins, so the choice is deterministic
    and a retrained adaptor supersedes an older one without retiring it.
    """
    matches = []
    for manifest in manifests:
        if manifest_field(manifest, "base_model") not in base_models or manifest_field(manifest, "kind") == GUIDANCE_KIND:
            continue
        trained = manifest_target(manifest)
        if not trained or not targets_match(trained, target, tol):
            continue
        matches.append(manifest)
    if not matches:
        return None
    return max(matches, key=lambda m: (str(manifest_field(m, "created") or ""), str(manifest_field(m, "id") or "")))


def find_calibration(
    manifests: Iterable[Any],
    target: Mapping[str, Mapping[str, float]],
    base_models: Collection[str],
    prompt: str,
    steps: int | None,
    guidance_scale: float | None,
    tol: float = TARGET_TOLERANCE,
) -> Any | None:
    """The newest IDA calibration for this target, base model, prompt and sampler setting, or None.

    Guidance weights hold only for the steps and CFG scale they were calibrated at, and only for
    the prompts they were calibrated on, so every one of those must match.
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
