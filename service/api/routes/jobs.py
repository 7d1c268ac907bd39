"""GET/DELETE /v1/jobs/{id} and the job's images."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from common.jobs import JobStore
from common.schemas import JobKind, JobState
from service.api.deps import Caller, CallerDep, SettingsDep, StoreDep
from service.api.events import SSE_RESPONSES, job_event_stream, job_view
from service.api.jobview import load_job, public_job
from service.errors import NotFound, error_responses
from service.schemas import JobPublic

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_IMAGE_INDEX = re.compile(r"^[0-9]{1,6}$")


def _get(request: Request, store: JobStore, job_id: str, caller: Caller) -> JobPublic:
    return JobPublic.model_validate(public_job(request, store, load_job(store, job_id, JobKind.generate, caller)))


@router.get("/{job_id}", name="get_job", response_model=JobPublic, responses=error_responses(401, 403, 404, 503))
def get_job(job_id: str, request: Request, store: StoreDep, caller: CallerDep) -> JobPublic:
    """State, queue position while queued, progress (step i of n), result or error. Another API key's job is a 404."""
    return _get(request, store, job_id, caller)


@router.get("/{job_id}/events", response_class=EventSourceResponse, responses=SSE_RESPONSES | error_responses(401, 403, 404))
async def job_events(job_id: str, request: Request, store: StoreDep, caller: CallerDep) -> EventSourceResponse:
    """Live progress as Server-Sent Events: `state` and `progress` (step i of n) as they change, then `done` with the
    whole job (what GET on the job answers), then the stream ends. Same ownership as GET: another API key's job is a
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
    return JSONResponse(view.model_dump(mode="json"), status_code=status)


@router.get(
    "/{job_id}/images/{index}.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG"}} | error_responses(401, 403, 404),
)
async def get_image(job_id: str, index: str, settings: SettingsDep, store: StoreDep, caller: CallerDep) -> FileResponse:
    """Image `index` (0-based) of a generate job, once the worker has written it."""
    await run_in_threadpool(load_job, store, job_id, JobKind.generate, caller)
    missing = NotFound(f"index: job {job_id!r} has no image {index!r}", param="index", code="image_not_found")
    if not _IMAGE_INDEX.match(index):
        raise missing
    root = settings.jobs_dir.resolve()
    path = (root / job_id / f"{int(index)}.png").resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise missing
    return FileResponse(Path(path), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
