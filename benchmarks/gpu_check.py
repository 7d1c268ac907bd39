"""The CUDA fp16 path at real batch sizes, for a session that has a GPU: does every strategy run, how fast, in how
much memory, and do the readers run on the GPU.

For each base model (the testbed, and a local Stable Diffusion folder when one is given): load the pipeline in
fp16 on CUDA, then one generation per strategy at the batch size given -- `none`; `assign` (class prompts, group
directions, and the steering reader's classifier guidance on the multi-class attribute); `assign_enforce` (misses
regenerated until the audit reader agrees); `guidance` (the K+2 UNet evaluations of IDA's group-direction guidance,
with fixed, uncalibrated weights: its cost and numerics, not its fit) -- each with its seconds, images per second,
peak GPU memory, and whether its pixels are finite and not blank (fp16's usual failure). Then each reader (steering
and audit) on the GPU: its device, dtype and milliseconds per image. One JSON on stdout and in
benchmarks/results/gpu_check.json; exit 1 when any check failed.

    python benchmarks/gpu_check.py [--sd /models/sd15] [--batch 8] [--steps 20]

`--sd` defaults to FAIRDIFF_BASE_MODEL when that names a folder; its readers are FAIRDIFF_CLASSIFIER (steers) and
FAIRDIFF_AUDIT_READER (audits), as a worker would load them (docs/real-sd.md). Without CUDA it says so and exits 2,
writing nothing: a gpu_check result always comes from a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.settings import TESTBED, TESTBED_MODELS, Settings  # noqa: E402

NO_CUDA_EXIT = 2
PROMPTS = {TESTBED: "a photo of the face of a senator, a person"}
DEFAULT_PROMPT = "a photo of the face of a senator"
GUIDANCE_WEIGHT = 3.0  # per group direction in the `guidance` check; calibrated weights are of this order


def cuda_or_exit() -> None:
    """Exit with a clear message (and no result) on a machine without CUDA."""
    if not torch.cuda.is_available():
        sys.stderr.write(
            f"gpu_check: CUDA is not available (torch {torch.__version__}, CUDA build: {torch.version.cuda}); run it on "
            "a machine with a GPU and a CUDA build of torch. Nothing was written.\n"
        )
        raise SystemExit(NO_CUDA_EXIT)


def _memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _memory_peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def timed(device: torch.device, images: int, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Run one check; its value and a record (ok, seconds, images/s, peak memory, or the error)."""
    _memory_reset(device)
    t0 = time.perf_counter()
    try:
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # one failing check is reported, and the others still run
        return None, {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    seconds = time.perf_counter() - t0
    return value, {"ok": True, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 2),
                   "peak_memory_mib": _memory_peak_mib(device)}  # fmt: skip


def pixels_sane(images: torch.Tensor) -> dict[str, Any]:
    """fp16 overflow shows as NaN (black after clamping) images: every pixel finite and the batch not blank."""
    finite = bool(torch.isfinite(images).all())
    return {"finite": finite, "not_blank": finite and float(images.std()) > 0.01}


def placement(reader: Any) -> tuple[str | None, str | None]:
    """The device and dtype of a reader's first weights, wherever its modules sit (a CLIP inside a face cropper)."""
    seen: set[int] = set()
    todo = [reader]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            weight = next(obj.parameters(), None)
            if weight is not None:
                return str(weight.device), str(weight.dtype)
        elif hasattr(obj, "__dict__"):
            todo += [v for v in vars(obj).values() if hasattr(v, "__dict__")]
    return None, None


def check_target(steer: Any) -> dict[str, dict[str, float]]:
    """Gender 50/50, plus a uniform target on the first attribute with more than two classes that the steering
    reader reads: that one is what `assign` steers with classifier guidance."""
    target = {"gender": {"female": 0.5, "male": 0.5}}
    for attr, classes in (getattr(steer, "attributes", None) or {}).items():
        if len(classes) > 2:
            target[attr] = {c: round(1 / len(classes), 6) for c in classes}
            break
    return target


