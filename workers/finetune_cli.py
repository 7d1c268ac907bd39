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

from common.finetune_config import check_hyperparameters
from common.settings import get_settings


def add_parser(sub) -> None:
    ft = sub.add_parser("finetune", help="train a fairness adaptor locally (dft, prefix) and publish it to the store")
    ft.add_argument("method", help="trainer: dft or prefix")
    ft.add_argument("--target", required=True, help='JSON, e.g. {"gender": {"female": 0.5, "male": 0.5}}')
    group = ft.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompts", nargs="+", help="training prompts")
    group.add_argument("--prompt-set", help="a named prompt set, e.g. testbed-train")
    ft.add_argument("--eval-prompt-set", help="held-out prompts for the metrics (default: the set's held-out partner)")
    ft.add_argument("--hparams", default="{}", help="JSON of hyperparameter overrides")
    ft.add_argument("--id", help="adaptor id (default: derived from --name)")
    ft.add_argument("--name")
    ft.add_argument("--model", help="base model (default: FAIRDIFF_BASE_MODEL)")
    ft.add_argument("--store", help="adaptor store folder (default: the settings' adaptor dir)")
    ft.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from adaptors.fairness_gain import FinetuneRefused
    from adaptors.image_features import with_preservation_features
    from adaptors.store import AdaptorStore
    from adaptors.trainers import get_trainer
    from common.schemas import FieldError, FinetuneJob, validate_target
    from testbed import world
    from workers.cli import _load_model, _out

    settings = get_settings()
    try:
        trainer = get_trainer(args.method)
    except KeyError as exc:
        _out(str(exc.args[0]))
        return 2
    try:  # before the model loads: a typo costs nothing
        hyperparameters = json.loads(args.hparams)
        if not isinstance(hyperparameters, dict):
            raise ValueError("must be a JSON object")
        check_hyperparameters(args.method, hyperparameters)
    except ValueError as exc:  # json.JSONDecodeError is one
        _out(f"--hparams: {exc}")
        return 2
    model, pipe, classifier = _load_model(args.model or settings.base_model)
    if classifier is None:
        _out("finetuning needs an attribute classifier for the base model (FAIRDIFF_CLASSIFIER)")
        return 2
    try:
        target = validate_target(json.loads(args.target), classifier.attributes)
    except (FieldError, json.JSONDecodeError) as exc:
        _out(f"--target: {exc}")
        return 2
    prompts = list(args.prompts) if args.prompts else world.prompt_set(args.prompt_set)
    eval_set = args.eval_prompt_set or world.HELD_OUT_SET.get(args.prompt_set or "")
    if prompts is None or (eval_set and world.prompt_set(eval_set) is None):
        _out(f"unknown prompt set; known: {list(world.PROMPT_SETS)}")
        return 2
    job = FinetuneJob(
        method=args.method, base_model=model, fairness_target=target, prompts=prompts, prompt_set=args.prompt_set,
        hyperparameters=hyperparameters, name=args.name,
        eval_prompts=world.prompt_set(eval_set) if eval_set else None,
    )  # fmt: skip
    store = AdaptorStore(Path(args.store) if args.store else settings.adaptor_dir)
    adaptor_id = args.id or f"{args.method}-{uuid.uuid4().hex[:8]}"
    staging = store.staging_dir(adaptor_id)
    ckpt = store.root / ".checkpoints" / adaptor_id
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
        _out(f"finetune failed: {exc}")
        return 1 if isinstance(exc, FinetuneRefused) else 2
    finally:
        bar.close()
    manifest = store.publish(staging)
    _out(f"published adaptor {manifest.id} ({manifest.kind}) to {store.root}")
    metrics = manifest.metrics or {}
    for when in ("before", "after"):
        if when in metrics:
            _out(f"  {when:6s} mean bias per prompt {metrics[when]['mean_prompt_bias']}")
    return 0
