"""Where fairdiff keeps things on disk under FAIRDIFF_DATA_DIR, in one place.

Gateway, workers and the CLI share one data directory (a volume in docker-compose); each used to
spell its own paths. Here they are spelled once, so an operator can read the layout (for backups,
volumes and clean-ups) from one file:

    <data_dir>/adaptors/<id>/manifest.json + *.safetensors   published adaptors (the store)
    <data_dir>/adaptors/.staging-<id>/                       a job writing an adaptor, not served
    <data_dir>/adaptors/.retired-<id>-<tag>/                 a deleted adaptor, kept or swept
    <data_dir>/adaptors/.checkpoints/<id>/                   CLI finetunes' resumable state
    <data_dir>/checkpoints/<job id>/                         training jobs' resumable state
    <data_dir>/jobs/<job id>/                                generated images
    <data_dir>/redis/                                        the embedded redis-server's files and URL
"""

from __future__ import annotations

from pathlib import Path

MANIFEST_NAME = "manifest.json"
STAGING_PREFIX = ".staging-"
RETIRED_PREFIX = ".retired-"
REDIS_URL_FILE = "url"


def adaptor_dir(data_dir: Path) -> Path:
    """The adaptor store's root."""
    return data_dir / "adaptors"


def jobs_dir(data_dir: Path) -> Path:
    """Root of every job's image folder."""
    return data_dir / "jobs"


def checkpoints_dir(data_dir: Path) -> Path:
    """Root of training jobs' checkpoints (swept with the jobs they belong to)."""
    return data_dir / "checkpoints"


def redis_dir(data_dir: Path) -> Path:
    """Where `fairdiff up` runs its embedded redis-server and writes its URL."""
    return data_dir / "redis"


def staging_path(store_root: Path, name: str) -> Path:
    """The hidden folder a job writes an adaptor into before the store publishes it."""
    return store_root / f"{STAGING_PREFIX}{name}"


def retired_path(store_root: Path, adaptor_id: str, tag: str = "") -> Path:
    """The hidden folder a retired adaptor moves to (`tag` keeps successive retirements apart)."""
    return store_root / f"{RETIRED_PREFIX}{adaptor_id}{'-' + tag if tag else ''}"


def cli_checkpoint_path(store_root: Path, adaptor_id: str) -> Path:
    """Resumable state of a `fairdiff finetune` run, kept beside the store it publishes into."""
    return store_root / ".checkpoints" / adaptor_id


def is_published(entry: Path) -> bool:
    """Whether a store entry is a served adaptor (not hidden staging, retired or checkpoint state)."""
    return not entry.name.startswith(".") and entry.is_dir() and (entry / MANIFEST_NAME).is_file()
