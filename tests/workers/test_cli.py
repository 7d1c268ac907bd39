"""`fairdiff generate` end to end, as a user runs it."""

import json
import subprocess
import sys


def test_generate_writes_images_sheet_and_report(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "generate",
            "a photo of the face of a nurse, a person",
            "-n",
            "4",
            "--steps",
            "8",
            "--seed",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert len(report["images"]) == 4 and (out / "contact_sheet.png").exists()
    assert all((out / img["file"]).exists() for img in report["images"])
    first = report["images"][0]
    assert set(first["attributes"]) == {"gender", "skin_tone", "age"}
    assert 0.0 <= first["attributes"]["gender"]["confidence"] <= 1.0
    shares = report["realised"]["gender"]
    persons = 4 - report["no_person"]
    if persons:
        assert abs(sum(shares.values()) - 1.0) < 1e-6
    assert "gender" in proc.stdout
