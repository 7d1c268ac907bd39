"""The `fairdiff` command line: generate and audit locally, finetune, and run the service (up, worker, gateway).

Heavy imports (torch, diffusers) happen inside the commands so `fairdiff --help` stays instant. Bad input exits
2 with one line naming the option, never a traceback; a request the model cannot serve (no matching adaptor, no
calibration) exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from common.settings import get_settings
from workers.console import HelpFormatter, Parser, UsageError, float_in, int_in, json_object
from workers.console import load_model as _load_model
from workers.console import out as _out

STRATEGIES = ("auto", "adaptor", "guidance", "assign", "latent", "none")
LEDGER_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # as the API's `ledger`


def _check_request(args: argparse.Namespace) -> None:
    """The API's checks that need no model (service/api/routes/generate.py), naming the CLI's options."""
    from common.adaptor_manifest import valid_adaptor_id

    if not args.prompt.strip():
        raise UsageError("prompt", "must not be empty")
    if args.adaptor is not None:
        if not valid_adaptor_id(args.adaptor):
            raise UsageError("--adaptor", f"{args.adaptor!r} is not a valid adaptor id")
        if args.strategy not in ("auto", "adaptor", "latent"):
            raise UsageError("--strategy", f"{args.strategy!r} cannot use --adaptor; use 'adaptor', 'latent' or 'auto'")
    elif args.strategy in ("adaptor", "guidance", "assign", "latent") and args.target is None:
        raise UsageError("--target", f"strategy {args.strategy!r} needs a fairness target")
    if args.ledger is not None and not LEDGER_KEY.match(args.ledger):
        raise UsageError("--ledger", "1 to 128 characters of letters, digits and . _ : -")
    for option, wanted in (("--ledger", args.ledger is not None), ("--enforce", args.enforce)):
        if not wanted:
            continue
        if args.target is None:
            raise UsageError(option, "needs --target")
        if args.strategy not in ("auto", "assign", "latent") or (args.adaptor is not None and args.strategy != "latent"):
            raise UsageError(option, "only applies to the exact strategies 'assign' and 'latent' (or 'auto')")


def _build_request(args: argparse.Namespace, model) -> Any:
    """The validated request, as the inference worker would receive it; UsageError naming the option."""
    from common.schemas import FieldError, GenerateJob, validate_target
    from workers.local import prompt_tokens

    settings = get_settings()
    for option, text in (("prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        if text:
            n, most = prompt_tokens(model, text)
            if n > most:
                raise UsageError(option, f"{n} tokens, but base model {model.name!r} takes at most {most}")
    target = None
    if args.target is not None:
        attributes = model.classifier.attributes if model.classifier is not None else None
        if attributes is None:
            raise UsageError("--target", "needs an attribute classifier for the base model (FAIRDIFF_CLASSIFIER)")
        try:
            target = validate_target(args.target, attributes, field="--target")
        except FieldError as exc:
            raise UsageError(exc.field, exc.message) from None
    if args.enforce and model.classifier is None:
        raise UsageError("--enforce", "needs the audit (a classifier for the base model)")
    return GenerateJob(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        seed=args.seed,
        steps=args.steps if args.steps is not None else settings.default_steps,
        guidance_scale=settings.default_guidance_scale if args.guidance_scale is None else args.guidance_scale,
        fairness_target=target,
        strategy=args.strategy,
        adaptor_id=args.adaptor,
        enforce=args.enforce,
        ledger=args.ledger,
        ledger_scope="cli",
    )


def _ledger_client(args: argparse.Namespace):
    if args.ledger is None:
        return None
    import redis

    url = get_settings().redis_url
    client = redis.Redis.from_url(url, socket_connect_timeout=2, decode_responses=True)  # as the job store reads it
    try:
        client.ping()
    except redis.RedisError as exc:
        raise UsageError(
            "--ledger", f"keeps its counts in Redis, and {url} is unreachable ({exc}); set FAIRDIFF_REDIS_URL"
        ) from None
    return client


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from adaptors.generation import to_uint8
    from adaptors.report import caption_lines, contact_sheet
    from common.adaptor_manifest import AdaptorBaseMismatch, AdaptorIntegrityError, AdaptorNotCalibrated, AdaptorNotFound
    from workers.inference import JobFailed
    from workers.local import render, summary_lines

    _check_request(args)
    client = _ledger_client(args)
    model = _load(args.model)
    req = _build_request(args, model)
    try:
        images, result = render(model, req, client)
    except (AdaptorNotFound, AdaptorBaseMismatch, AdaptorIntegrityError, AdaptorNotCalibrated) as exc:
        raise UsageError("--adaptor", str(exc)) from None
    except JobFailed as exc:  # what a job would record: a strategy conflict, an unusable adaptor, strict enforcement
        if exc.error.get("type") in ("adaptor_not_found", "adaptor_base_mismatch", "adaptor_integrity_error",
                                     "no_calibration", "adaptor_unavailable"):  # fmt: skip
            raise UsageError("--adaptor", exc.error["message"]) from None
        sys.stderr.write(f"fairdiff generate: {exc.error.get('type')}: {exc.error.get('message')}\n")
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images)
    for entry, px in zip(result["images"], pixels, strict=True):
        Image.fromarray(px).save(out / entry["file"])
    captions = [caption_lines(img["attributes"], img["person"]) if img["attributes"] else [] for img in result["images"]]
    contact_sheet(pixels, captions).save(out / "contact_sheet.png")
    (out / "report.json").write_text(json.dumps(result, indent=2))
    _out(f"wrote {len(pixels)} images, contact_sheet.png and report.json to {out.resolve()}")
    for line in summary_lines(result):
        _out(line)
    return 0


def _load(model: str | None):
    """The local model the settings (or --model) name; UsageError when it cannot be loaded."""
    from workers.local import load_local_model

    name = model or get_settings().base_model
    try:
        return load_local_model(name)
    except Exception as exc:  # a missing folder, an unknown hub id offline, a broken checkpoint: one line, no traceback
        raise UsageError("--model", f"cannot load base model {name!r}: {type(exc).__name__}: {exc}") from None


def cmd_audit(args: argparse.Namespace) -> int:
    """The base model's bias per prompt of a named prompt set, with the class each bias leans to."""
    from tqdm import tqdm

    from adaptors.audit import audit
    from adaptors.generation import GenerationSpec, generate
    from adaptors.profiles import get_profile

    settings = get_settings()
    name = args.model or settings.base_model
    profile = get_profile(name)
    sets = dict(profile.prompt_sets) if profile else {}
    wanted = args.prompt_set or (next(iter(profile.held_out_sets.values()), None) if profile else None)
    chosen = list(sets) if wanted == "all" else [s for s in sets if s == wanted]
    if not chosen:
        raise UsageError("--prompt-set", f"unknown prompt set {wanted!r} for {name!r}; known: {sorted(sets) + ['all']}")
    prompts = list(dict.fromkeys(p for s in chosen for p in sets[s]))
    model, pipe, classifier = _load_model(name)
    if classifier is None:
        raise UsageError("--model", f"no attribute classifier is configured for {model!r} (FAIRDIFF_CLASSIFIER)")
    rows = {}
    for prompt in tqdm(prompts, desc="auditing", unit="prompt", file=sys.stderr):
        spec = GenerationSpec(
            prompt=prompt,
            num_images=args.num_images,
            seed=args.seed,
            steps=args.steps or settings.default_steps,
            guidance_scale=settings.default_guidance_scale if args.guidance_scale is None else args.guidance_scale,
        )
        report = audit(classifier, generate(pipe, spec, max_batch=max(settings.max_batch, 64)))
        rows[prompt] = {"realised": report.realised, "bias": report.bias, "no_person": report.no_person}
    attrs = list(classifier.attributes)
    width = max(len(p) for p in prompts)
    _out(f"{'prompt':{width}s} " + " ".join(f"{a + ' bias (leans to)':>26s}" for a in attrs) + "   no person")
    for prompt, row in rows.items():
        cells = [f"{row['bias'][a]:.2f} ({_leaning(row['realised'][a])})" for a in attrs]
        _out(f"{prompt:{width}s} " + " ".join(f"{c:>26s}" for c in cells) + f"   {row['no_person']:>9d}")
    mean = {a: sum(r["bias"][a] for r in rows.values()) / len(rows) for a in attrs}
    _out(f"{'mean':{width}s} " + " ".join(f"{mean[a]:>26.2f}" for a in attrs))
    if args.json:
        Path(args.json).write_text(json.dumps({"per_prompt": rows, "mean_bias": mean}, indent=2))
    return 0


