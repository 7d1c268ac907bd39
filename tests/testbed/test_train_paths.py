"""What `testbed.train` writes into committed files names places inside the repository, not the trainer's machine."""

import json
from pathlib import Path

from testbed import PIPELINE_DIR
from testbed.train import REPO_ROOT, load_vae, portable

WEIGHTS = PIPELINE_DIR.parent


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_portable_is_repo_relative_inside_the_repo_and_unchanged_outside():
    assert portable(PIPELINE_DIR / "vae") == "testbed/weights/pipeline/vae"
    assert portable(Path("/elsewhere/weights")) == "/elsewhere/weights"


def test_a_loaded_vae_records_its_portable_origin_in_the_config_it_saves(tmp_path):
    vae = load_vae(PIPELINE_DIR / "vae")
    vae.save_pretrained(tmp_path / "vae")
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["_name_or_path"] == "testbed/weights/pipeline/vae"


def test_no_committed_config_or_log_holds_an_absolute_path():
    files = [p for p in WEIGHTS.rglob("*.json") if "tokenizer" not in p.parts and "_work" not in p.parts]
    assert any(p.name == "training_log.json" for p in files)
    for path in files:
        absolute = [s for s in _strings(json.loads(path.read_text())) if s.startswith("/")]
        assert not absolute, f"{path.relative_to(REPO_ROOT)}: {absolute}"
