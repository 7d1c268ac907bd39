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


def test_finetune_publishes_an_adaptor_with_a_progress_bar(tmp_path):
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "FAIRDIFF_TORCH_THREADS": "1"}
    hp = {
        "iterations": 2,
        "steps": 2,
        "images_per_prompt": 2,
        "eval_images": 2,
        "eval_steps": 2,
        "rank": 2,
        "min_subject_kept": 0,
        "min_fairness_gain": 0,
    }  # images of 2 steps are too rough for the subject gate (tests/adaptors/test_subject_gate.py)
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", "finetune", "dft", "--target", '{"gender": {"female": 0.5, "male": 0.5}}',
         "--prompts", "a photo of the face of a doctor, a person", "--hparams", json.dumps(hp), "--id", "cli-dft",
         "--store", str(tmp_path / "store")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "published adaptor cli-dft (lora)" in proc.stdout
    assert "2/2" in proc.stderr  # the progress bar reached the last iteration
    manifest = json.loads((tmp_path / "store" / "cli-dft" / "manifest.json").read_text())
    assert manifest["hyperparameters"]["method"] == "dft" and manifest["target"]["gender"]["female"] == 0.5

    bad = subprocess.run([sys.executable, "-m", "workers.cli", "finetune", "dft", "--target", '{"hat": {"a": 1}}',
                          "--prompts", "x", "--store", str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert bad.returncode == 2 and "--target" in bad.stderr  # errors go to stderr, one line

    for hparams, says in (("{lr: 1}", "--hparams: Expecting property name"), ('{"ema_decay": 1.0}', "ema_decay")):
        bad = subprocess.run([sys.executable, "-m", "workers.cli", "finetune", "dft", "--target", '{"gender": {"female": 1}}',
                              "--prompts", "x", "--hparams", hparams, "--store", str(tmp_path / "store")],
                             capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, (bad.stdout, bad.stderr)
