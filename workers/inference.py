"""The body of the generate task: one job id in, PNGs and a result record out.

Idempotent by job id: a finished job is never run again, and a redelivered running job runs
again from scratch with the same per-image seeds, so it produces the same pixels and result.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from common.jobs import JobStore
from common.schemas import GenerateJob, JobState, Strategy
from workers import ledger
from workers.lifecycle import claim
from workers.runtime import Runtime, get_runtime, incr_stats
from workers.strategy import Decision, StrategyError, decide

logger = logging.getLogger(__name__)


def _adaptor_error_type(exc: Exception) -> str | None:
    """Map the adaptor library's errors to job error types (the library may be absent)."""
    try:
        from common.adaptor_manifest import (
            AdaptorBaseMismatch,
            AdaptorIntegrityError,
            AdaptorNotCalibrated,
            AdaptorNotFound,
        )
    except ImportError:
        return None
    if isinstance(exc, AdaptorNotCalibrated):
        return "no_calibration"
    if isinstance(exc, AdaptorNotFound):
        return "adaptor_not_found"
    if isinstance(exc, AdaptorBaseMismatch):
        return "adaptor_base_mismatch"
    if isinstance(exc, AdaptorIntegrityError):
        return "adaptor_integrity_error"
    return None


def list_manifests(store: Any) -> list[Any]:
    """Every live adaptor manifest; tolerant of a store without a listing method."""
    if store is None:
        return []
    for name in ("list", "list_manifests", "manifests"):
        method = getattr(store, name, None)
        if callable(method):
            return list(method())
    root = Path(store.root)
    out = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith(".") or not (entry / "manifest.json").is_file():
            continue
        try:
            out.append(store.manifest(entry.name))
        except Exception:  # a retired or broken adaptor is simply not a candidate
            logger.warning("skipping adaptor %s: unreadable manifest", entry.name, exc_info=True)
    return out


