"""Dynamic batching: a generate task gathers the compatible jobs waiting beside it and renders them in one pass.

Most traffic is one or a few images per request, and a denoising pass over 16 images costs far less
than 16 passes over one (testbed on CPU: 0.76 s against 16 x 0.22 s). So the task that claims a job
that can share a pass (no adaptor, or the same weight adaptor; no per-request guidance directions,
prompt encoder or classifier steering; at most `max_batch` images) looks in the job store's queue of
waiting jobs for others with the same steps, size and adaptor, claims each with the same atomic step
a task claims its own job with, and renders all of them as rows of one batch
(adaptors.assign.denoise_rows), each image with its own prompt, negative prompt, seed, guidance
scale and `assign` conditioning. When the batch is not full and the queue is empty it waits for
more, up to FAIRDIFF_BATCH_WINDOW_MS after the last request that joined (at most WINDOW_CAP windows
in all), but only while the stream is busy (its last pass served more than one request), so a lone
client never waits.

Why a gathering step on the job store and not the celery-batches task class: celery-batches buffers
messages in the worker and needs a prefetch multiplier of 0 or above `flush_every` to see several, so
a killed worker holds the whole prefetched buffer until the visibility timeout (hours here), and the
task gets one list, inside which per-job retry and failure would have to be rebuilt. Gathering
keeps every guarantee per job with the machinery already there: each job keeps its own Celery
message (late acknowledgement, prefetch 1); a gathered job is claimed
atomically (JobStore.try_mark_running) and leased by this worker's liveness beat (workers/recovery.py),
so a peer that receives its message leaves it alone (workers/lifecycle.py), the message arriving
after the batch finds it finished, and a worker killed mid-batch leaves every member to the recovery
sweep and its own redelivered message: each runs again, none twice once finished. Progress, cancel,
errors, enforcement, audit and ledger stay per job; a member cancelled mid-pass is closed at the next
step and its rows finish unread, so the other members' pixels do not change.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from typing import Any

from common.jobs import JOB_KEY, QUEUED_ZSET, JobStore
from common.schemas import GenerateJob, JobState, Strategy
from workers.inference import (
    JobFailed,
    Prepared,
    Rendered,
    cancel_step,
    complete_step,
    decide_step,
    enforce_step,
    fail_step,
    prepare_step,
    release_step,
    reserve_step,
)
from workers.recovery import executing
from workers.runtime import Runtime

logger = logging.getLogger(__name__)

SCAN = 64  # waiting jobs looked at per poll, oldest first
POLL_S = 0.002
WINDOW_CAP = 4  # the longest a pass waits for more requests, in batching windows
PROGRESS_EVERY_S = 0.05  # progress and cancel flags are read this often during a pass

_last_pass_jobs = 1  # requests the previous pass of this process served: above 1, the stream is busy


BatchKey = tuple[int, int | None, int | None, str | None]


def batch_key(runtime: Runtime, req: GenerateJob, decision: Any) -> BatchKey | None:
    """(steps, height, width, adaptor id) for a job that can share a pass; None for one that runs alone as before.

    An adaptor job shares only with jobs of the same adaptor, whose weights are swapped in once for the whole
    pass; `shares_weights_only` tells, once the adaptor is loaded, whether it acts through weights alone."""
    if decision.used == Strategy.adaptor.value:
        if decision.adaptor_id is None or req.num_images > runtime.settings.max_batch:
            return None
        return (req.steps, req.height, req.width, decision.adaptor_id)
    if decision.adaptor_id is not None or decision.used not in (Strategy.none.value, Strategy.assign.value):
        return None
    if req.num_images > runtime.settings.max_batch:
        return None
    if decision.used == Strategy.assign.value and _steered(runtime, req):
        return None
    return (req.steps, req.height, req.width, None)


def shares_weights_only(prepared: Prepared) -> bool:
    """Whether a prepared job's adaptor (if any) acts through the swapped-in weights alone (a LoRA, a UNet delta):
    one with its own prompt encoder (prefix, mapping) or guidance directions (IDA) renders on its own."""
    return prepared.encoder is None and prepared.directions is None


def _steered(runtime: Runtime, req: GenerateJob) -> bool:
    """Whether `assign` would add classifier guidance (attributes of more than two classes): not batched."""
    classifier = runtime.classifier
    if classifier is None or runtime.settings.assign_classifier_scale <= 0 or not req.fairness_target:
        return False
    return any(len(classifier.attributes.get(a, ())) > 2 for a in req.fairness_target)


def gather(jobs: JobStore, runtime: Runtime, worker: str, leader: Prepared, leases: ExitStack) -> tuple[list[Prepared], float]:
    """The leader and the compatible waiting jobs claimed beside it (each leased in `leases`); and the seconds spent."""
    global _last_pass_jobs
    settings = runtime.settings
    key = batch_key(runtime, leader.req, leader.decision)
    queue = QUEUED_ZSET.format(queue=leader.job.get("queue", "inference"))
    members, images, seen = [leader], leader.req.num_images, {leader.job_id}
    window = settings.batch_window_ms / 1000.0 if _last_pass_jobs > 1 else 0.0
    t0 = last_arrival = time.perf_counter()
    while images < settings.max_batch:
        for job_id in jobs.r.zrange(queue, 0, SCAN - 1):
            if job_id in seen or images >= settings.max_batch:
                continue
            seen.add(job_id)
            member = _try_member(jobs, runtime, worker, job_id, key, settings.max_batch - images, leases)
            if member is not None:
                members.append(member)
                images += member.req.num_images
                last_arrival = time.perf_counter()
        now = time.perf_counter()
        # wait while requests keep arriving (clients served by the last pass come back one after another),
        # up to `window` after the last one and WINDOW_CAP windows in all
        if images >= settings.max_batch or now - last_arrival >= window or now - t0 >= WINDOW_CAP * window:
            break
        time.sleep(POLL_S)
    _last_pass_jobs = len(members)
    return members, time.perf_counter() - t0


def _try_member(jobs: JobStore, runtime: Runtime, worker: str, job_id: str, key: Any, room: int,
                leases: ExitStack) -> Prepared | None:  # fmt: skip
    """Claim a waiting job for this pass if it fits; None if it does not (its own message will run it)."""
    job = jobs.get(job_id)
    if not job or job["state"] != JobState.queued.value or job["cancel"]:
        return None
    try:
        req = GenerateJob.from_dict(job["request"])
        if req.num_images > room or (req.steps, req.height, req.width) != key[:3] or req.adaptor_id not in (None, key[3]):
            return None
        decision = decide_step(runtime, req)
    except (JobFailed, TypeError, ValueError):
        return None  # its own task records why
    if batch_key(runtime, req, decision) != key or not jobs.try_mark_running(job_id, worker, JobState.queued.value):
        return None
    leases.enter_context(executing(job_id))  # this process's beats now hold its lease
    prepared = prepare_step(jobs, jobs.get(job_id) or job, runtime, decision)
    return prepared if isinstance(prepared, Prepared) else None


def run_batch(jobs: JobStore, runtime: Runtime, worker: str, leader: Prepared) -> str:
    """Gather, render every member in one pass, then complete each member on its own; returns the leader's state."""
    with ExitStack() as leases:
        members, wait_s = gather(jobs, runtime, worker, leader, leases)
        states = _run_members(jobs, runtime, members, wait_s)
    return states[leader.job_id]


