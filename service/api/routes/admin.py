"""Admin: finetune jobs on the training queue, and retiring adaptors. Every route needs AdminDep."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from celery import Celery
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from common import disk_layout
from common.celery_config import FINETUNE_TASK, TRAINING_QUEUE
from common.finetune_config import check_hyperparameters, check_prompts
from common.jobs import JobStore
from common.schemas import FieldError, FinetuneJob, JobKind, JobState, ModelInfo, validate_target
from common.settings import Settings
from service.api.deps import ADMIN_TENANT, AdminDep, CeleryDep, SettingsDep, StoreDep
from service.api.events import SSE_RESPONSES, job_event_stream, job_view
from service.api.jobview import job_url, load_job, public_job
from service.errors import Conflict, InvalidField, NotFound, ServiceUnavailable, error_responses
from service.schemas import (
    FINETUNE_METHODS,
    TARGETLESS_METHODS,
    AdaptorRetired,
    FinetuneList,
    FinetunePublic,
    FinetuneRequest,
    JobAccepted,
)
from service.validation import check_prompt, load_manifest, require_model_info
from service.webhooks import check_webhook, register

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=error_responses(401, 403))


def prompt_set(info: ModelInfo, name: str, field: str = "prompt_set") -> list[str]:
    """The prompts of a named set, as the base model's workers publish them (ModelInfo.prompt_sets)."""
    prompts = info.prompt_sets.get(name)
    if prompts is None:
        raise InvalidField(
            f"{field}: unknown prompt set {name!r}; known: {sorted(info.prompt_sets)}", param=field, code="unknown_prompt_set"
        )
    return list(prompts)


def _prompt_list(info, prompts: list[str], field: str) -> list[str]:
    for i, p in enumerate(prompts):
        if not p.strip():
            raise InvalidField(f"{field}.{i}: must not be empty", param=f"{field}.{i}", code="empty_prompt")
        check_prompt(info, p, f"{field}.{i}")
    return list(prompts)


def _eval_prompts(body: FinetuneRequest, info: ModelInfo) -> list[str] | None:
    """Held-out prompts for the before/after metrics: given, named, or the training set's held-out partner."""
    if body.eval_prompts is not None and body.eval_prompt_set is not None:
        raise InvalidField("eval_prompts: give eval_prompts or eval_prompt_set, not both", param="eval_prompts",
                           code="prompts_or_prompt_set")  # fmt: skip
    if body.eval_prompts is not None:
        return _prompt_list(info, body.eval_prompts, "eval_prompts")
    if body.eval_prompt_set is not None:
        return prompt_set(info, body.eval_prompt_set, "eval_prompt_set")
    held_out = info.held_out_sets.get(body.prompt_set or "")
    return prompt_set(info, held_out) if held_out else None


def _finetune_target(body: FinetuneRequest, info: ModelInfo) -> dict[str, dict[str, float]]:
    """The validated target; none for the methods that take none (and a 422 when one is given to them)."""
    if body.method in TARGETLESS_METHODS:
        if body.fairness_target:
            raise InvalidField(f"fairness_target: method {body.method!r} takes none (it debiases without a target)",
                               param="fairness_target", code="invalid_fairness_target")  # fmt: skip
        return {}
    if body.fairness_target is None:
        raise InvalidField(f"fairness_target: method {body.method!r} needs one", param="fairness_target",
                           code="invalid_fairness_target")  # fmt: skip
    try:
        return validate_target(body.fairness_target, info.attributes)
    except FieldError as exc:
        raise InvalidField.from_field_error(exc, code="invalid_fairness_target") from exc


def build_finetune_job(body: FinetuneRequest, settings: Settings, store: JobStore) -> FinetuneJob:
    if body.method not in FINETUNE_METHODS:
        raise InvalidField(
            f"method: unknown finetune method {body.method!r}; known: {sorted(FINETUNE_METHODS)}",
            param="method",
            code="unknown_method",
        )
    try:  # the method's own checks, torch-free: a bad hyperparameter is refused here, not minutes later on a worker
        config = check_hyperparameters(body.method, dict(body.hyperparameters))
    except ValueError as exc:
        raise InvalidField(str(exc), param=str(exc).split(":", 1)[0], code="invalid_hyperparameters") from exc
    base_model = body.base_model or settings.base_model
    if base_model != settings.base_model and store.model_info(base_model) is None:
        raise InvalidField(
            f"base_model: no worker has registered base model {base_model!r}", param="base_model", code="unknown_model"
        )
    info = require_model_info(store, base_model)
    target = _finetune_target(body, info)

    if (body.prompts is None) == (body.prompt_set is None):
        raise InvalidField(
            "prompts: give either prompts or prompt_set (exactly one)", param="prompts", code="prompts_or_prompt_set"
        )
    if body.prompt_set is not None:
        prompts = prompt_set(info, body.prompt_set)
    else:
        prompts = _prompt_list(info, body.prompts or [], "prompts")
    try:
        check_prompts(config, prompts)
    except ValueError as exc:
        raise InvalidField(str(exc), param="prompts", code="invalid_prompts") from exc
    return FinetuneJob(
        method=body.method,
        base_model=base_model,
        fairness_target=target,
        prompts=prompts,
        prompt_set=body.prompt_set,
        hyperparameters=dict(body.hyperparameters),
        name=body.name,
        eval_prompts=_eval_prompts(body, info),
    )


