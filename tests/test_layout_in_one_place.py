"""Redis key names and the data directory's layout are each spelled in one module.

Gateway and workers share Redis and the data volume and nothing else; a key or path spelled in
two places is a contract nobody checks. This fails when product code spells one outside its module.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("common", "service", "workers", "adaptors")


def _sources(skip: str) -> list[Path]:
    return [p for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py") if p.relative_to(ROOT).as_posix() != skip]


def test_redis_keys_are_spelled_only_in_redis_keys():
    literal = re.compile(r"""["']fairdiff:""")
    offenders = [p.relative_to(ROOT).as_posix() for p in _sources("common/redis_keys.py") if literal.search(p.read_text())]
    assert offenders == [], f"Redis key literals outside common/redis_keys.py: {offenders}"


def test_data_dir_layout_is_spelled_only_in_disk_layout():
    literal = re.compile(r"""["'](\.staging-|\.retired-|\.checkpoints["']|checkpoints["']|manifest\.json["'])""")
    offenders = [p.relative_to(ROOT).as_posix() for p in _sources("common/disk_layout.py") if literal.search(p.read_text())]
    assert offenders == [], f"data-dir path literals outside common/disk_layout.py: {offenders}"
