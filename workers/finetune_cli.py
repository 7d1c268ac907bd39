"""`fairdiff finetune METHOD`: run a trainer on this machine with a progress bar and publish its adaptor.

The same trainers as the training queue; handy for operators with a GPU box and for the
benchmarks. The adaptor goes into the store (FAIRDIFF_DATA_DIR or --store) under --id.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from pathlib import Path

from common.disk_layout import cli_checkpoint_path
from common.finetune_config import InvDiffConfig, check_hyperparameters
from common.settings import get_settings
from workers.console import UsageError
from workers.console import load_model as _load_model
from workers.console import out as _out

# the trainers' error fields, as the options that set them
_OPTIONS = {"prompts": "--prompts", "fairness_target": "--target", "hyperparameters": "--hparams"}
METHODS = (
    "dft",
    "prefix",
    "ida",
    "fair_mapping",
    "gmm",
    "invdiff",
)  # adaptors.trainers registers each (service.schemas.FINETUNE_METHODS)


def add_parser(command) -> None:
    """`command(name, help)` makes the subcommand's parser (workers.cli.build_parser)."""
    ft = command(
        "finetune", "train a fairness adaptor here (dft, prefix, ida, fair_mapping, gmm or invdiff) and publish it to the store"
    )
    ft.add_argument("method", choices=METHODS,
                    help="dft: LoRA trained by Shen et al.'s DFT; prefix: DFT on soft prefix tokens; ida: guidance; "
                         "fair_mapping: a text-embedding map (Li et al.); gmm: per-prompt latent mixtures; invdiff: a "
                         "second-pass UNet LoRA trained without labels or a target on the model's training data "
                         "(--hparams '{\"dataset\": PATH}')")  # fmt: skip
    ft.add_argument("--target", metavar="JSON",
                    help='fairness target, e.g. \'{"gender": {"female": 0.5, "male": 0.5}}\' (not for invdiff)')  # fmt: skip
    group = ft.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompts", nargs="+", metavar="PROMPT", help="training prompts")
    group.add_argument("--prompt-set", metavar="NAME", help="a named prompt set of the base model, e.g. testbed-train")
    ft.add_argument("--eval-prompt-set", metavar="NAME",
                    help="held-out prompts for the before/after metrics (default: the set's held-out partner)")  # fmt: skip
    ft.add_argument("--hparams", default="{}", metavar="JSON",
                    help="hyperparameter overrides (docs/methods/*.md; checked before the model loads)")  # fmt: skip
    ft.add_argument("--id", help="adaptor id (default: METHOD-<random>)")
    ft.add_argument("--name", help="human-readable name for the manifest")
    ft.add_argument("--model", help="base model (default: FAIRDIFF_BASE_MODEL)")
    ft.add_argument("--store", help="adaptor store folder (default: FAIRDIFF_DATA_DIR/adaptors, where the service reads)")
    ft.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from adaptors.fairness_gain import FinetuneRefused
    from adaptors.image_features import with_preservation_features
    from adaptors.profiles import get_profile
    from adaptors.store import AdaptorStore
    from adaptors.trainers import get_trainer
    from common.schemas import FieldError, FinetuneJob, validate_target

    settings = get_settings()
    trainer = get_trainer(args.method)
    try:  # before the model loads: a typo costs nothing
        hyperparameters = json.loads(args.hparams)
        if not isinstance(hyperparameters, dict):
            raise ValueError("must be a JSON object")
        config = check_hyperparameters(args.method, hyperparameters)
        if isinstance(config, InvDiffConfig) and config.dataset:  # every row checked before the model loads
            from adaptors.caption_data import read_caption_set

            read_caption_set(config.dataset)
    except ValueError as exc:  # json.JSONDecodeError is one
        raise UsageError("--hparams", str(exc).removeprefix("hyperparameters.")) from None
    if (args.target is None) != (args.method == "invdiff"):
        raise UsageError("--target", "method 'invdiff' takes none" if args.target else f"method {args.method!r} needs one")
    try:
        raw_target = json.loads(args.target or "{}")
    except json.JSONDecodeError as exc:
        raise UsageError("--target", f"not valid JSON ({exc})") from None
    name = args.model or settings.base_model
    try:
        model, pipe, classifier = _load_model(name)
    except Exception as exc:  # one line, no traceback
        raise UsageError("--model", f"cannot load base model {name!r}: {type(exc).__name__}: {exc}") from None
    if classifier is None:
        raise UsageError("--model", f"finetuning needs an attribute classifier for {model!r} (FAIRDIFF_CLASSIFIER)")
    try:
        target = validate_target(raw_target, classifier.attributes, field="--target") if args.target else {}
    except FieldError as exc:
        raise UsageError(exc.field, exc.message) from None
    profile = get_profile(model)
    sets = {name: list(p) for name, p in profile.prompt_sets.items()} if profile else {}
    prompts = list(args.prompts) if args.prompts else sets.get(args.prompt_set)
    eval_set = args.eval_prompt_set or (profile.held_out_sets.get(args.prompt_set or "") if profile else None)
    for option, wanted in (("--prompt-set", args.prompt_set), ("--eval-prompt-set", eval_set)):
        if wanted and wanted not in sets:
            raise UsageError(option, f"unknown prompt set {wanted!r} for {model!r}; known: {sorted(sets)}")
    job = FinetuneJob(
        method=args.method, base_model=model, fairness_target=target, prompts=prompts, prompt_set=args.prompt_set,
        hyperparameters=hyperparameters, name=args.name,
        eval_prompts=sets[eval_set] if eval_set else None,
    )  # fmt: skip
    store = AdaptorStore((Path(args.store) if args.store else settings.adaptor_dir).resolve())
    adaptor_id = args.id or f"{args.method}-{uuid.uuid4().hex[:8]}"
    staging = store.staging_dir(adaptor_id)
    ckpt = cli_checkpoint_path(store.root, adaptor_id)
    bar = tqdm(desc=f"{args.method} {adaptor_id}", unit="it", file=sys.stderr)

    def progress(point: dict) -> None:
        bar.total = point.get("total")
        bar.n = point.get("step", bar.n)
        bar.set_postfix(loss=point.get("loss"), bias=point.get("batch_bias"), refresh=False)
        bar.refresh()

    try:
        trainer(job, pipe, with_preservation_features(classifier, settings.preserve_features, pipe.device), staging, ckpt,
                progress, lambda: False)  # fmt: skip
    except (FinetuneRefused, ValueError) as exc:  # a refused adaptor (exit 1) or a bad request (exit 2): nothing published
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, FinetuneRefused):  # finished and refused: nothing will resume it
            shutil.rmtree(ckpt, ignore_errors=True)
            sys.stderr.write(f"fairdiff finetune: refused, nothing published: {exc}\n")
            return 1
        field, _, message = str(exc).partition(": ")
        raise UsageError(_OPTIONS.get(field.split(".")[0], "--hparams"), message or field) from None
    finally:
        bar.close()
    manifest = store.publish(staging)
    _out(f"published adaptor {manifest.id} ({manifest.kind}) to {store.root}")  # absolute: where the service must read
    metrics = manifest.metrics or {}
    for when in ("before", "after"):
        if when in metrics:
            _out(f"  {when:6s} mean bias per prompt {metrics[when]['mean_prompt_bias']}")
    for prompt, row in (metrics.get("per_prompt") or {}).items() if manifest.kind == "gmm" else ():
        _out(f"  {prompt}: {len(row['components'])} components, within one {row['within_one']}")
    return 0