def _run_members(jobs: JobStore, runtime: Runtime, members: list[Prepared], wait_s: float) -> dict[str, str]:
    from adaptors.generation import GenerationCancelled

    states: dict[str, str] = {}
    live: list[Prepared] = []
    for m in members:
        try:
            jobs.set_progress(m.job_id, 0, m.req.steps)
            m.hold = reserve_step(jobs.r, runtime, m.req, m.decision)
            live.append(m)
        except JobFailed as exc:
            states[m.job_id] = fail_step(jobs, m.job_id, m.req, m.hold, exc)
    active = {m.job_id for m in live}

    last = [0.0]

    def on_step(step: int) -> None:
        now = time.perf_counter()
        if step < steps and now - last[0] < PROGRESS_EVERY_S:
            return  # one store round trip per PROGRESS_EVERY_S, not per step: on a busy CPU each costs a context switch
        last[0] = now
        pipe = jobs.r.pipeline(transaction=False)
        ids = [m.job_id for m in live if m.job_id in active]
        for job_id in ids:
            pipe.hset(JOB_KEY.format(id=job_id), "progress", json.dumps({"step": step, "total": steps}))
            pipe.hget(JOB_KEY.format(id=job_id), "cancel")
        flags = pipe.execute()[1::2]
        for job_id, flag in zip(ids, flags):
            if flag == "1":  # leaves the pass now; its rows finish unread, so the others' pixels do not change
                active.discard(job_id)
                states[job_id] = cancel_step(jobs, next(m for m in live if m.job_id == job_id))
        if not active:
            raise GenerationCancelled("every job of the pass was cancelled")

    steps = members[0].req.steps
    try:
        rendered = render_batch(runtime, live, on_step) if live else {}
    except GenerationCancelled:
        rendered = {}
    except BaseException:
        for m in live:  # the pass itself failed: release what was reserved; the task records the leader's error
            if m.job_id in active and m.hold is not None:
                release_step(jobs.r, m.req, m.hold)
        raise
    if live:
        from common.batch_stats import record_batch

        images = sum(m.req.num_images for m in live)
        render_s = max((r.seconds for r in rendered.values()), default=0.0)
        record_batch(jobs.r, len(live), images, wait_s, render_s)
        logger.info("batch of %d jobs (%d images) in %.2fs after %.3fs gathering", len(live), images, render_s, wait_s)
    for m in live:
        if m.job_id not in active or m.job_id not in rendered:
            continue
        m.batch = {"jobs": len(live), "images": sum(x.req.num_images for x in live), "wait_s": round(wait_s, 4)}
        states[m.job_id] = _complete_member(jobs, runtime, m, rendered[m.job_id])
    return states