def check_model(model: str, *, device: str, batch: int, steps: int, classifier: str, audit_reader: str,
                settings: Settings) -> dict[str, Any]:  # fmt: skip
    """Every check on one base model; a check that fails is recorded with its error, never raised."""
    from adaptors.assign import augment_prompt, class_texts_for, generate_assigned, generate_directed, joint_assignment
    from adaptors.audit import audit
    from adaptors.enforce import enforce
    from adaptors.generation import GenerationSpec, generate, load_pipeline
    from adaptors.readers.registry import load_auditor, load_classifier

    out: dict[str, Any] = {"model": model, "batch": batch, "steps": steps, "checks": {}}
    t0 = time.perf_counter()
    try:
        pipe = load_pipeline(model, device, settings.offline)
    except Exception as exc:
        out["checks"]["load"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return out
    dev = pipe.device
    out["load_s"] = round(time.perf_counter() - t0, 2)
    out["device"], out["dtype"] = str(dev), str(pipe.unet.dtype)
    steer = auditor = None
    try:
        steer = load_classifier(classifier, model, device=dev)
        auditor = load_auditor(classifier, audit_reader, model, steer, device=dev)
    except Exception as exc:
        out["checks"]["readers"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    out["readers"] = {"steer": getattr(steer, "name", None), "audit": getattr(auditor, "name", None)}

    prompt = PROMPTS.get(model, DEFAULT_PROMPT)
    spec = GenerationSpec(prompt, num_images=batch, seed=0, steps=steps, guidance_scale=settings.default_guidance_scale)
    texts = class_texts_for(model)
    target = check_target(steer)
    assignment = joint_assignment(batch, target, spec.seed)
    assign_kw = {"mode": settings.assign_mode, "guidance_weight": settings.assign_guidance_weight, "max_batch": batch,
                 "classifier_scale": settings.assign_classifier_scale}  # fmt: skip
    out["target"] = target
    generate(pipe, GenerationSpec(prompt, num_images=1, steps=2), max_batch=1)  # warm-up: kernels, allocator

    runs: dict[str, Callable[[], torch.Tensor]] = {
        "none": lambda: generate(pipe, spec, max_batch=batch),
        "assign": lambda: generate_assigned(pipe, spec, assignment, texts, classifier=steer, **assign_kw),
    }
    if auditor is not None:

        def assign_enforce() -> torch.Tensor:
            images = generate_assigned(pipe, spec, assignment, texts, classifier=steer, **assign_kw)
            enforced, _, report = enforce(pipe, auditor, spec, assignment, texts, images, steer=steer,
                                          max_rounds=settings.enforce_max_rounds, **assign_kw)  # fmt: skip
            out["enforcement"] = report.to_dict()
            return enforced

        runs["assign_enforce"] = assign_enforce
    classes = texts.classes("gender") or ["female", "male"]
    rows = [(augment_prompt(prompt, {"gender": c}, texts), GUIDANCE_WEIGHT / len(classes)) for c in classes]
    runs["guidance"] = lambda: generate_directed(pipe, spec, [rows] * batch, 0, None, batch)

    images: dict[str, torch.Tensor] = {}
    for name, run in runs.items():
        value, record = timed(dev, batch, run)
        if value is not None:
            images[name] = value
            record.update(pixels_sane(value))
            record["ok"] = record["finite"] and record["not_blank"]
        out["checks"][name] = record
    if "none" in images and "none" in out["checks"]:
        plain_s = out["checks"]["none"]["seconds"]
        for name in images:
            out["checks"][name]["cost_vs_none"] = round(out["checks"][name]["seconds"] / plain_s, 2)

    sample = images.get("none")
    for role, reader in (("steer_reader", steer), ("audit_reader", auditor)):
        if reader is None or sample is None or (role == "audit_reader" and reader is steer):
            continue
        reader.predict(sample[:1])  # warm-up
        _, record = timed(dev, len(sample), lambda r=reader: r.predict(sample))
        where, dtype = placement(reader)
        record.update({"name": reader.name, "device": where, "dtype": dtype})
        if record["ok"]:
            record["ms_per_image"] = round(1000 * record["seconds"] / len(sample), 2)
        out["checks"][role] = record
    if auditor is not None and "assign" in images:
        report, record = timed(dev, batch, lambda: audit(auditor, images["assign"], target))
        if report is not None:
            record["counts"] = report.counts
        out["checks"]["audit"] = record
    out["ok"] = all(c.get("ok") for c in out["checks"].values())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd", help="a local Stable Diffusion folder (default: FAIRDIFF_BASE_MODEL when it is one)")
    parser.add_argument("--batch", type=int, default=8, help="images per generation (a real serving batch)")
    parser.add_argument("--testbed-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    cuda_or_exit()
    from adaptors.generation import configure_threads
    from benchmarks.results_io import environment, publish

    settings = Settings()
    sd = args.sd or (settings.base_model if settings.base_model not in TESTBED_MODELS else None)
    result: dict[str, Any] = {"benchmark": "gpu_check", "gpu": torch.cuda.get_device_name(0),
                              "cuda": torch.version.cuda, "models": {}}  # fmt: skip
    result["models"]["testbed"] = check_model(TESTBED, device="cuda", batch=args.testbed_batch, steps=args.steps,
                                              classifier="auto", audit_reader="auto", settings=settings)  # fmt: skip
    if sd:
        result["models"]["sd"] = check_model(sd, device="cuda", batch=args.batch, steps=args.steps,
                                             classifier=settings.classifier, audit_reader=settings.audit_reader,
                                             settings=settings)  # fmt: skip
    else:
        result["models"]["sd"] = {"skipped": "no --sd folder and FAIRDIFF_BASE_MODEL names the testbed"}
    result["ok"] = all(m.get("ok", True) for m in result["models"].values())
    result.update(environment(configure_threads(0)))
    result["device"] = f"cuda ({result['gpu']})"
    publish("gpu_check", result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
