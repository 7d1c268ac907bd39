"""`fairdiff doctor`: check an installation the way a worker will use it, and say what is missing with the fix.

Loads the base pipeline and every configured reader from the settings' paths, runs one tiny generation
and audits it, and prints the device, dtype and timings. Exit 0 when everything loads, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from common.settings import get_settings


def _check(report: dict, name: str, fix: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:  # every failure is reported with its fix, none stops the other checks
        report["checks"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "fix": fix}
        return None
    report["checks"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 3)}
    return value


def run_doctor() -> dict:
    from adaptors.generation import GenerationSpec, configure_threads, generate, load_pipeline
    from adaptors.readers.registry import load_auditor, load_classifier
    from common.readers import reader_choice

    settings = get_settings()
    configure_threads(settings.torch_threads)
    choice = reader_choice(settings.classifier, settings.audit_reader, settings.base_model)
    report: dict = {"base_model": settings.base_model, "readers": {"audit": choice.audit, "steer": choice.steer,
                    "subject": settings.subject_reader}, "checks": {}}  # fmt: skip
    pipe = _check(report, "base_model", "FAIRDIFF_BASE_MODEL: a local diffusers folder (model_index.json) or a cached hub id",
                  lambda: load_pipeline(settings.base_model, settings.device, settings.offline))  # fmt: skip
    if pipe is None:
        return report
    report["device"], report["dtype"] = str(pipe.device), str(pipe.unet.dtype)
    steer = _check(report, "steer_reader", "FAIRDIFF_CLASSIFIER: 'auto', 'none' or a reader folder",
                   lambda: load_classifier(settings.classifier, settings.base_model, device=pipe.device))  # fmt: skip
    audit_fix = "FAIRDIFF_AUDIT_READER: 'auto', 'classifier', 'none' or a reader folder (docs/real-sd.md)"
    auditor = _check(report, "audit_reader", audit_fix, lambda: load_auditor(
        settings.classifier, settings.audit_reader, settings.base_model, steer, pipe.device))  # fmt: skip
    images = _check(report, "generation", "see the base_model check; a GPU needs FAIRDIFF_DEVICE=cuda",
                    lambda: generate(pipe, GenerationSpec("a photo of the face of a person", num_images=1, steps=2)))  # fmt: skip
    if images is not None and auditor is not None:
        from adaptors.audit import audit

        result = _check(report, "audit", "the audit reader loaded but cannot read this model's images",
                        lambda: audit(auditor, images))  # fmt: skip
        if result is not None:
            report["audit_example"] = result.images[0].attributes
    report["audit_reader_name"] = getattr(auditor, "name", None)
    report["steering_reader_name"] = getattr(steer, "name", None)
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    return report


def cmd_doctor(args: argparse.Namespace) -> int:
    report = run_doctor()
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        for name, check in report["checks"].items():
            state = f"ok ({check['seconds']}s)" if check["ok"] else f"FAILED: {check['error']}\n    fix: {check['fix']}"
            sys.stdout.write(f"{name:14s} {state}\n")
        readers = f"audit reader {report.get('audit_reader_name')}, steering reader {report.get('steering_reader_name')}"
        sys.stdout.write(f"device {report.get('device')}, dtype {report.get('dtype')}; {readers}\n")
    return 0 if report.get("ok") else 1


def add_parser(sub) -> None:
    doc = sub.add_parser("doctor", help="check the installation: base model, readers, one tiny generation and audit")
    doc.add_argument("--json", action="store_true", help="print the report as JSON")
    doc.set_defaults(func=cmd_doctor)
