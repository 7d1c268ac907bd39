"""Server-Sent Events for a job: what changed since the last look, then the final job, then the stream ends.

Events (each `data` is JSON):
- `state`: the job's id, state, queue position and progress, whenever its state changes (the first event is one);
- `progress`: the same snapshot, whenever the step (or any progress field) moves;
- `curve`: a finetune's new curve points (loss, measured bias, ...) since the last event;
- `image`: a generate job's image is written and can be fetched, one event per image (its `index`, the request's
  `seed` and the image's `seed_index`, its `assigned` classes, its `url`), always before `done`. Images are written
  when their request's generation ends (the batches of one request finish together), then audited together, so
  the events of one job arrive close together, just before `done`, which carries each image's audited classes;
- `done`: the whole job, exactly as GET on the job answers, once it has finished;
- `error`: the record disappeared, the stream reached its time limit, or too many streams are open (`code` says
  which: `job_lost`, `stream_timeout`, `too_many_streams`); reconnect or poll.

The stream reads the job store as polling does (backing off from 10 ms to 250 ms), so it adds no writer and no
broker traffic; a client that disconnects stops its reads.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from common.jobs import JobStore
from common.schemas import JobState
from service.api.jobview import MAX_POLL_INTERVAL_S, POLL_INTERVAL_S, public_job
from service.images import ready_image_event
from service.limits import WaitHolders

MAX_STREAM_S = 3600.0  # a stream ends after this long with an `error` event (code `stream_timeout`); clients reconnect
PING_S = 15  # comment lines that keep proxies from closing an idle stream

SSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "Server-Sent Events: `state`, `progress`, `curve` (finetunes), `image` (generate jobs, one per "
        "image written), then `done` with the whole job.",
    }
}


def _snapshot(job: dict[str, Any], queue_position: int | None) -> dict[str, Any]:
    return {"id": job["id"], "state": job["state"], "queue_position": queue_position, "progress": job.get("progress")}


def _event(kind: str, data: dict[str, Any], seq: int) -> dict[str, str]:
    return {"event": kind, "data": json.dumps(data, separators=(",", ":")), "id": str(seq)}


async def _stream(store: JobStore, job_id: str, view: Callable[[dict[str, Any]], dict[str, Any]],
                  holders: WaitHolders, max_s: float) -> AsyncIterator[dict[str, str]]:  # fmt: skip
    seq = 0
    if not holders.acquire():  # acquired here, not before: a generator never started never releases
        yield _event("error", {"id": job_id, "code": "too_many_streams", "message": "too many open streams; poll the job"}, 1)
        return
    last_state: str | None = None
    last_progress: Any = None
    curve_seen = 0
    images_seen: set[Any] = set()
    deadline = time.monotonic() + max_s
    interval = POLL_INTERVAL_S
    try:
        while True:
            job = await run_in_threadpool(store.get, job_id)
            if job is None:
                seq += 1
                yield _event("error", {"id": job_id, "code": "job_lost", "message": "the job record disappeared"}, seq)
                return
            state = JobState(job["state"])
            if job["state"] != last_state or job.get("progress") != last_progress:
                position = None
                if state is JobState.queued:
                    position = await run_in_threadpool(store.queue_position, job_id, job["queue"])
                seq += 1
                yield _event("state" if job["state"] != last_state else "progress", _snapshot(job, position), seq)
                last_state, last_progress = job["state"], job.get("progress")
                interval = POLL_INTERVAL_S
            curve = job.get("curve") or []
            if len(curve) > curve_seen:
                seq += 1
                yield _event("curve", {"id": job_id, "points": curve[curve_seen:]}, seq)
                curve_seen = len(curve)
            for image in job.get("images_ready") or []:
                if isinstance(image, dict) and image.get("index") not in images_seen:
                    images_seen.add(image.get("index"))
                    seq += 1
                    yield _event("image", ready_image_event(job, image), seq)
            if state.finished:
                seq += 1
                yield _event("done", await run_in_threadpool(view, job), seq)
                return
            if time.monotonic() > deadline:
                seq += 1
                yield _event("error", {"id": job_id, "code": "stream_timeout", "message": "reconnect or poll the job"}, seq)
                return
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, MAX_POLL_INTERVAL_S)
    finally:
        holders.release()


def job_event_stream(request: Request, store: JobStore, job_id: str,
                     view: Callable[[dict[str, Any]], dict[str, Any]]) -> EventSourceResponse:  # fmt: skip
    """The SSE response for a job the caller may see (check that first: a refusal must be an ordinary error).

    Open streams count against `max_wait_holders`, like `Prefer: wait` requests: past it, the stream is one `error`
    event (code `too_many_streams`) and the client polls instead.
    """
    return EventSourceResponse(
        _stream(store, job_id, view, request.app.state.wait_holders, MAX_STREAM_S),
        ping=PING_S,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def job_view(request: Request, store: JobStore, model: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A function from a job record to what GET on the job answers (model: JobPublic or FinetunePublic)."""

    def view(job: dict[str, Any]) -> dict[str, Any]:
        return model.model_validate(public_job(request, store, job)).model_dump(mode="json", by_alias=True)

    return view
