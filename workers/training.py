"""The body of the finetune task: run a trainer, publish its adaptor atomically.

The trainer writes into a private staging folder that the store only sees once `publish`
hashes and renames it; a failed or cancelled job deletes that folder, so no half adaptor is
ever listed. The checkpoint folder outlives a killed worker, so the redelivered task resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from common.disk_layout import checkpoints_dir, staging_path
from common.jobs import JobStore
from common.schemas import FinetuneJob, JobState
from workers.lifecycle import claim
from workers.runtime import Runtime, get_runtime, incr_stats

logger = logging.getLogger(__name__)


def staging_dir(runtime: Runtime, job_id: str) -> Path:
    return staging_path(runtime.settings.adaptor_dir, job_id)


def checkpoint_dir(runtime: Runtime, job_id: str) -> Path:
    return checkpoints_dir(runtime.settings.data_dir) / job_id


def _manifest_dict(manifest: Any) -> dict[str, Any]:
    if hasattr(manifest, "to_dict"):
        return dict(manifest.to_dict())
    if dataclasses.is_dataclass(manifest):
        return dataclasses.asdict(manifest)
    return dict(manifest)


def run_finetune(jobs: JobStore, job_id: str, worker: str, runtime: Runtime | None = None) -> str:
    """Run one finetune job to a final state; returns that state's name."""
    job, outcome = claim(jobs, job_id, worker, "finetune")
    if job is None:
        return str(outcome)
    t_start = time.time()
    try:
        req = FinetuneJob.from_dict(job["request"])
    except (TypeError, ValueError) as exc:
        jobs.finish(job_id, JobState.failed, error={"type": "invalid_request", "message": str(exc)})
        return JobState.failed.value

    try:
        from adaptors.trainers import TRAINERS
    except ImportError as exc:
        jobs.finish(job_id, JobState.failed, error={"type": "not_available", "message": f"no trainers: {exc}"})
        return JobState.failed.value
    trainer = TRAINERS.get(req.method)
    if trainer is None:
        message = f"unknown finetune method {req.method!r}; known: {sorted(TRAINERS)}"
        jobs.finish(job_id, JobState.failed, error={"type": "not_implemented", "message": message})
        return JobState.failed.value

    runtime = runtime or get_runtime()
    if req.base_model not in runtime.base_model_names():
        jobs.finish(job_id, JobState.failed, error={
            "type": "base_model_mismatch",
            "message": f"this training worker serves {runtime.settings.base_model!r}, not {req.base_model!r}"})  # fmt: skip
        return JobState.failed.value
    if runtime.store is None:
        jobs.finish(job_id, JobState.failed, error={"type": "not_available", "message": "no adaptor store"})
        return JobState.failed.value
    if runtime.classifier is None:
        message = "finetuning needs an attribute classifier for the base model (FAIRDIFF_CLASSIFIER)"
        jobs.finish(job_id, JobState.failed, error={"type": "not_available", "message": message})
        return JobState.failed.value

    staging = staging_dir(runtime, job_id)
    ckpt = checkpoint_dir(runtime, job_id)
    shutil.rmtree(staging, ignore_errors=True)  # a previous, killed attempt's partial output
    staging.mkdir(parents=True)
    ckpt.mkdir(parents=True, exist_ok=True)

    def progress(point: dict[str, Any]) -> None:
        step, total = point.get("step"), point.get("total")
        extra = {k: v for k, v in point.items() if k not in ("step", "total")}
        if step is not None and total is not None:
            jobs.set_progress(job_id, int(step), int(total), **extra)
        jobs.append_curve(job_id, {"t": round(time.time() - t_start, 3), **point})

    def should_stop() -> bool:
        return jobs.cancel_requested(job_id)

    from adaptors.caption_data import FIELD as DATASET_FIELD
    from adaptors.caption_data import DatasetError
    from adaptors.fairness_gain import FinetuneRefused
    from adaptors.generation import GenerationCancelled

    try:
        try:
            trainer(req, runtime.pipe, runtime.training_classifier(), staging, ckpt, progress, should_stop)
            cancelled = jobs.cancel_requested(job_id)
        except GenerationCancelled:
            cancelled = True
        except DatasetError as exc:  # a training set the operator must fix: checked before any training
            fail_finetune(jobs, runtime, job_id, {"type": "invalid_request", "message": str(exc), "param": DATASET_FIELD})
            incr_stats(jobs.r, finetunes_failed=1)
            logger.warning("finetune %s: %s", job_id, exc)
            return JobState.failed.value
        except FinetuneRefused as exc:  # a gate (subject lost, no fairness gain): the finished finetune fails for good
            fail_finetune(jobs, runtime, job_id, exc.error())
            incr_stats(jobs.r, finetunes_failed=1)
            logger.warning("finetune %s: %s", job_id, exc)
            return JobState.failed.value
        if cancelled:
            _discard(staging, ckpt)
            jobs.finish(job_id, JobState.cancelled)
            incr_stats(jobs.r, finetunes_cancelled=1)
            logger.info("finetune %s: cancelled", job_id)
            return JobState.cancelled.value
        manifest = runtime.store.publish(staging)
    except BaseException:
        # Failure (or the worker being stopped): no half adaptor. Keep the checkpoint unless the
        # job failed for good, so a redelivered task after a kill resumes instead of restarting.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    info = _manifest_dict(manifest)
    adaptor_id = info.get("id") or getattr(manifest, "id", None)
    jobs.finish(job_id, JobState.succeeded, result={
        "adaptor_id": adaptor_id, "manifest": info, "timings": {"total_s": round(time.time() - t_start, 3)}})  # fmt: skip
    incr_stats(jobs.r, finetunes_succeeded=1)
    logger.info("finetune %s: published adaptor %s", job_id, adaptor_id)
    return JobState.succeeded.value


def _discard(staging: Path, ckpt: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)


def fail_finetune(jobs: JobStore, runtime: Runtime | None, job_id: str, error: dict[str, Any]) -> None:
    """A finetune failed for good: record it and drop its checkpoint (nothing will resume it)."""
    jobs.finish(job_id, JobState.failed, error=error)
    if runtime is not None:
        _discard(staging_dir(runtime, job_id), checkpoint_dir(runtime, job_id))
