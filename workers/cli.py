"""The `fairdiff` command line: generate and audit locally; run the service (up, worker, gateway).

Heavy imports (torch, diffusers) happen inside the commands so `fairdiff --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from common.settings import get_settings


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _load_model(model: str):
    """The base pipeline and its classifier (None when none is configured), as settings say."""
    from adaptors.classifiers import load_classifier
    from adaptors.generation import configure_threads, load_pipeline

    settings = get_settings()
    configure_threads(settings.torch_threads)
    pipe = load_pipeline(model, settings.device, settings.offline)
    return model, pipe, load_classifier(settings.classifier, model, device=pipe.device)


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from adaptors.audit import audit
    from adaptors.generation import GenerationSpec, generate, to_uint8
    from adaptors.report import caption_lines, contact_sheet

    settings = get_settings()
    model, pipe, classifier = _load_model(args.model or settings.base_model)
    spec = GenerationSpec(
        prompt=args.prompt,
        num_images=args.num_images,
        seed=args.seed,
        steps=args.steps or settings.default_steps,
        guidance_scale=settings.default_guidance_scale if args.guidance_scale is None else args.guidance_scale,
        negative_prompt=args.negative_prompt,
    )
    images = generate(pipe, spec, max_batch=settings.max_batch)
    pixels = to_uint8(images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, px in enumerate(pixels):
        Image.fromarray(px).save(out / f"image_{i:03d}.png")
    files = [f"image_{i:03d}.png" for i in range(len(pixels))]
    report: dict = {
        "prompt": spec.prompt,
        "seed": spec.seed,
        "steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "model": model,
        "images": [{"file": name} for name in files],
    }
    captions: list[list[str]] = [[] for _ in pixels]
    if classifier is not None:
        result = audit(classifier, images).to_dict()
        for entry, name in zip(result["images"], files, strict=True):
            entry["file"] = name
        report.update(result)
        captions = [caption_lines(img["attributes"], img["person"]) for img in result["images"]]
    contact_sheet(pixels, captions).save(out / "contact_sheet.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _out(f"wrote {len(pixels)} images, contact_sheet.png and report.json to {out}")
    if "realised" in report:
        for attr, shares in report["realised"].items():
            _out(f"  {attr:10s} " + "  ".join(f"{c}={v:.2f}" for c, v in shares.items()) + f"  bias={report['bias'][attr]:.2f}")
        _out(f"  no person found in {report['no_person']} of {len(pixels)}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from adaptors.audit import audit
    from adaptors.generation import GenerationSpec, generate
    from testbed.world import TEST_OCCUPATIONS, TRAIN_OCCUPATIONS, prompt_for

    settings = get_settings()
    model, pipe, classifier = _load_model(args.model or settings.base_model)
    if classifier is None:
        _out("no attribute classifier is configured for this base model (FAIRDIFF_CLASSIFIER)")
        return 2
    names = {"test": TEST_OCCUPATIONS, "train": TRAIN_OCCUPATIONS}.get(args.occupations)
    names = names or TRAIN_OCCUPATIONS + TEST_OCCUPATIONS
    rows = {}
    for occ in tqdm(names, desc="auditing", unit="prompt", file=sys.stderr):
        spec = GenerationSpec(
            prompt=prompt_for(occ),
            num_images=args.num_images,
            seed=args.seed,
            steps=args.steps or settings.default_steps,
            guidance_scale=settings.default_guidance_scale if args.guidance_scale is None else args.guidance_scale,
        )
        report = audit(classifier, generate(pipe, spec, max_batch=max(settings.max_batch, 64)))
        rows[occ] = {"realised": report.realised, "bias": report.bias, "no_person": report.no_person}
    attrs = list(classifier.attributes)
    _out(f"{'occupation':12s} " + " ".join(f"{a + ' bias':>15s}" for a in attrs) + "   no person")
    for occ, row in rows.items():
        _out(f"{occ:12s} " + " ".join(f"{row['bias'][a]:15.2f}" for a in attrs) + f"   {row['no_person']:>9d}")
    mean = {a: sum(r["bias"][a] for r in rows.values()) / len(rows) for a in attrs}
    _out(f"{'mean':12s} " + " ".join(f"{mean[a]:15.2f}" for a in attrs))
    if args.json:
        Path(args.json).write_text(json.dumps({"per_occupation": rows, "mean_bias": mean}, indent=2))
    return 0


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
    parser = argparse.ArgumentParser(prog="fairdiff", description="Text-to-image diffusion with fairness as a parameter.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images locally and audit them")
    gen.add_argument("prompt")
    gen.add_argument("-n", "--num-images", type=int, default=8)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--model", help="base model (default: FAIRDIFF_BASE_MODEL)")
    gen.add_argument("--out", default="out")
    gen.set_defaults(func=cmd_generate)

    aud = sub.add_parser("audit", help="the base model's bias table over the testbed occupations")
    aud.add_argument("--occupations", choices=["test", "train", "all"], default="test")
    aud.add_argument("-n", "--num-images", type=int, default=64)
    aud.add_argument("--seed", type=int, default=0)
    aud.add_argument("--steps", type=int)
    aud.add_argument("--guidance-scale", type=float)
    aud.add_argument("--model")
    aud.add_argument("--json", help="also write the table as JSON here")
    aud.set_defaults(func=cmd_audit)

    up = sub.add_parser("up", help="run Redis, both workers and the gateway on this machine (Ctrl-C stops all)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the model to load")
    up.add_argument("--loglevel", default="INFO")
    up.set_defaults(func=cmd_up)

    wrk = sub.add_parser("worker", help="run one Celery worker (one per GPU) for a queue")
    wrk.add_argument("--queue", choices=["inference", "training"], required=True)
    wrk.add_argument("--name", help="worker name (default: the queue); the host name is appended")
    wrk.add_argument("--loglevel", default="INFO")
    wrk.set_defaults(func=cmd_worker)

    hc = sub.add_parser("healthcheck", help="exit 0 if this host's worker for --queue is alive (for containers)")
    hc.add_argument("--queue", choices=["inference", "training"], required=True)
    hc.add_argument("--name", help="worker name as given to `fairdiff worker --name`")
    hc.set_defaults(func=cmd_healthcheck)

    from workers import finetune_cli

    finetune_cli.add_parser(sub)

    from workers import doctor, readers_cli

    readers_cli.add_parser(sub)
    doctor.add_parser(sub)

    adp = sub.add_parser("adaptors", help="manage the adaptor store")
    adp_sub = adp.add_subparsers(dest="adaptors_command", required=True)
    shen = adp_sub.add_parser(
        "import-shen",
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

    gw = sub.add_parser("gateway", help="run the HTTP gateway (uvicorn)")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)
    gw.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    gw.add_argument("--loglevel", default="INFO")
    gw.set_defaults(func=cmd_gateway)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