def _complete_member(jobs: JobStore, runtime: Runtime, m: Prepared, rendered: Rendered) -> str:
    """Enforcement (when asked; regenerates this job's misses on its own), then the usual completion steps."""
    from adaptors.generation import GenerationCancelled

    def on_step(step: int, total: int) -> None:
        if jobs.step_and_check_cancel(m.job_id, step, total):
            raise GenerationCancelled(m.job_id)

    if m.req.enforce and runtime.auditor is not None and rendered.assignment is not None:
        try:
            enforced = enforce_step(runtime, m.spec, rendered.assignment, rendered.images, on_step)
            rendered.images, rendered.audited, rendered.enforcement = enforced
        except GenerationCancelled:
            return cancel_step(jobs, m)
    return complete_step(jobs, runtime, m, rendered)


def render_batch(runtime: Runtime, members: list[Prepared], on_step: Any) -> dict[str, Rendered]:
    """Every member's images from one shared pass: plain rows, or `assign` rows conditioned on each image's class."""
    from adaptors.assign import assigned_rows, class_texts_for, denoise_rows, image_rows, joint_assignment

    settings = runtime.settings
    rows: list[Any] = []
    spans: list[tuple[Prepared, int, int, list[dict[str, str]] | None]] = []
    for m in members:
        assignment = None
        if m.decision.used == Strategy.assign.value and m.req.fairness_target:
            reserved = m.hold.reserved if m.hold else joint_assignment(m.spec.num_images, m.req.fairness_target, m.spec.seed)
            assignment = [dict(a) for a in reserved]
            member_rows = assigned_rows(m.spec, assignment, class_texts_for(settings.base_model), settings.assign_mode,
                                        settings.assign_guidance_weight)  # fmt: skip
        else:
            member_rows = image_rows(m.spec)
        spans.append((m, len(rows), len(rows) + len(member_rows), assignment))
        rows.extend(member_rows)
    first = members[0].spec
    t0 = time.perf_counter()
    images = denoise_rows(runtime.pipe, rows, first.steps, first.height, first.width, 0, on_step)
    seconds = time.perf_counter() - t0
    return {m.job_id: Rendered(images[a:b], assignment, seconds=seconds) for m, a, b, assignment in spans}
