"""The CLI as a product tool: every option explained with its default, bad input answered in one line with exit
status 2 (never a traceback), and `generate` doing what a request does."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from workers.cli import build_parser, main

TARGET = '{"gender": {"female": 0.5, "male": 0.5}}'


@pytest.fixture(autouse=True)
def _settings(monkeypatch, tmp_path):
    """Each test reads its own environment (get_settings caches), with its data under tmp_path."""
    from common.settings import get_settings

    monkeypatch.setenv("FAIRDIFF_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner, subsub in _subparsers(sub):
                    yield f"{name} {inner}", subsub


def test_every_option_of_every_command_has_help():
    parsers = [("fairdiff", build_parser()), *_subparsers(build_parser())]
    missing = [f"{name} {action.dest}" for name, sub in parsers for action in sub._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help]  # fmt: skip
    assert missing == []
    commands = [a for _, p in parsers for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    assert all(choice.help for c in commands for choice in c._choices_actions)


def test_help_shows_defaults_and_the_finetune_methods(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8)" in text and "(default: auto)" in text and "--target JSON" in text
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "dft, prefix, ida, fair_mapping, gmm or invdiff" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "argv, option",
    [
        (["generate", "-n", "0", "x"], "-n/--num-images"),
        (["generate", "-n", "65", "x"], "-n/--num-images"),
        (["generate", "--steps", "0", "x"], "--steps"),
        (["generate", "--guidance-scale", "nan", "x"], "--guidance-scale"),
        (["generate", "--target", "{gender", "x"], "--target"),
        (["generate", "--target", "[1]", "x"], "--target"),
        (["generate", "--strategy", "magic", "x"], "--strategy"),
        (["generate", "--enforce", "x"], "--enforce"),
        (["generate", "--ledger", "k", "x"], "--ledger"),
        (["generate", "--target", TARGET, "--ledger", "no spaces", "x"], "--ledger"),
        (["generate", "--target", TARGET, "--strategy", "none", "--enforce", "x"], "--enforce"),
        (["generate", "--strategy", "assign", "x"], "--target"),
        (["generate", "--adaptor", "../etc", "x"], "--adaptor"),
        (["generate", "--adaptor", "a1", "--strategy", "guidance", "x"], "--strategy"),
        (["generate", " "], "prompt"),
        (["finetune", "lora", "--target", TARGET, "--prompts", "x"], "method"),
        (["finetune", "dft", "--target", TARGET, "--prompts", "x", "--hparams", "{lr: 1}"], "--hparams"),
        (["finetune", "dft", "--target", TARGET, "--prompts", "x", "--hparams", '{"token_map_read": "span"}'], "--hparams"),
        (["finetune", "dft", "--target", "{", "--prompts", "x"], "--target"),
        (["finetune", "fair_mapping", "--target", TARGET, "--prompts", "x", "--hparams", '{"depth": 0}'], "--hparams"),
        (["finetune", "gmm", "--target", TARGET, "--prompts", "x", "--hparams", '{"components": 0}'], "--hparams"),
        (["finetune", "gmm", "--target", TARGET, "--prompts", "x", "--hparams", '{"images": 2}'], "--hparams"),
        (["generate", "--strategy", "latent", "x"], "--target"),
        (["audit", "-n", "0"], "-n/--num-images"),
        (["finetune", "dft", "--prompts", "x"], "--target"),  # every method but invdiff needs one
        (["finetune", "invdiff", "--target", TARGET, "--prompts", "x"], "--target"),  # invdiff takes none
        (["finetune", "invdiff", "--prompts", "x", "--hparams", '{"groups": 1}'], "--hparams"),
        # the training set is checked before the model loads
        (["finetune", "invdiff", "--prompts", "x", "--hparams", '{"dataset": "/no/such/set"}'], "--hparams"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_option(capsys, argv, option):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if not line.startswith("[transformers]")]
    assert len(lines) == 1 and "error:" in lines[0] and option in lines[0], err
    assert "Traceback" not in err


@pytest.mark.slow
def test_input_the_model_refuses_exits_2_in_one_line(capsys, tmp_path):
    cases = [
        (["generate", "doctor " * 60, "-n", "1"], "prompt: "),
        (["generate", "x", "--target", '{"gender": {"female": 0.5}}'], "--target.gender"),
        (["generate", "x", "--target", '{"hat": {"a": 1}}'], "--target.hat"),
        (["generate", "x", "--model", str(tmp_path / "no-such-model")], "--model"),
        (["generate", "x", "--adaptor", "absent", "--out", str(tmp_path / "o")], "--adaptor"),
        (["audit", "--prompt-set", "nope"], "--prompt-set"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(err) == 1 and says in err[0], (argv, err)


@pytest.mark.slow
def test_generate_with_a_target_prints_delivered_against_target_and_records_the_request(capsys, tmp_path):
    out = tmp_path / "run"
    target = '{"gender": {"female": 0.3, "male": 0.7}}'
    argv = ["generate", "a photo of the face of a nurse, a person", "--target", target, "-n", "10", "--strategy",
            "assign", "--steps", "6", "--seed", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "strategy: assign" in text and "delivered female=" in text and "target female=0.30 male=0.70" in text
    report = json.loads((out / "report.json").read_text())
    assert report["assigned_counts"] == {"gender": {"female": 3, "male": 7}}  # exact counts, as the API assigns them
    assert report["strategy"]["used"] == "assign" and report["target"]["gender"]["female"] == 0.3
    assert sum(report["counts"]["gender"].values()) + report["no_person"] == 10
    assert {"total_variation", "kl"} <= set(report["target_distance"]["gender"])
    assert len([f for f in os.listdir(out) if f.startswith("image_")]) == 10


@pytest.mark.slow
def test_finetune_publishes_under_the_data_dir_the_service_reads_and_prints_its_absolute_path(capsys, monkeypatch, tmp_path):
    from common.settings import get_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAIRDIFF_DATA_DIR", "relative-data")  # as the service resolves it: from its working directory
    monkeypatch.setenv("FAIRDIFF_TORCH_THREADS", "1")
    hp = {"iterations": 1, "steps": 2, "images_per_prompt": 2, "eval_images": 2, "eval_steps": 2, "rank": 2,
          "min_subject_kept": 0, "min_fairness_gain": 0}  # fmt: skip
    get_settings.cache_clear()
    try:
        code = main(["finetune", "dft", "--target", TARGET, "--prompts", "a photo of the face of a doctor, a person",
                     "--hparams", json.dumps(hp), "--id", "cli-data-dir"])  # fmt: skip
    finally:
        get_settings.cache_clear()
    assert code == 0
    store = tmp_path / "relative-data" / "adaptors"
    assert (store / "cli-data-dir" / "manifest.json").is_file()
    assert f"published adaptor cli-data-dir (lora) to {store}" in capsys.readouterr().out


def test_finetune_fair_mapping_publishes_a_mapping_adaptor(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FAIRDIFF_TORCH_THREADS", "1")
    hp = {"iterations": 20, "eval_images": 2, "eval_steps": 2, "min_subject_kept": 0, "min_fairness_gain": 0}
    code = main(["finetune", "fair_mapping", "--target", TARGET, "--prompts", "a photo of the face of a doctor, a person",
                 "--hparams", json.dumps(hp), "--id", "cli-map", "--store", str(tmp_path / "store")])  # fmt: skip
    assert code == 0
    assert (tmp_path / "store" / "cli-map" / "mapping.safetensors").is_file()
    assert "published adaptor cli-map (mapping)" in capsys.readouterr().out


@pytest.mark.slow
def test_generate_with_a_ledger_adds_single_image_runs_up_in_redis(capsys, tmp_path, monkeypatch, redis_server):
    import redis

    url = redis_server.rsplit("/", 1)[0] + "/5"  # a database of its own on the session's redis-server
    redis.Redis.from_url(url).flushdb()
    monkeypatch.setenv("FAIRDIFF_REDIS_URL", url)
    target = '{"gender": {"female": 0.5, "male": 0.5}}'
    assigned, people = [], 0
    for seed in (1, 2):
        argv = ["generate", "a photo of the face of a nurse, a person", "--target", target, "--ledger", "stream", "-n", "1",
                "--steps", "4", "--seed", str(seed), "--out", str(tmp_path / f"run{seed}")]  # fmt: skip
        assert main(argv) == 0
        report = json.loads((tmp_path / f"run{seed}" / "report.json").read_text())
        assigned.append(report["images"][0]["assigned"]["gender"])
        people += 1 - report["no_person"]
        assert report["ledger"]["key"] == "stream"
    assert sorted(assigned) == ["female", "male"]  # the second image goes to the class the first left behind
    assert sum(report["ledger"]["delivered"].values()) == people  # what the audit saw, as the worker counts it
    assert "ledger stream: delivered so far" in capsys.readouterr().out


@pytest.mark.slow
def test_audit_shows_which_class_each_bias_leans_to(capsys, tmp_path):
    assert main(["audit", "-n", "4", "--steps", "2", "--json", str(tmp_path / "audit.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "gender bias (leans to)" in lines[0] and lines[-1].startswith("mean")
    table = json.loads((tmp_path / "audit.json").read_text())
    assert len(table["per_prompt"]) == len(lines) - 2  # the profile's held-out set, one row per prompt
    for prompt, row in table["per_prompt"].items():
        shares = row["realised"]["gender"]
        line = next(text for text in lines if text.startswith(prompt))
        if shares["female"] != shares["male"]:
            assert f"({max(shares, key=shares.get)})" in line
