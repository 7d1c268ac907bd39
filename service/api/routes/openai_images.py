"""POST /v1/images/generations: OpenAI's images API over fairdiff's generate jobs, so existing client libraries work.

The request becomes a generate request (`n` -> num_images, `model` -> the base model or an adaptor id, `size` checked
against the base model) with fairdiff's fields as extensions; the job is enqueued like any other and the answer waits
for it, at most `max_wait_s`. It answers in OpenAI's shape (`created`, `data[]` with `url` or `b64_json`) with a
`fairdiff` block holding the audit. A job still running at the end of the wait is a 504 whose `Location` is the job.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from common.adaptor_matching import base_model_names
from common.schemas import JobState, ModelInfo
from common.settings import Settings
from service.api.deps import CallerDep, CeleryDep, SettingsDep, StoreDep
from service.api.jobview import job_url, public_job, wait_for_finish
from service.api.routes.generate import Idempotency, build_generate_job, enqueue, request_fingerprint
from service.errors import (
    ApiError,
    Conflict,
    GatewayTimeout,
    InvalidField,
    JobFailed,
    ServiceUnavailable,
    error_responses,
    field_path,
)
from service.limits import WaitHolders, check_rate, rate_scope
from service.schemas import GenerateRequest, ImagesGenerationRequest, ImagesResponse
from service.validation import require_model_info

router = APIRouter(prefix="/v1/images", tags=["openai"])
_FIELD_NAMES = {"num_images": "n", "adaptor_id": "model"}  # generate's field -> this API's


def to_generate_request(body: ImagesGenerationRequest, info: ModelInfo, settings: Settings) -> GenerateRequest:
    if body.size not in (None, "auto"):
        width, height = (int(v) for v in body.size.split("x"))
        if (width, height) != (info.width, info.height):
            raise InvalidField(
                f"size: {body.size} is not served; base model {info.base_model!r} makes {info.width}x{info.height} "
                "(or give 'auto')",
                param="size",
                code="unsupported_size",
            )
    adaptor_id = None if body.model in (None, *base_model_names(settings.base_model)) else body.model
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "num_images": body.n,
        "seed": body.seed,
        "steps": body.steps,
        "guidance_scale": body.guidance_scale,
        "fairness_target": body.fairness_target,
        "strategy": body.strategy,
        "adaptor_id": adaptor_id,
        "enforce": body.enforce,
        "output_format": body.output_format or "png",
        "response_format": body.response_format or "url",
    }
    try:
        return GenerateRequest(**fields)
    except ValidationError as exc:  # already checked by ImagesGenerationRequest; kept for a field that maps on
        first = exc.errors()[0]
        param = _FIELD_NAMES.get(str(first["loc"][0]), field_path(first["loc"]))
        raise InvalidField(f"{param}: {first['msg']}", param=param) from exc


def openai_answer(request: Request, view: dict[str, Any], info: ModelInfo) -> dict[str, Any]:
    """OpenAI's images response from a succeeded job's public view."""
    result = view["result"]
    extra = view["request"].get("extra") or {}
    fmt = extra.get("output_format", "png")
    inline = extra.get("response_format") == "b64_json"
    data = []
    images = []
    for k, image in enumerate(result["images"]):
        if inline:
            data.append({"b64_json": image.get("b64_json"), "revised_prompt": None})
        else:
            data.append({"url": str(request.url_for("get_image", job_id=view["id"], name=f"{k}.{fmt}")), "revised_prompt": None})
        images.append({k2: v for k2, v in image.items() if k2 != "b64_json"})
    audit = {k: v for k, v in result.items() if k != "images"}
    fairdiff = {"id": view["id"], "url": view["url"], "seed": view["request"].get("seed"), **audit, "images": images}
    return {"created": int(view.get("created") or 0), "data": data, "output_format": fmt,
            "size": f"{info.width}x{info.height}", "fairdiff": fairdiff}  # fmt: skip


@router.post(
    "/generations",
    response_model=ImagesResponse,
    summary="OpenAI-compatible image generation (with fairdiff's fairness_target as an extension)",
    responses=error_responses(400, 401, 403, 404, 409, 413, 422, 429, 500, 503, 504),
)
async def create_images(
    body: ImagesGenerationRequest,
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(max_length=255, description="As on POST /v1/generate.")] = None,
) -> JSONResponse:
    await run_in_threadpool(check_rate, store, rate_scope(request, caller), settings.rate_limit_per_minute)
    info = await run_in_threadpool(require_model_info, store, settings.base_model)
    gen = to_generate_request(body, info, settings)
    try:
        job = await run_in_threadpool(build_generate_job, gen, settings, info)
    except ApiError as exc:  # name the OpenAI field the client sent
        if exc.param in _FIELD_NAMES:
            exc.message = exc.message.replace(exc.param, _FIELD_NAMES[exc.param], 1)
            exc.param = _FIELD_NAMES[exc.param]
        raise
    job.ledger_scope = caller.tenant
    holders: WaitHolders = request.app.state.wait_holders
    if not holders.acquire():
        raise ServiceUnavailable(
            "too many requests are waiting on this gateway process; retry, or use POST /v1/generate and poll",
            code="too_many_waits",
            headers={"Retry-After": "1"},
        )
    try:
        idem = Idempotency(caller.tenant, idempotency_key, request_fingerprint(gen)) if idempotency_key else None
        job_id, _ = await run_in_threadpool(enqueue, store, celery, job, caller.tenant, idem, settings.max_active_jobs_per_key)
        record = await wait_for_finish(store, job_id, settings.max_wait_s)
    finally:
        holders.release()
    if record is None:
        raise ServiceUnavailable("the job record disappeared; retry", code="job_lost")
    state = JobState(record["state"])
    if not state.finished:
        url = job_url(request, record)
        raise GatewayTimeout(
            f"job {job_id} did not finish within {settings.max_wait_s:g} s; it goes on: GET {url}",
            headers={"Location": url, "Retry-After": "5"},
        )
    if state is JobState.cancelled:
        raise Conflict(f"job {job_id} was cancelled", code="job_cancelled")
    if state is JobState.failed:
        error = record.get("error") or {}
        message = f"job {job_id} failed: {error.get('message', 'unknown error')}"
        raise JobFailed(message, code=error.get("code") or error.get("type"))
    view = await run_in_threadpool(public_job, request, store, record)
    return JSONResponse(openai_answer(request, view, info))