def save_png(pixels: Any, path: Path) -> None:
    """Write atomically: the gateway may serve the file the moment it exists."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(pixels).save(tmp, format="PNG")
    os.replace(tmp, path)


def _generate_assigned(
    runtime: Runtime, spec, target: dict, on_step, reserved: list[dict[str, str]] | None = None
) -> tuple[list[dict[str, str]], Any]:
    """`assign`: exact per-class counts for this request (largest remainder over the joint classes,
    seeded), each image conditioned on its class inside one batched denoising pass."""
    from adaptors.assign import class_texts_for, generate_assigned, joint_assignment

    settings = runtime.settings
    assignment = [dict(a) for a in (reserved or joint_assignment(spec.num_images, target, spec.seed))]
    images = generate_assigned(
        runtime.pipe, spec, assignment, class_texts_for(settings.base_model), mode=settings.assign_mode,
        guidance_weight=settings.assign_guidance_weight, on_step=on_step, max_batch=settings.max_batch,
        classifier=runtime.classifier, classifier_scale=settings.assign_classifier_scale,
    )  # fmt: skip
    return assignment, images


def _enforce(runtime: Runtime, spec, assignment: list[dict[str, str]], images, on_step) -> tuple[Any, list, dict[str, Any]]:
    """Regenerate misses (wrong class or no person) with fresh noise until the counts are exact."""
    from adaptors.assign import class_texts_for
    from adaptors.enforce import enforce

    settings = runtime.settings
    images, per_image, report = enforce(
        runtime.pipe, runtime.auditor, spec, assignment, class_texts_for(settings.base_model), images,
        max_rounds=settings.enforce_max_rounds, mode=settings.assign_mode,
        guidance_weight=settings.assign_guidance_weight, max_batch=settings.max_batch, on_step=on_step,
        classifier_scale=settings.assign_classifier_scale, steer=runtime.classifier,
    )  # fmt: skip
    return images, per_image, {"applied": True, **report.to_dict()}


def _assigned_counts(assignment: list[dict[str, str]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for classes in assignment:
        for attr, cls in classes.items():
            counts.setdefault(attr, {}).setdefault(cls, 0)
            counts[attr][cls] += 1
    return counts


def run_generate(jobs: JobStore, job_id: str, worker: str, runtime: Runtime | None = None) -> str:
    """Run one generate job to a final state; returns that state's name (for logs and tests)."""
    from adaptors.generation import GenerationCancelled, GenerationSpec, generate, to_uint8

    job, outcome = claim(jobs, job_id, worker, "generate")
    if job is None:
        return str(outcome)
    t_start = time.time()
    queue_s = max(0.0, t_start - float(job.get("created", t_start)))
    try:
        req = GenerateJob.from_dict(job["request"])
    except (TypeError, ValueError) as exc:
        jobs.finish(job_id, JobState.failed, error={"type": "invalid_request", "message": str(exc)})
        return JobState.failed.value

    t0 = time.perf_counter()
    runtime = runtime or get_runtime()
    try:
        decision: Decision = decide(
            req.strategy,
            req.fairness_target,
            req.adaptor_id,
            list_manifests(runtime.store) if req.fairness_target and not req.adaptor_id else None,
            runtime.base_model_names(),
            req.prompt,
            req.steps,
            req.guidance_scale,
        )
    except StrategyError as exc:
        logger.info("generate %s: %s", job_id, exc.message)
        jobs.finish(job_id, JobState.failed, error=exc.to_dict())
        return JobState.failed.value

    encoder = None
    directions = None  # set when the adaptor is an IDA calibration: the guidance strategy
    cache = runtime.cache
    before = _cache_counters(cache)
    if decision.adaptor_id is not None:
        if cache is None:
            jobs.finish(job_id, JobState.failed,
                        error={"type": "adaptor_unavailable", "message": "this worker has no adaptor store"})  # fmt: skip
            return JobState.failed.value
        try:
            encoder = cache.use(decision.adaptor_id)
            directions = cache.directions(decision.adaptor_id, req.prompt)
        except Exception as exc:
            kind = _adaptor_error_type(exc)
            if kind is None:
                raise
            jobs.finish(job_id, JobState.failed, error={"type": kind, "message": str(exc)})
            return JobState.failed.value
    elif cache is not None:
        cache.use(None)
    after = _cache_counters(cache)
    load_s = time.perf_counter() - t0

    spec = GenerationSpec(
        prompt=req.prompt,
        num_images=req.num_images,
        seed=req.seed,
        steps=req.steps,
        guidance_scale=req.guidance_scale,
        negative_prompt=req.negative_prompt,
        height=req.height,
        width=req.width,
    )

    def on_step(step: int, total: int) -> None:
        if jobs.step_and_check_cancel(job_id, step, total):
            raise GenerationCancelled(job_id)

    jobs.set_progress(job_id, 0, req.steps * -(-req.num_images // runtime.settings.max_batch))
    assignment = None
    audited = None  # per-image classifications enforcement already made; the audit reuses them
    lid: str | None = None
    reserved: list[dict[str, str]] | None = None
    enforcement: dict[str, Any] | None = None
    if req.enforce and decision.used != Strategy.assign.value:
        enforcement = {"applied": False, "reason": f"enforcement needs strategy 'assign'; this job used {decision.used!r}"}
    t1 = time.perf_counter()
    try:
        if decision.used == Strategy.assign.value and req.fairness_target:
            if req.ledger:
                lid = ledger.ledger_id(req.ledger_scope, req.ledger, req.prompt, req.fairness_target)
                reserved = ledger.reserve(jobs.r, lid, req.num_images, req.fairness_target, runtime.settings.job_ttl_s)
            assignment, images = _generate_assigned(runtime, spec, req.fairness_target, on_step, reserved)
            if req.enforce and runtime.auditor is not None:
                images, audited, enforcement = _enforce(runtime, spec, assignment, images, on_step)
        elif directions is not None:
            from adaptors.assign import generate_directed

            images = generate_directed(runtime.pipe, spec, [directions.rows] * spec.num_images, directions.warmup_steps,
                                       on_step, runtime.settings.max_batch)  # fmt: skip
        else:
            images = generate(runtime.pipe, spec, max_batch=runtime.settings.max_batch, on_step=on_step,
                              encode_prompt=encoder)  # fmt: skip
    except BaseException as exc:
        if lid and reserved:  # release the reservation: nothing was delivered
            ledger.settle(jobs.r, lid, reserved, [], list(req.fairness_target or {}))
        if not isinstance(exc, GenerationCancelled):
            raise
        logger.info("generate %s: cancelled between steps", job_id)
        jobs.finish(job_id, JobState.cancelled)
        incr_stats(jobs.r, jobs_cancelled=1)
        return JobState.cancelled.value
    generate_s = time.perf_counter() - t1

    out_dir = runtime.settings.jobs_dir / job_id
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, px in enumerate(to_uint8(images)):
        save_png(px, out_dir / f"{k}.png")

    t2 = time.perf_counter()
    report = None
    if req.audit and runtime.auditor is not None:
        from adaptors.audit import audit, summarise

        if audited is not None:
            report = summarise(audited, runtime.auditor.attributes, req.fairness_target).to_dict()
        else:
            report = audit(runtime.auditor, images, req.fairness_target).to_dict()
    audit_s = time.perf_counter() - t2
    ledger_state = None
    if lid and reserved is not None:
        attrs = list(req.fairness_target or {})
        if report is not None:  # count what the audit saw, so conditioning misses are made up later
            got = [{a: img["attributes"][a]["class"] for a in attrs} if img["person"] else None for img in report["images"]]
        else:
            got = list(reserved)
        ledger.settle(jobs.r, lid, reserved, got, attrs)
        ledger_state = {"key": req.ledger, "delivered": ledger.delivered(jobs.r, lid)}

    result: dict[str, Any] = {
        "images": [
            {
                "url": f"/v1/jobs/{job_id}/images/{k}.png",
                "seed_index": k,
                "attributes": report["images"][k]["attributes"] if report else None,
                "person": report["images"][k]["person"] if report else None,
                "person_confidence": report["images"][k]["person_confidence"] if report else None,
                "assigned": assignment[k] if assignment else None,
            }
            for k in range(len(images))
        ],
        "realised": report["realised"] if report else None,
        "counts": report["counts"] if report else None,
        "bias": report["bias"] if report else None,
        "no_person": report["no_person"] if report else None,
        "target_distance": (report["target_distance"] or None) if report else None,
        "audited": report is not None,
        "audit_reader": _audit_reader(runtime, decision) if report is not None else None,
        "assigned_counts": _assigned_counts(assignment) if assignment else None,
        "enforcement": enforcement,
        "ledger": ledger_state,
        "strategy": decision.to_dict(),
        "adaptor": decision.adaptor_id,
        "timings": {
            "queue_s": round(queue_s, 4),
            "load_s": round(load_s, 4),
            "generate_s": round(generate_s, 4),
            "audit_s": round(audit_s, 4),
            "total_s": round(time.time() - t_start, 4),
        },
    }
    # counted before the job shows as succeeded, so a client that sees it finished also sees it in the stats
    incr_stats(
        jobs.r,
        images_generated=len(images),
        jobs_succeeded=1,
        adaptor_cache_hits=after[0] - before[0],
        adaptor_cache_misses=after[1] - before[1],
        adaptor_swaps=after[2] - before[2],
        adaptor_cache_evictions=after[3] - before[3],
        gauges={"adaptor_cache_bytes": int(cache.nbytes)} if cache is not None else None,
    )
    jobs.finish(job_id, JobState.succeeded, result=result)
    logger.info("generate %s: %d images in %.2fs (strategy %s)", job_id, len(images), generate_s, decision.used)
    return JobState.succeeded.value


def _audit_reader(runtime: Runtime, decision: Decision) -> dict[str, Any]:
    """The reader that audited, and whether it also steered this job (classifier guidance in `assign`, or an
    adaptor trained or calibrated against it)."""
    from adaptors.readers.registry import audit_record

    guided = decision.used == Strategy.assign.value and runtime.settings.assign_classifier_scale > 0
    return audit_record(runtime.auditor, runtime.classifier, guided or decision.adaptor_id is not None)


def _cache_counters(cache: Any) -> tuple[int, int, int, int]:
    if cache is None:
        return (0, 0, 0, 0)
    return tuple(int(getattr(cache, name, 0)) for name in ("hits", "misses", "swaps", "evictions"))  # type: ignore[return-value]