@router.post(
    "/finetunes",
    status_code=202,
    response_model=JobAccepted,
    responses=error_responses(400, 413, 422, 503),
    summary="Start a finetune job on the training queue",
)
def create_finetune(
    body: FinetuneRequest,
    request: Request,
    _admin: AdminDep,
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
) -> JSONResponse:
    job = build_finetune_job(body, settings, store)
    check_webhook(body.webhook, settings)
    job_id = store.create(JobKind.finetune, TRAINING_QUEUE, job.to_dict(), owner=ADMIN_TENANT)
    if body.webhook:
        register(store, job_id, body.webhook, body.webhook_events)
    try:
        _send(celery, job_id)
    except Exception as exc:
        logger.exception("could not enqueue finetune job %s", job_id)
        store.finish(job_id, JobState.failed, error={"message": "could not enqueue the job", "type": "broker"})
        raise ServiceUnavailable("the broker did not accept the job; retry shortly", code="broker_unavailable") from exc
    logger.info("finetune job %s queued (method %s, %d prompts)", job_id, job.method, len(job.prompts))
    url = job_url(request, {"id": job_id, "kind": JobKind.finetune.value})
    body_out = JobAccepted(id=job_id, url=url, state=JobState.queued).model_dump(mode="json")
    return JSONResponse(body_out, status_code=202, headers={"Location": url})


def _send(celery: Celery, job_id: str) -> None:
    celery.send_task(FINETUNE_TASK, args=[job_id], queue=TRAINING_QUEUE, task_id=job_id)


def _view(request: Request, store: JobStore, job: dict[str, Any]) -> FinetunePublic:
    return FinetunePublic.model_validate(public_job(request, store, job))


@router.get("/finetunes", response_model=FinetuneList)
def list_finetunes(
    request: Request, _admin: AdminDep, store: StoreDep, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> FinetuneList:
    """Most recent first."""
    jobs = [store.get(i) for i in store.list_ids(JobKind.finetune, limit)]
    return FinetuneList(data=[_view(request, store, j) for j in jobs if j is not None])


@router.get("/finetunes/{job_id}", name="get_finetune", response_model=FinetunePublic, responses=error_responses(404))
def get_finetune(job_id: str, request: Request, _admin: AdminDep, store: StoreDep) -> FinetunePublic:
    """State, progress, the curve of loss and measured bias so far, and the result (with the adaptor id)."""
    return _view(request, store, load_job(store, job_id, JobKind.finetune))


@router.get("/finetunes/{job_id}/events", response_class=EventSourceResponse, responses=SSE_RESPONSES | error_responses(404))
def finetune_events(job_id: str, request: Request, _admin: AdminDep, store: StoreDep) -> EventSourceResponse:
    """Live progress as Server-Sent Events: `state`, `progress`, `curve` (the new loss and bias points), then `done`."""
    load_job(store, job_id, JobKind.finetune)
    return job_event_stream(request, store, job_id, job_view(request, store, FinetunePublic))


@router.delete(
    "/finetunes/{job_id}",
    response_model=FinetunePublic,
    responses={202: {"model": FinetunePublic, "description": "Still running; it stops at its next check."}}
    | error_responses(404),
)
def cancel_finetune(job_id: str, request: Request, _admin: AdminDep, store: StoreDep) -> JSONResponse:
    load_job(store, job_id, JobKind.finetune)
    store.request_cancel(job_id)
    view = _view(request, store, load_job(store, job_id, JobKind.finetune))
    return JSONResponse(view.model_dump(mode="json"), status_code=202 if view.state is JobState.running else 200)


@router.delete("/adaptors/{adaptor_id}", response_model=AdaptorRetired, responses=error_responses(404))
def retire_adaptor(adaptor_id: str, _admin: AdminDep, settings: SettingsDep) -> AdaptorRetired:
    """Retire: the adaptor leaves listings and new requests; its files stay (renamed) for audits."""
    try:
        load_manifest(settings.adaptor_dir, adaptor_id, "id")
    except Conflict:  # an unreadable manifest must not block retiring the adaptor
        pass
    missing = NotFound(f"no adaptor {adaptor_id!r} in the store", param="id", code="adaptor_not_found")
    root = settings.adaptor_dir
    dest = disk_layout.retired_path(root, adaptor_id)
    if dest.exists():
        dest = disk_layout.retired_path(root, adaptor_id, str(int(time.time())))
    try:
        (root / adaptor_id).rename(dest)  # atomic on one filesystem: readers see it or they don't
    except FileNotFoundError as exc:  # retired concurrently
        raise missing from exc
    logger.info("adaptor %s retired", adaptor_id)
    return AdaptorRetired(id=adaptor_id)
