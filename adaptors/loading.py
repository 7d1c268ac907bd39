"""`load_adaptor(path)`: the adaptor in a folder, whichever its kind (the manifest's `kind` picks the class).

Importing this module registers the built-in kinds; a kind defined elsewhere registers itself in
`adaptors.base.KINDS` when its module is imported.
"""

from __future__ import annotations

from pathlib import Path

from adaptors import gmm, ida, lora, mapping, prefix, unet_delta  # noqa: F401  (each registers its kind in KINDS)
from adaptors.base import KINDS, Adaptor, load_tensors
from common.adaptor_manifest import MANIFEST_NAME, AdaptorManifest


def load_adaptor(path: str | Path) -> Adaptor:
    """Load the adaptor in folder `path`, whichever its kind; errors name the path."""
    path = Path(path)
    if not (path / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"no adaptor at {str(path)!r}: {MANIFEST_NAME} is missing")
    try:
        manifest = AdaptorManifest.read(path)
    except ValueError as exc:
        raise ValueError(f"adaptor at {str(path)!r}: {exc}") from exc
    cls = KINDS.get(manifest.kind)
    if cls is None:
        raise ValueError(f"adaptor at {str(path)!r} has unknown kind {manifest.kind!r}; known: {sorted(KINDS)}")
    weights = path / cls.weights_name
    if not weights.is_file():
        raise FileNotFoundError(f"adaptor at {str(path)!r} lacks its weights file {cls.weights_name!r}")
    try:
        return cls(manifest, load_tensors(weights))
    except ValueError as exc:
        raise ValueError(f"adaptor at {str(path)!r}: {exc}") from exc