def _leaning(shares: dict[str, float]) -> str:
    """The class a bias leans to: the most frequent one ('-' when no person was found or the shares tie)."""
    if not shares or not any(shares.values()):
        return "-"
    top = max(shares.values())
    winners = [c for c, v in shares.items() if v == top]
    return winners[0] if len(winners) == 1 else "-"


def worker_argv(queue: str, loglevel: str = "INFO", name: str | None = None) -> list[str]:
    """The celery command line of one production worker: solo pool, one task at a time (one per GPU)."""
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queue, "--pool=solo",
        "--concurrency=1", "-n", f"{name or queue}@%h", f"--loglevel={loglevel}",
    ]  # fmt: skip


def cmd_worker(args: argparse.Namespace) -> int:
    argv = worker_argv(args.queue, args.loglevel, args.name)
    os.execv(argv[0], argv)  # replaces this process: signals go straight to celery
    return 0  # pragma: no cover


def cmd_gateway(args: argparse.Namespace) -> int:
    refusal = get_settings().admin_token_refusal(args.host)
    if refusal is not None:
        sys.stderr.write(f"fairdiff gateway: error: {refusal}\n")
        return 2
    argv = [
        sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", args.host,
        "--port", str(args.port), "--log-level", args.loglevel.lower(),
    ]  # fmt: skip
    if args.workers > 1:
        argv += ["--workers", str(args.workers)]
    os.execv(argv[0], argv)
    return 0  # pragma: no cover


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when this host's worker for the queue has a fresh heartbeat (container health checks)."""
    import socket

    from common.jobs import JobStore

    settings = get_settings()
    name = f"{args.name or args.queue}@{socket.gethostname()}"
    try:
        live = JobStore.from_url(settings.redis_url).live_workers(args.queue)
        alive = any(w == name or w.startswith(name + "/") for w in live)  # names carry "/<pid>"
    except Exception as exc:  # broker down = unhealthy, with the reason on stderr
        sys.stderr.write(f"healthcheck: {exc}\n")
        return 1
    if not alive:
        sys.stderr.write(f"healthcheck: no fresh heartbeat from {name} on queue {args.queue}\n")
    return 0 if alive else 1


