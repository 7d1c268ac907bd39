"""Adaptor manifests and the on-disk layout of the adaptor store, without torch.

The gateway lists and validates adaptors with this module alone; workers load the weights
through `adaptors.store`, which builds on the same layout and errors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.disk_layout import MANIFEST_NAME, RETIRED_PREFIX, STAGING_PREFIX, is_published  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

ADAPTOR_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class AdaptorError(Exception):
    """Base of the adaptor store's domain errors."""


class AdaptorNotFound(AdaptorError, KeyError):
    """No adaptor with this id in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "adaptor not found"


class AdaptorIntegrityError(AdaptorError):
    """An adaptor's files do not match its manifest (tampered, truncated or not safetensors)."""


class AdaptorBaseMismatch(AdaptorError):
    """An adaptor was made for another base model than the one loaded."""


class AdaptorNotCalibrated(AdaptorError):
    """Guidance weights exist, but not for this prompt."""


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class AdaptorManifest:
    """What an adaptor is, what it was trained for, and the sha256 of each of its files."""

    id: str
    kind: str
    base_model: str
    attributes: list[str] = field(default_factory=list)
    target: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    size_bytes: int = 0
    created: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    prompt_set: str | None = None
    # the prompts it was trained on, so an adaptor from a job with its own prompt list says what it saw
    prompts: list[str] = field(default_factory=list)
    sampler: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    # where an imported adaptor came from (e.g. {"imported_from": "shen2024", "source_files": {name: sha256}});
    # empty for adaptors trained here
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdaptorManifest:
        """Unknown keys are ignored so that older readers accept newer manifests."""
        missing = [k for k in ("id", "kind", "base_model") if k not in data]
        if missing:
            raise ValueError(f"adaptor manifest lacks {missing}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def read(cls, path: str | Path) -> AdaptorManifest:
        """Read `path` (a manifest.json or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read adaptor manifest {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"adaptor manifest {str(path)!r} is not a JSON object")
        return cls.from_dict(data)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(self.to_json())
        return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def valid_adaptor_id(adaptor_id: object) -> bool:
    """Lower-case letters, digits, '_' and '-', at most 64: an id can never name a path outside the store."""
    return isinstance(adaptor_id, str) and ADAPTOR_ID_RE.fullmatch(adaptor_id) is not None


def adaptor_dir(root: str | Path, adaptor_id: str) -> Path:
    if not valid_adaptor_id(adaptor_id):
        raise ValueError(f"invalid adaptor id {adaptor_id!r}: must match {ADAPTOR_ID_RE.pattern}")
    return Path(root) / adaptor_id


def list_manifests(root: str | Path) -> list[AdaptorManifest]:
    """Every published adaptor, sorted by id; staging and retired folders (dot names) are skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    out: list[AdaptorManifest] = []
    for entry in sorted(root.iterdir()):
        if not is_published(entry):
            continue
        try:
            manifest = AdaptorManifest.read(entry)
        except ValueError as exc:
            logger.warning("skipping unreadable adaptor %s: %s", entry.name, exc)
            continue
        if manifest.id != entry.name:
            logger.warning("skipping adaptor folder %s: its manifest names id %r", entry.name, manifest.id)
            continue
        out.append(manifest)
    return out


def read_manifest(root: str | Path, adaptor_id: str) -> AdaptorManifest:
    if not valid_adaptor_id(adaptor_id):
        raise AdaptorNotFound(f"no adaptor {adaptor_id!r} (invalid id)")
    folder = Path(root) / adaptor_id
    if not (folder / MANIFEST_NAME).is_file():
        raise AdaptorNotFound(f"no adaptor {adaptor_id!r}")
    return AdaptorManifest.read(folder)
