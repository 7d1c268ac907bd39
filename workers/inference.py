"""The steps of one generate job: decide, load, reserve, render, enforce, publish, audit, settle, result.

Idempotent by job id: a finished job is never run again, and a redelivered running job runs
again from scratch with the same per-image seeds, so it produces the same pixels and result.
workers/generate.py runs them for a job alone or, through workers/batching.py, in a shared pass.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.disk_layout import is_published
from common.jobs import JobStore
from common.schemas import GenerateJob, JobState, Strategy
from workers import ledger
from workers.runtime import Runtime, incr_stats
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
        if not is_published(entry):
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


def _generate_latent(runtime: Runtime, spec, target: dict, adaptor_id: str, on_step,
                     reserved: list[dict[str, str]] | None = None) -> tuple[list[dict[str, str]], Any, Any]:  # fmt: skip
    """`latent`: the same exact per-class counts as `assign`, each image's latent moved into a component of its
    class after step t* of one plain pass; returns the assignment, the images and the regenerator `enforce` uses."""
    from adaptors.assign import joint_assignment
    from adaptors.gmm import generate_balanced

    mixture, at_step = runtime.cache.mixture(adaptor_id, spec.prompt)
    assignment = [dict(a) for a in (reserved or joint_assignment(spec.num_images, target, spec.seed))]
    max_batch = runtime.settings.max_batch
    images = generate_balanced(runtime.pipe, spec, assignment, mixture, at_step, on_step, max_batch)

    def regenerate(pipe, retry_spec, retry_assignment, *_args, on_step=None, **_kw):
        return generate_balanced(pipe, retry_spec, retry_assignment, mixture, at_step, on_step, max_batch)

    return assignment, images, regenerate


def enforce_step(runtime: Runtime, spec, assignment: list[dict[str, str]], images, on_step,
                 generate_fn: Any = None) -> tuple[Any, list, dict[str, Any]]:  # fmt: skip
    """Regenerate misses (wrong class or no person) with fresh noise until the counts are exact."""
    from adaptors.assign import class_texts_for
    from adaptors.enforce import enforce

    settings = runtime.settings
    images, per_image, report = enforce(
        runtime.pipe, runtime.auditor, spec, assignment, class_texts_for(settings.base_model), images,
        max_rounds=settings.enforce_max_rounds, mode=settings.assign_mode,
        guidance_weight=settings.assign_guidance_weight, max_batch=settings.max_batch, on_step=on_step,
        classifier_scale=settings.assign_classifier_scale, steer=runtime.classifier,
        **({"generate_fn": generate_fn} if generate_fn is not None else {}),
    )  # fmt: skip
    per_attribute = _delivered_vs_assigned(per_image, assignment)
    return images, per_image, {"applied": True, **report.to_dict(), "per_attribute": per_attribute}


def _delivered_vs_assigned(per_image: list, assignment: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Per targeted attribute: the assigned counts, the audited counts among images with a person, and whether they meet."""
    assigned = _assigned_counts(assignment)
    out: dict[str, dict[str, Any]] = {}
    for attr, want in assigned.items():
        got = dict.fromkeys(want, 0)
        for img in per_image:
            label = img.label(attr) if img.person else None
            if label is not None:
                got[label] = got.get(label, 0) + 1
        out[attr] = {"assigned": want, "delivered": got, "satisfied": got == want}
    return out