def cmd_up(args: argparse.Namespace) -> int:
    from workers.embedded import run

    logging.getLogger().setLevel(logging.INFO)
    return run(host=args.host, port=args.port, ready_timeout=args.ready_timeout, log_level=args.loglevel)


def cmd_adaptors_import_shen(args: argparse.Namespace) -> int:
    """Convert a Shen et al. (ICLR 2024) export folder into store adaptors; user errors exit 2 with one line."""
    from adaptors.shen_import import import_checkpoint_folder, load_layout
    from adaptors.store import AdaptorStore

    settings = get_settings()
    base_model = args.base_model or settings.base_model
    try:
        target = json.loads(args.target) if args.target is not None else None
        layout = load_layout(base_model, settings.offline)
        store = AdaptorStore(args.store or settings.adaptor_dir)
        manifests = import_checkpoint_folder(
            args.dir, store, layout, base_model, id_prefix=args.id, target=target, name=args.name
        )
    except (ValueError, FileNotFoundError, FileExistsError) as exc:  # JSONDecodeError is a ValueError
        sys.stderr.write(f"fairdiff adaptors import-shen: error: {exc}\n")
        return 2
    for m in manifests:
        sources = ", ".join(m.provenance["source_files"])
        _out(f"imported {m.id} ({m.kind}, {m.size_bytes} bytes) from {sources} into {store.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fairdiff", description="Text-to-image diffusion with fairness as a parameter.",
                    formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter, **kwargs)

    gen = command("generate", "generate images in this process, meet a fairness target, and audit them")
    gen.add_argument("prompt", help="the text prompt (at most the base model's token limit)")
    gen.add_argument("-n", "--num-images", type=int_in(1, 64), default=8, help="images to generate (1-64)")
    gen.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0, help="seed of the whole request")
    gen.add_argument("--steps", type=int_in(1, 200), help="denoising steps (default: FAIRDIFF_DEFAULT_STEPS)")
    gen.add_argument("--guidance-scale", type=float_in(0.0, 50.0),
                     help="classifier-free guidance scale (default: FAIRDIFF_DEFAULT_GUIDANCE_SCALE)")  # fmt: skip
    gen.add_argument("--negative-prompt", help="optional negative prompt")
    gen.add_argument("--target", type=json_object, metavar="JSON",
                     help='fairness target, e.g. \'{"gender": {"female": 0.3, "male": 0.7}}\' (default: none)')  # fmt: skip
    gen.add_argument("--strategy", choices=STRATEGIES, default="auto",
                     help="how the target is met (docs/api.md): auto picks and the summary names it")  # fmt: skip
    gen.add_argument("--adaptor", metavar="ID", help="use this adaptor from the store (FAIRDIFF_DATA_DIR/adaptors)")
    gen.add_argument("--enforce", action="store_true",
                     help="with assign: regenerate images that missed their class until the audit agrees")  # fmt: skip
    gen.add_argument("--ledger", metavar="KEY",
                     help="count delivered classes under KEY across runs (in FAIRDIFF_REDIS_URL) so they add up")  # fmt: skip
    gen.add_argument("--model", help="base model (default: FAIRDIFF_BASE_MODEL)")
    gen.add_argument("--out", default="out", help="folder for the PNGs, contact_sheet.png and report.json")
    gen.set_defaults(func=cmd_generate)

    aud = command("audit", "the base model's bias per prompt of a prompt set, and the class it leans to")
    aud.add_argument("--prompt-set", metavar="NAME",
                     help="a named prompt set of the base model, or 'all' (default: its held-out set)")  # fmt: skip
    aud.add_argument("-n", "--num-images", type=int_in(1, 4096), default=64, help="images per prompt")
    aud.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0, help="seed of each prompt's images")
    aud.add_argument("--steps", type=int_in(1, 200), help="denoising steps (default: FAIRDIFF_DEFAULT_STEPS)")
    aud.add_argument("--guidance-scale", type=float_in(0.0, 50.0),
                     help="classifier-free guidance scale (default: FAIRDIFF_DEFAULT_GUIDANCE_SCALE)")  # fmt: skip
    aud.add_argument("--model", help="base model (default: FAIRDIFF_BASE_MODEL)")
    aud.add_argument("--json", metavar="FILE", help="also write the table as JSON here")
    aud.set_defaults(func=cmd_audit)

    from workers import finetune_cli

    finetune_cli.add_parser(command)

    up = command("up", "run Redis, both workers and the gateway on this machine (Ctrl-C stops all)")
    up.add_argument("--host", default="127.0.0.1", help="address the gateway listens on")
    up.add_argument("--port", type=int_in(1, 65535), default=8000, help="port the gateway listens on")
    up.add_argument("--ready-timeout", type=float_in(1.0, 86400.0), default=600.0, help="seconds to wait for the model to load")
    up.add_argument("--loglevel", default="INFO", help="log level of every process")
    up.set_defaults(func=cmd_up)

    wrk = command("worker", "run one Celery worker (one per GPU) for a queue")
    wrk.add_argument("--queue", choices=["inference", "training"], required=True, help="the queue to serve")
    wrk.add_argument("--name", help="worker name (default: the queue); the host name is appended")
    wrk.add_argument("--loglevel", default="INFO", help="Celery log level")
    wrk.set_defaults(func=cmd_worker)

    hc = command("healthcheck", "exit 0 if this host's worker for --queue is alive (for containers)")
    hc.add_argument("--queue", choices=["inference", "training"], required=True, help="the worker's queue")
    hc.add_argument("--name", help="worker name as given to `fairdiff worker --name` (default: the queue)")
    hc.set_defaults(func=cmd_healthcheck)

    from workers import doctor, readers_cli

    readers_cli.add_parser(sub)
    doctor.add_parser(sub)

    adp = command("adaptors", "manage the adaptor store")
    adp_sub = adp.add_subparsers(dest="adaptors_command", required=True, metavar="COMMAND")
    shen = adp_sub.add_parser(
        "import-shen",
        formatter_class=HelpFormatter,
        help="import a Shen et al. (ICLR 2024) checkpoint folder (LoRA and/or prefix) as adaptors",
        description="DIR is one of their `.../checkpoint-K_exported/` folders holding text_encoder_lora_EMA.pth, "
        "unet_lora_EMA.pth and/or prefix_embedding_EMA.pth. Publishes `<id>-lora` (text encoder and UNet "
        "together) and/or `<id>-prefix`. The pickles are read with torch.load(weights_only=True) only.",
    )
    shen.add_argument("dir", help="the checkpoint-K_exported folder")
    shen.add_argument("--base-model", help="base model the checkpoint is for (default: FAIRDIFF_BASE_MODEL)")
    shen.add_argument("--id", help="adaptor id prefix (default: shen-<run>-ckpt<K> from the folder names)")
    shen.add_argument(
        "--target",
        help='JSON fairness target the checkpoint was trained for (default: {"gender": {"female": 0.5, "male": 0.5}})',
    )
    shen.add_argument("--store", help="adaptor store folder (default: FAIRDIFF_DATA_DIR/adaptors)")
    shen.add_argument("--name", help="human-readable name for the manifests")
    shen.set_defaults(func=cmd_adaptors_import_shen)

    gw = command("gateway", "run the HTTP gateway (uvicorn)")
    gw.add_argument("--host", default="127.0.0.1", help="address to listen on")
    gw.add_argument("--port", type=int_in(1, 65535), default=8000, help="port to listen on")
    gw.add_argument("--workers", type=int_in(1, 256), default=1, help="uvicorn worker processes")
    gw.add_argument("--loglevel", default="INFO", help="uvicorn log level")
    gw.set_defaults(func=cmd_gateway)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        sys.stderr.write(f"fairdiff {args.command}: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
