"""GET/DELETE /v1/jobs/{id} and the job's images."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from common.jobs import JobStore
from common.schemas import JobKind, JobState
from service.api.deps import Caller, CallerDep, SettingsDep, StoreDep
from service.api.events import SSE_RESPONSES, job_event_stream, job_view
from service.api.jobview import load_job, public_job
from service.errors import NotFound, error_responses
from service.images import EXTENSIONS, FORMATS, encode, image_metadata, image_path
from service.schemas import JobPublic

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_IMAGE_NAME = re.compile(r"^([0-9]{1,6})\.(png|webp|jpeg|jpg)$", re.IGNORECASE)


def _get(request: Request, store: JobStore, job_id: str, caller: Caller) -> JobPublic:
    return JobPublic.model_validate(public_job(request, store, load_job(store, job_id, JobKind.generate, caller)))


@router.get("/{job_id}", name="get_job", response_model=JobPublic, responses=error_responses(401, 403, 404, 503))
def get_job(job_id: str, request: Request, store: StoreDep, caller: CallerDep) -> JobPublic:
    """State, queue position while queued, progress (step i of n), result or error. Another API key's job is a 404."""
    return _get(request, store, job_id, caller)


@router.get("/{job_id}/events", response_class=EventSourceResponse, responses=SSE_RESPONSES | error_responses(401, 403, 404))
async def job_events(job_id: str, request: Request, store: StoreDep, caller: CallerDep) -> EventSourceResponse:
    """Live progress as Server-Sent Events: `state` and `progress` (step i of n) as they change, `image` per image as
    soon as it is written (index, seed, assigned classes, URL), then `done` with the whole job (what GET on the job
    answers), then the stream ends. Same ownership as GET: another API key's job is a
    404."""
    await run_in_threadpool(load_job, store, job_id, JobKind.generate, caller)
    return job_event_stream(request, store, job_id, job_view(request, store, JobPublic))


@router.delete(
    "/{job_id}",
    response_model=JobPublic,
    responses={202: {"model": JobPublic, "description": "Still running; it stops at its next step."}}
    | error_responses(401, 403, 404, 503),
)
def cancel_job(job_id: str, request: Request, store: StoreDep, caller: CallerDep) -> JSONResponse:
    """Cancel: a queued job is cancelled at once (200), a running one at its next step (202)."""
    load_job(store, job_id, JobKind.generate, caller)
    store.request_cancel(job_id)
    view = _get(request, store, job_id, caller)
    status = 202 if view.state is JobState.running else 200
    return JSONResponse(view.model_dump(mode="json", by_alias=True), status_code=status)


@router.get(
    "/{job_id}/images/{name}",
    name="get_image",
    response_class=Response,
    responses={200: {"content": {mime: {} for _, mime in FORMATS.values()}, "description": "The image"}}
    | error_responses(401, 403, 404),
)
async def get_image(job_id: str, name: str, settings: SettingsDep, store: StoreDep, caller: CallerDep) -> Response:
    """Image `index` (0-based) of a generate job as `{index}.png`, `.webp` or `.jpeg`, once the worker has written it,
    with its prompt, seed, assigned and audited classes in its metadata (PNG text chunks; EXIF in JPEG and WebP)."""
    job = await run_in_threadpool(load_job, store, job_id, JobKind.generate, caller)
    missing = NotFound(f"index: job {job_id!r} has no image {name!r}", param="index", code="image_not_found")
    match = _IMAGE_NAME.match(name)
    if not match:
        raise missing
    index, fmt = int(match.group(1)), EXTENSIONS[match.group(2).lower()]
    path = image_path(settings.jobs_dir, job_id, index)
    if path is None:
        raise missing
    data = await run_in_threadpool(encode, path, fmt, image_metadata(job, index))
    return Response(data, media_type=FORMATS[fmt][1], headers={"Cache-Control": "private, max-age=3600"})