def _assigned_counts(assignment: list[dict[str, str]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for classes in assignment:
        for attr, cls in classes.items():
            counts.setdefault(attr, {}).setdefault(cls, 0)
            counts[attr][cls] += 1
    return counts


class JobFailed(Exception):
    """A step ended the job: `error` is the job's error body ({type, message, ...})."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", ""))
        self.error = error


@dataclass
class Rendered:
    """What the render step made: the images, and for `assign` who was assigned what."""

    images: Any
    assignment: list[dict[str, str]] | None = None
    audited: list | None = None  # per-image classifications enforcement already made; the audit reuses them
    enforcement: dict[str, Any] | None = None
    seconds: float = 0.0


@dataclass
class LedgerHold:
    """A ledger reservation made before rendering and settled (or released) after."""

    lid: str
    reserved: list[dict[str, str]]


def decide_step(runtime: Runtime, req: GenerateJob) -> Decision:
    """Which strategy serves the request (workers.strategy.decide over the store's manifests)."""
    explicit = None
    if req.adaptor_id and runtime.store is not None:
        try:
            explicit = runtime.store.manifest(req.adaptor_id)
        except Exception as exc:
            kind = _adaptor_error_type(exc)
            if kind is None:
                raise
            raise JobFailed({"type": kind, "message": str(exc)}) from exc
    try:
        return decide(
            req.strategy,
            req.fairness_target,
            req.adaptor_id,
            list_manifests(runtime.store) if req.fairness_target and not req.adaptor_id else None,
            runtime.base_model_names(),
            req.prompt,
            req.steps,
            req.guidance_scale,
            exact_required="enforce" if req.enforce else "ledger" if req.ledger else None,
            max_tv=runtime.settings.auto_max_tv,
            explicit=explicit,
        )
    except StrategyError as exc:
        raise JobFailed(exc.to_dict()) from exc


def load_step(runtime: Runtime, decision: Decision, prompt: str) -> tuple[Any, Any]:
    """(prompt encoder, guidance directions) of the decided adaptor, swapped in; (None, None) for the base model."""
    cache = runtime.cache
    if decision.adaptor_id is None:
        if cache is not None:
            cache.use(None)
        return None, None
    if cache is None:
        raise JobFailed({"type": "adaptor_unavailable", "message": "this worker has no adaptor store"})
    try:
        return cache.use(decision.adaptor_id), cache.directions(decision.adaptor_id, prompt)
    except Exception as exc:
        kind = _adaptor_error_type(exc)
        if kind is None:
            raise
        raise JobFailed({"type": kind, "message": str(exc)}) from exc


def application_step(cache: Any, decision: Decision, prompt: str) -> dict[str, Any] | None:
    """Whether the adaptor applied to this prompt and why (a mapping's keyword detector may skip it); logged."""
    if cache is None or decision.adaptor_id is None:
        return None
    application = cache.application(decision.adaptor_id, prompt)
    if application is not None:
        logger.info("adaptor %s %s: %s", decision.adaptor_id, "applied" if application["applied"] else "skipped",
                    application["reason"])  # fmt: skip
    return application


def reserve_step(r: Any, runtime: Runtime, req: GenerateJob, decision: Decision) -> LedgerHold | None:
    """With a ledger: reserve the request's classes, each image to the class most behind (in Redis `r`)."""
    if not (req.ledger and req.fairness_target and decision.used in (Strategy.assign.value, Strategy.latent.value)):
        return None
    lid = ledger.ledger_id(req.ledger_scope, req.ledger, req.prompt, req.fairness_target)
    return LedgerHold(lid, ledger.reserve(r, lid, req.num_images, req.fairness_target, runtime.settings.job_ttl_s))


def release_step(r: Any, req: GenerateJob, hold: LedgerHold) -> None:
    """Nothing was delivered: give the reservation back."""
    ledger.settle(r, hold.lid, hold.reserved, [], list(req.fairness_target or {}))


def render_step(runtime: Runtime, req: GenerateJob, decision: Decision, spec, encoder, directions, hold, on_step) -> Rendered:
    """The images: `assign` (with `enforce` when asked), guidance directions, or the (adapted) base model."""
    from adaptors.generation import generate

    t0 = time.perf_counter()
    max_batch = runtime.settings.max_batch
    if decision.used == Strategy.assign.value and req.fairness_target:
        assignment, images = _generate_assigned(runtime, spec, req.fairness_target, on_step, hold.reserved if hold else None)
        out = Rendered(images, assignment)
        if req.enforce and runtime.auditor is not None:
            out.images, out.audited, out.enforcement = enforce_step(runtime, spec, assignment, images, on_step)
    elif decision.used == Strategy.latent.value and req.fairness_target and decision.adaptor_id:
        assignment, images, regenerate = _generate_latent(runtime, spec, req.fairness_target, decision.adaptor_id, on_step,
                                                          hold.reserved if hold else None)  # fmt: skip
        out = Rendered(images, assignment)
        if req.enforce and runtime.auditor is not None:
            out.images, out.audited, out.enforcement = enforce_step(runtime, spec, assignment, images, on_step, regenerate)
    elif directions is not None:
        from adaptors.assign import generate_directed

        out = Rendered(generate_directed(runtime.pipe, spec, [directions.rows] * spec.num_images, directions.warmup_steps,
                                         on_step, max_batch))  # fmt: skip
    else:
        out = Rendered(generate(runtime.pipe, spec, max_batch=max_batch, on_step=on_step, encode_prompt=encoder))
    out.seconds = time.perf_counter() - t0
    return out


def check_enforcement_step(req: GenerateJob, rendered: Rendered) -> None:
    """`enforce: "strict"`: a job whose budget ended short fails with the counts, instead of succeeding short."""
    report = rendered.enforcement
    if not (req.strict and report and report.get("applied") and not report.get("satisfied")):
        return
    short = "; ".join(
        f"{a} assigned {v['assigned']} delivered {v['delivered']}"
        for a, v in report["per_attribute"].items()
        if not v["satisfied"]
    )
    raise JobFailed({
        "type": "enforcement_incomplete",
        "message": f"enforcement used its {report['rounds']} rounds and {report['missed']} image(s) still miss their "
        f"assigned class: {short}",
        "enforcement": report,
    })  # fmt: skip


def audit_step(runtime: Runtime, req: GenerateJob, rendered: Rendered) -> dict[str, Any] | None:
    """Every image's attributes and the realised distribution, by the audit classifier (None without one)."""
    if not req.audit or runtime.auditor is None:
        return None
    from adaptors.audit import audit, summarise

    if rendered.audited is not None:
        return summarise(rendered.audited, runtime.auditor.attributes, req.fairness_target).to_dict()
    return audit(runtime.auditor, rendered.images, req.fairness_target).to_dict()


def settle_step(r: Any, req: GenerateJob, hold: LedgerHold | None, report: dict[str, Any] | None) -> dict | None:
    """Count what the audit saw into the ledger, so conditioning misses are made up by later requests."""
    if hold is None:
        return None
    attrs = list(req.fairness_target or {})
    if report is not None:
        got = [{a: img["attributes"][a]["class"] for a in attrs} if img["person"] else None for img in report["images"]]
    else:
        got = list(hold.reserved)
    ledger.settle(r, hold.lid, hold.reserved, got, attrs)
    counts = ledger.delivered(r, hold.lid)
    return {"key": req.ledger, "delivered": counts, "drift": round(ledger.drift(counts, req.fairness_target or {}), 4)}


def publish_step(runtime: Runtime, job_id: str, images: Any, on_image: Callable[[int], None] | None = None) -> int:
    """Write the PNGs the result links to, calling `on_image(k)` as soon as image k is on disk; returns how many."""
    from adaptors.generation import to_uint8

    out_dir = runtime.settings.jobs_dir / job_id
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images)
    for k, px in enumerate(pixels):
        save_png(px, out_dir / f"{k}.png")
        if on_image is not None:
            on_image(k)
    return len(pixels)


def image_ready_publisher(jobs: JobStore, job_id: str, req: GenerateJob, rendered: Rendered) -> Callable[[int], None]:
    """What publish_step calls per written image: records it on the job, so its event stream sends an `image` event
    (index, seed, assigned classes, URL) before the audit and the result."""

    def on_image(k: int) -> None:
        assigned = rendered.assignment[k] if rendered.assignment else None
        jobs.add_ready_image(job_id, {"index": k, "seed": req.seed, "assigned": assigned,
                                      "url": f"/v1/jobs/{job_id}/images/{k}.png"})  # fmt: skip

    return on_image


def build_result(job_id: str, n: int, rendered: Rendered, report: dict[str, Any] | None, decision: Decision,
                 ledger_state: dict | None, timings: dict[str, float], audit_reader: dict | None = None,
                 ) -> dict[str, Any]:  # fmt: skip
    """The job's result record, in the shape service.schemas.GenerateResult declares."""
    assignment = rendered.assignment
    images = report["images"] if report else [None] * n
    return {
        "images": [
            {
                "url": f"/v1/jobs/{job_id}/images/{k}.png",
                "seed_index": k,
                "attributes": images[k]["attributes"] if images[k] else None,
                "person": images[k]["person"] if images[k] else None,
                "person_confidence": images[k]["person_confidence"] if images[k] else None,
                "assigned": assignment[k] if assignment else None,
            }
            for k in range(n)
        ],
        "realised": report["realised"] if report else None,
        "counts": report["counts"] if report else None,
        "bias": report["bias"] if report else None,
        "no_person": report["no_person"] if report else None,
        "target_distance": (report["target_distance"] or None) if report else None,
        "audited": report is not None,
        "audit_reader": audit_reader if report is not None else None,
        "assigned_counts": _assigned_counts(assignment) if assignment else None,
        "guarantee": decision.guarantee,
        "enforcement": rendered.enforcement,
        "ledger": ledger_state,
        "strategy": decision.to_dict(),
        "adaptor": decision.adaptor_id,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }


def _fairness_stats(decision: Decision, rendered: Rendered, report: dict[str, Any] | None, n: int) -> dict[str, int]:
    """Counters for /metrics: images per strategy, requests whose audited counts met the assigned ones, shortfalls."""
    used = decision.used
    stats = {f"images_delivered_{used}": n}
    if report is not None:
        stats["no_person_images"] = sum(1 for img in report["images"] if not img["person"])
        if rendered.assignment:
            from adaptors.audit import ImageAttributes

            per_image = rendered.audited or [
                ImageAttributes(img["person"], img["person_confidence"], img["attributes"]) for img in report["images"]
            ]
            met = all(v["satisfied"] for v in _delivered_vs_assigned(per_image, rendered.assignment).values())
            stats[f"requests_audited_{used}"] = 1
            stats[f"requests_met_assigned_{used}"] = int(met)
    if rendered.enforcement and rendered.enforcement.get("applied"):
        stats["enforcement_rounds"] = int(rendered.enforcement.get("rounds", 0))
        stats["enforcement_shortfalls"] = int(not rendered.enforcement.get("satisfied"))
    return stats


def _gauges(cache: Any, ledger_state: dict | None) -> dict[str, float] | None:
    """Values /metrics shows as the last reporting worker's: the cache's size, the last settled ledger's drift."""
    gauges: dict[str, float] = {}
    if cache is not None:
        gauges["adaptor_cache_bytes"] = int(cache.nbytes)
    if ledger_state is not None:
        gauges["ledger_drift_last"] = float(ledger_state["drift"])
    return gauges or None


def _ledger_stats(ledger_state: dict | None) -> dict[str, int]:
    """Counters whose ratio is the mean ledger drift after a settlement (in thousandths, since counters are integers)."""
    if ledger_state is None:
        return {}
    return {"ledger_settlements": 1, "ledger_drift_milli_total": round(1000 * ledger_state["drift"])}


@dataclass
class Prepared:
    """A claimed job after its request was read, its strategy decided and its adaptor loaded: what the render
    (alone, or as one member of a batch) and the completion steps need."""

    job_id: str
    job: dict[str, Any]
    req: GenerateJob
    spec: Any  # adaptors.generation.GenerationSpec
    decision: Decision
    encoder: Any
    directions: Any
    load_s: float
    t_start: float
    cache_before: tuple[int, int, int, int]
    cache_after: tuple[int, int, int, int]
    hold: LedgerHold | None = None
    batch: dict[str, Any] | None = None  # the shared pass it was rendered in (workers/batching.py)


def prepare_step(jobs: JobStore, job: dict[str, Any], runtime: Runtime, decision: Decision | None = None) -> Prepared | str:
    """Read, decide and load for a claimed job; a job that ends here is recorded and its final state returned."""
    from adaptors.generation import GenerationSpec

    job_id = job["id"]
    t_start = time.time()
    try:
        req = GenerateJob.from_dict(job["request"])
    except (TypeError, ValueError) as exc:
        jobs.finish(job_id, JobState.failed, error={"type": "invalid_request", "message": str(exc)})
        return JobState.failed.value
    before = _cache_counters(runtime.cache)
    spec = GenerationSpec(prompt=req.prompt, num_images=req.num_images, seed=req.seed, steps=req.steps,
                          guidance_scale=req.guidance_scale, negative_prompt=req.negative_prompt,
                          height=req.height, width=req.width)  # fmt: skip
    t0 = time.perf_counter()
    try:
        decision = decision or decide_step(runtime, req)
        encoder, directions = load_step(runtime, decision, req.prompt)
    except JobFailed as exc:
        return fail_step(jobs, job_id, req, None, exc)
    return Prepared(job_id, job, req, spec, decision, encoder, directions, time.perf_counter() - t0, t_start, before,
                    _cache_counters(runtime.cache))  # fmt: skip


def fail_step(jobs: JobStore, job_id: str, req: GenerateJob, hold: LedgerHold | None, exc: JobFailed) -> str:
    """Record a job a step ended, giving back its ledger reservation."""
    if hold is not None:  # release the reservation: nothing was delivered
        release_step(jobs.r, req, hold)
    logger.info("generate %s failed: %s", job_id, exc.error.get("message"))
    if exc.error.get("type") == "enforcement_incomplete":
        incr_stats(jobs.r, enforcement_shortfalls=1)
    jobs.finish(job_id, JobState.failed, error=exc.error)
    return JobState.failed.value


def cancel_step(jobs: JobStore, p: Prepared) -> str:
    """Record a job cancelled between steps, giving back its ledger reservation."""
    if p.hold is not None:
        release_step(jobs.r, p.req, p.hold)
    logger.info("generate %s: cancelled between steps", p.job_id)
    jobs.finish(p.job_id, JobState.cancelled)
    incr_stats(jobs.r, jobs_cancelled=1)
    return JobState.cancelled.value


def run_prepared(jobs: JobStore, runtime: Runtime, p: Prepared) -> str:
    """A prepared job rendered on its own (chunked by max_batch), then completed."""
    from adaptors.generation import GenerationCancelled

    def on_step(step: int, total: int) -> None:
        if jobs.step_and_check_cancel(p.job_id, step, total):
            raise GenerationCancelled(p.job_id)

    try:
        jobs.set_progress(p.job_id, 0, p.req.steps * -(-p.req.num_images // runtime.settings.max_batch))
        p.hold = reserve_step(jobs.r, runtime, p.req, p.decision)
        rendered = render_step(runtime, p.req, p.decision, p.spec, p.encoder, p.directions, p.hold, on_step)
    except JobFailed as exc:
        return fail_step(jobs, p.job_id, p.req, p.hold, exc)
    except BaseException as exc:
        if not isinstance(exc, GenerationCancelled):
            if p.hold is not None:
                release_step(jobs.r, p.req, p.hold)
            raise
        return cancel_step(jobs, p)
    return complete_step(jobs, runtime, p, rendered)


def complete_step(jobs: JobStore, runtime: Runtime, p: Prepared, rendered: Rendered) -> str:
    """After the render: strict enforcement's check, publish, audit, settle, result, counters, finish."""
    try:
        check_enforcement_step(p.req, rendered)
    except JobFailed as exc:
        return fail_step(jobs, p.job_id, p.req, p.hold, exc)
    job_id, req, decision = p.job_id, p.req, p.decision
    n = publish_step(runtime, job_id, rendered.images, image_ready_publisher(jobs, job_id, req, rendered))
    t2 = time.perf_counter()
    report = audit_step(runtime, req, rendered)
    audit_s = time.perf_counter() - t2
    ledger_state = settle_step(jobs.r, req, p.hold, report)
    timings = {"queue_s": max(0.0, p.t_start - float(p.job.get("created", p.t_start))), "load_s": p.load_s,
               "generate_s": rendered.seconds, "audit_s": audit_s, "total_s": time.time() - p.t_start}  # fmt: skip
    result = build_result(job_id, n, rendered, report, decision, ledger_state, timings, audit_reader_record(runtime, decision))
    result["adaptor_application"] = application_step(runtime.cache, decision, req.prompt)
    result["batch"] = p.batch
    cache, before, after = runtime.cache, p.cache_before, p.cache_after
    # counted before the job shows as succeeded, so a client that sees it finished also sees it in the stats
    incr_stats(
        jobs.r,
        images_generated=n,
        jobs_succeeded=1,
        adaptor_cache_hits=after[0] - before[0],
        adaptor_cache_misses=after[1] - before[1],
        adaptor_swaps=after[2] - before[2],
        adaptor_cache_evictions=after[3] - before[3],
        gauges=_gauges(cache, ledger_state),
        **_fairness_stats(decision, rendered, report, n),
        **_ledger_stats(ledger_state),
    )
    jobs.finish(job_id, JobState.succeeded, result=result)
    logger.info("generate %s: %d images in %.2fs (strategy %s)", job_id, n, rendered.seconds, decision.used)
    return JobState.succeeded.value


def audit_reader_record(runtime: Runtime, decision: Decision) -> dict[str, Any] | None:
    """The reader that audited, and whether it also steered this job (classifier guidance in `assign`, or an
    adaptor trained or calibrated against it)."""
    if runtime.auditor is None:
        return None
    from adaptors.readers.registry import audit_record

    guided = decision.used == Strategy.assign.value and runtime.settings.assign_classifier_scale > 0
    return audit_record(runtime.auditor, runtime.classifier, guided or decision.adaptor_id is not None)


def _cache_counters(cache: Any) -> tuple[int, int, int, int]:
    if cache is None:
        return (0, 0, 0, 0)
    return tuple(int(getattr(cache, name, 0)) for name in ("hits", "misses", "swaps", "evictions"))  # type: ignore[return-value]
