"""`fairdiff readers ...`: reader tools for operators (fit a CLIP linear probe on a labelled folder)."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_fit_probe(args: argparse.Namespace) -> int:
    """Train a probe; user errors (missing folder or column) exit 2 with one line."""
    from adaptors.readers.clip import fit_probe

    try:
        report = fit_probe(
            args.clip, args.labels, args.out, image_root=args.images, attributes=args.attributes or None,
            held_out=args.held_out, steps=args.steps, seed=args.seed, face_detector=args.face_detector,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, KeyError) as exc:
        sys.stderr.write(f"fairdiff readers fit-probe: error: {exc}\n")
        return 2
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


def add_parser(sub) -> None:
    rd = sub.add_parser("readers", help="attribute readers: fit a CLIP linear probe")
    rd_sub = rd.add_subparsers(dest="readers_command", required=True)
    fit = rd_sub.add_parser(
        "fit-probe",
        help="train a linear probe on CLIP image embeddings from a labelled image folder",
        description="LABELS is a CSV with a `file` column and one column per attribute (FairFace's layout: "
        "file,age,gender,race,service_test). Writes probe.json + probe.safetensors + fit_report.json to OUT, a "
        "reader folder FAIRDIFF_AUDIT_READER or FAIRDIFF_CLASSIFIER can name; prints the held-out accuracy.",
    )
    fit.add_argument("labels", help="the label CSV")
    fit.add_argument("--clip", required=True, help="local transformers CLIP folder (e.g. clip-vit-large-patch14)")
    fit.add_argument("--out", required=True, help="folder to write the probe to")
    fit.add_argument("--images", help="folder the CSV's file paths are relative to (default: the CSV's folder)")
    fit.add_argument("--attributes", nargs="*", help="attribute columns (default: all but file and service_test)")
    fit.add_argument("--held-out", type=float, default=0.2, help="share of rows kept out of training to report accuracy")
    fit.add_argument("--steps", type=int, default=300, help="optimisation steps of the linear probe")
    fit.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the initialisation")
    fit.add_argument("--face-detector", choices=["none", "haar"], default="none",
                     help="crop the largest face first (FairFace images are already face crops: none)")  # fmt: skip
    fit.set_defaults(func=cmd_fit_probe)
