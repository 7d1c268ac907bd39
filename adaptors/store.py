"""The adaptor store: one folder per adaptor (manifest.json + safetensors) under a shared root.

Publishing is atomic: a job writes into `<root>/.staging-<id>`, the store hashes the files,
writes the manifest and renames the folder to `<root>/<id>`; a failed or cancelled job leaves
only a dot folder, which listing ignores. Loading verifies every file's sha256 first.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

from adaptors.base import Adaptor
from adaptors.loading import load_adaptor
from common.adaptor_manifest import (
    MANIFEST_NAME,
    AdaptorIntegrityError,
    AdaptorManifest,
    AdaptorNotFound,
    adaptor_dir,
    list_manifests,
    now_iso,
    read_manifest,
    sha256_file,
    valid_adaptor_id,
)
from common.disk_layout import retired_path, staging_path

logger = logging.getLogger(__name__)

WEIGHT_SUFFIX = ".safetensors"


class AdaptorStore:
    """Published adaptors under `root`; safe to share between processes on one volume."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def list(self) -> list[AdaptorManifest]:
        return list_manifests(self.root)

    def manifest(self, adaptor_id: str) -> AdaptorManifest:
        return read_manifest(self.root, adaptor_id)

    def exists(self, adaptor_id: str) -> bool:
        return valid_adaptor_id(adaptor_id) and (self.root / adaptor_id / MANIFEST_NAME).is_file()

    def path(self, adaptor_id: str) -> Path:
        return adaptor_dir(self.root, adaptor_id)

    def verify(self, adaptor_id: str) -> AdaptorManifest:
        """Check that the folder holds exactly the manifest's safetensors files with their sha256."""
        manifest = self.manifest(adaptor_id)
        folder = self.path(adaptor_id)
        if manifest.id != adaptor_id:
            raise AdaptorIntegrityError(f"adaptor folder {adaptor_id!r} holds a manifest for {manifest.id!r}")
        if not manifest.files:
            raise AdaptorIntegrityError(f"adaptor {adaptor_id!r}: manifest lists no files")
        for name, digest in manifest.files.items():
            if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(WEIGHT_SUFFIX):
                raise AdaptorIntegrityError(f"adaptor {adaptor_id!r}: file {name!r} is not a safetensors file")
            path = folder / name
            if not path.is_file():
                raise AdaptorIntegrityError(f"adaptor {adaptor_id!r}: file {name!r} is missing")
            if sha256_file(path) != digest:
                raise AdaptorIntegrityError(f"adaptor {adaptor_id!r}: file {name!r} does not match its sha256")
        extra = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_NAME and p.name not in manifest.files)
        if extra:
            raise AdaptorIntegrityError(f"adaptor {adaptor_id!r}: unexpected files {extra}")
        return manifest

    def load(self, adaptor_id: str) -> Adaptor:
        """Verify, then read the weights into memory."""
        self.verify(adaptor_id)
        return load_adaptor(self.path(adaptor_id))

    def staging_dir(self, adaptor_id: str) -> Path:
        """A fresh, empty `.staging-<id>` folder for a job to write into (stale leftovers are removed)."""
        if not valid_adaptor_id(adaptor_id):
            raise ValueError(f"invalid adaptor id {adaptor_id!r}")
        staging = staging_path(self.root, adaptor_id)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        return staging

    def discard(self, staging: str | Path) -> None:
        """Remove a staging folder after a failed or cancelled job."""
        staging = Path(staging)
        if staging.name.startswith(".") and staging.parent.resolve() == self.root.resolve():
            shutil.rmtree(staging, ignore_errors=True)

    def publish(self, staging: str | Path) -> AdaptorManifest:
        """Make the adaptor in `staging` visible under its manifest id, atomically.

        The manifest's `files` and `size_bytes` are recomputed here from what is on disk.
        """
        staging = Path(staging)
        manifest = AdaptorManifest.read(staging)
        if not valid_adaptor_id(manifest.id):
            raise ValueError(f"invalid adaptor id {manifest.id!r} in {str(staging)!r}")
        final = self.root / manifest.id
        if final.exists():
            raise FileExistsError(f"adaptor {manifest.id!r} already exists")
        copied = False
        if staging.parent.resolve() != self.root.resolve() or not staging.name.startswith("."):
            # a rename is only atomic inside one folder (and file system): copy next to the target first
            local = staging_path(self.root, f"{manifest.id}-{uuid.uuid4().hex[:8]}")
            shutil.copytree(staging, local)
            staging, copied = local, True
        try:
            files = {}
            for path in sorted(staging.iterdir()):
                if path.name == MANIFEST_NAME:
                    continue
                if not path.is_file() or not path.name.endswith(WEIGHT_SUFFIX):
                    raise AdaptorIntegrityError(f"{str(path)!r}: an adaptor holds only safetensors files")
                files[path.name] = sha256_file(path)
            if not files:
                raise AdaptorIntegrityError(f"{str(staging)!r} holds no weights")
            manifest.files = files
            manifest.size_bytes = sum((staging / n).stat().st_size for n in files)
            manifest.created = manifest.created or now_iso()
            manifest.write(staging)
            staging.rename(final)
        except BaseException:
            if copied:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("published adaptor %s (%s, %d bytes)", manifest.id, manifest.kind, manifest.size_bytes)
        return manifest

    def retire(self, adaptor_id: str, keep: bool = False) -> None:
        """Remove an adaptor from the store (kept as `.retired-<id>-<n>` when `keep`)."""
        if not self.exists(adaptor_id):
            raise AdaptorNotFound(f"no adaptor {adaptor_id!r}")
        folder = self.path(adaptor_id)
        hidden = retired_path(self.root, adaptor_id, uuid.uuid4().hex[:8])
        folder.rename(hidden)  # atomic: readers see it or not, never half
        if not keep:
            shutil.rmtree(hidden, ignore_errors=True)
        logger.info("retired adaptor %s", adaptor_id)
