"""`fairdiff doctor` on the testbed: everything loads; a missing reader folder is named with its fix."""

import json

from common.settings import get_settings
from workers.cli import main


def test_doctor_passes_on_the_testbed_and_names_its_readers(capsys, monkeypatch):
    monkeypatch.setenv("FAIRDIFF_BASE_MODEL", "testbed")
    get_settings.cache_clear()
    try:
        assert main(["doctor", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] and report["audit_reader_name"] == "testbed-clip" and report["steering_reader_name"] == "testbed-cnn"
        assert set(report["checks"]) == {"base_model", "steer_reader", "audit_reader", "generation", "audit"}

        monkeypatch.setenv("FAIRDIFF_AUDIT_READER", "/nowhere/reader")
        get_settings.cache_clear()
        assert main(["doctor"]) == 1
        out = capsys.readouterr().out
        assert "audit_reader   FAILED" in out and "FAIRDIFF_AUDIT_READER" in out
    finally:
        get_settings.cache_clear()
