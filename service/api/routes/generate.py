"""POST /v1/generate: validate against the base model, write the job, enqueue its task by name."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any

from celery import Celery
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from common.adaptor_manifest import list_manifests
from common.adaptor_matching import (
    LATENT_KIND,
    adaptor_conflict,
    base_model_names,
    find_calibration,
    find_latent_calibration,
    find_matching_adaptor,
    uncovered_class,
)
from common.celery_config import GENERATE_TASK, INFERENCE_QUEUE
from common.jobs import JobStore, new_job_id
from common.schemas import FieldError, GenerateJob, JobKind, JobState, ModelInfo, Strategy, validate_target
from common.settings import Settings
from service.api.deps import CallerDep, CeleryDep, SettingsDep, StoreDep
from service.api.jobview import job_url, parse_prefer_wait, public_job, wait_for_finish
from service.errors import Conflict, InvalidField, ServiceUnavailable, TooManyRequests, error_responses
from service.limits import WaitHolders, check_active, check_rate, rate_scope
from service.schemas import GenerateRequest, JobAccepted, JobPublic
from service.validation import check_prompt, load_manifest, require_model_info
from service.webhooks import check_webhook, register

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["generate"])

REPLAY_HEADER = "Idempotent-Replayed"  # on the answer to a request whose Idempotency-Key named an earlier job

_REPLAYED = {
    REPLAY_HEADER: {
        "description": "`true` when the Idempotency-Key named an earlier request's job, which this answer is",
        "schema": {"type": "string", "enum": ["true"]},
    }
}

# A second request with the same Idempotency-Key may arrive between the first one's claim and
# its job record being written; it waits this long for the record before answering 409.
_IDEMPOTENCY_SETTLE_S = 2.0


def check_adaptor(
    settings: Settings, adaptor_id: str, target: dict[str, dict[str, float]] | None, prompt: str, steps: int, scale: float
) -> dict[str, Any]:
    """The adaptor's manifest; 404 when the store has no such adaptor, 409 when it is for another model,
    another target, or (guidance weights) another prompt or sampler: the rule the worker applies too."""
    manifest = load_manifest(settings.adaptor_dir, adaptor_id, "adaptor_id")
    if manifest.base_model not in base_model_names(settings.base_model):
        raise Conflict(
            f"adaptor_id: adaptor {adaptor_id!r} was built for base model {manifest.base_model!r}, "
            f"but this service runs {settings.base_model!r}",
            param="adaptor_id",
            code="adaptor_base_model_mismatch",
        )
    conflict = adaptor_conflict(manifest, target, prompt, steps, scale)
    if conflict is not None:
        raise Conflict(f"adaptor_id: {conflict[1]}", param="adaptor_id", code=conflict[0])
    if manifest.kind == LATENT_KIND:
        if target is None:
            raise InvalidField(f"fairness_target: latent calibration {adaptor_id!r} needs a fairness_target",
                               param="fairness_target", code="missing_fairness_target")  # fmt: skip
        require_carried(manifest, adaptor_id, prompt, target)
    return manifest.to_dict()


def require_carried(manifest: Any, adaptor_id: str, prompt: str, target: dict[str, dict[str, float]]) -> None:
    """409 naming `fairness_target.<attribute>.<class>` when no component of the latent calibration carries it."""
    missing = uncovered_class(manifest, prompt, target)
    if missing is not None:
        raise Conflict(
            f"{missing}: no component of latent calibration {adaptor_id!r} carries this class (alone or with the "
            "target's other classes) for this prompt; "
            "calibrate it (method 'gmm') with more images, or use strategy 'assign'",
            param=missing,
            code="uncovered_class",
        )


def require_latent_calibration(settings: Settings, target: dict[str, dict[str, float]], prompt: str, steps: int,
                               guidance_scale: float) -> None:  # fmt: skip
    """strategy 'latent': 409 unless latent mixtures were calibrated for this prompt and sampler and carry the target."""
    manifests = list_manifests(settings.adaptor_dir)
    found = find_latent_calibration(manifests, target, base_model_names(settings.base_model), prompt, steps, guidance_scale)
    if found is None:
        raise Conflict(
            f"strategy: 'latent' needs latent mixtures calibrated for this prompt, steps={steps} and "
            f"guidance_scale={guidance_scale} over the target's attributes, and there are none; calibrate (POST "
            "/v1/admin/finetunes with method 'gmm') or use strategy 'assign' or 'auto'",
            param="strategy",
            code="no_calibration",
        )
    require_carried(found, found.id, prompt, target)


def require_matching_adaptor(settings: Settings, target: dict[str, dict[str, float]]) -> None:
    """strategy 'adaptor' without an adaptor_id: 409 unless the store holds one trained for exactly this target.

    The worker makes the same choice again when the job runs (the store may change in between);
    checking here answers the client at once instead of with a job that can only fail.
    """
    manifests = list_manifests(settings.adaptor_dir)
    if find_matching_adaptor(manifests, target, base_model_names(settings.base_model)) is None:
        raise Conflict(
            f"strategy: 'adaptor' needs a stored adaptor trained for this fairness_target on base model "
            f"{settings.base_model!r}, and there is none; train one (POST /v1/admin/finetunes), name one with "
            "adaptor_id, or use strategy 'assign' or 'auto'",
            param="strategy",
            code="no_matching_adaptor",
        )


def require_calibration(settings: Settings, target: dict[str, dict[str, float]], prompt: str, steps: int,
                        guidance_scale: float) -> None:  # fmt: skip
    """strategy 'guidance': 409 unless IDA weights were calibrated for this target, prompt and sampler."""
    manifests = list_manifests(settings.adaptor_dir)
    names = base_model_names(settings.base_model)
    if find_calibration(manifests, target, names, prompt, steps, guidance_scale) is None:
        raise Conflict(
            f"strategy: 'guidance' needs IDA weights calibrated for this fairness_target, this prompt, steps={steps} "
            f"and guidance_scale={guidance_scale}, and there are none; calibrate (POST /v1/admin/finetunes with "
            "method 'ida') or use strategy 'assign' or 'auto'",
            param="strategy",
            code="no_calibration",
        )


def build_generate_job(body: GenerateRequest, settings: Settings, info: ModelInfo) -> GenerateJob:
    """Every check that needs the base model or the store; returns what the worker will read."""
    for field, value, expected in (("width", body.width, info.width), ("height", body.height, info.height)):
        if value is not None and value != expected:
            raise InvalidField(
                f"{field}: {value} is not supported; base model {info.base_model!r} generates {info.width}x{info.height}",
                param=field,
                code="unsupported_size",
            )
    steps = body.steps if body.steps is not None else info.default_steps
    if body.num_images * steps > settings.max_work_per_request:
        raise InvalidField(
            f"num_images: {body.num_images} images x {steps} steps is {body.num_images * steps} image-steps, over this "
            f"deployment's {settings.max_work_per_request} per request (FAIRDIFF_MAX_WORK_PER_REQUEST); ask for fewer "
            "images or steps, or split the request",
            param="num_images",
            code="too_much_work",
        )
    check_prompt(info, body.prompt, "prompt")
    if body.negative_prompt:
        check_prompt(info, body.negative_prompt, "negative_prompt")

    target = None
    if body.fairness_target is not None:
        try:
            target = validate_target(body.fairness_target, info.attributes)
        except FieldError as exc:
            raise InvalidField.from_field_error(exc, code="invalid_fairness_target") from exc

    strategy = body.strategy
    steps = body.steps if body.steps is not None else info.default_steps
    scale = body.guidance_scale if body.guidance_scale is not None else info.default_guidance_scale
    latent_adaptor = False
    if body.adaptor_id is not None:
        if strategy not in (Strategy.auto, Strategy.adaptor, Strategy.latent):
            raise InvalidField(
                f"strategy: {strategy.value!r} cannot use adaptor_id; use 'adaptor', 'latent' or 'auto'",
                param="strategy",
                code="strategy_conflict",
            )
        latent_adaptor = check_adaptor(settings, body.adaptor_id, target, body.prompt, steps, scale)["kind"] == LATENT_KIND
        if strategy is Strategy.latent and not latent_adaptor:
            raise InvalidField(f"strategy: 'latent' needs latent mixtures (kind {LATENT_KIND!r}); adaptor "
                               f"{body.adaptor_id!r} is not one", param="strategy", code="strategy_conflict")  # fmt: skip
    elif strategy in (Strategy.adaptor, Strategy.guidance, Strategy.assign, Strategy.latent) and target is None:
        raise InvalidField(
            f"fairness_target: strategy {strategy.value!r} needs a fairness_target"
            + (" or an adaptor_id" if strategy is Strategy.adaptor else ""),
            param="fairness_target",
            code="missing_fairness_target",
        )
    elif strategy is Strategy.adaptor:
        require_matching_adaptor(settings, target)
    elif strategy is Strategy.guidance:
        require_calibration(settings, target, body.prompt, steps, scale)
    elif strategy is Strategy.latent:
        require_latent_calibration(settings, target, body.prompt, steps, scale)

    # ledger and enforce both act on the per-request assignment, so both need an exact strategy (`assign`, `latent`,
    # or `auto`, which then runs one of them whatever adaptors exist): anything else is a conflict, never a downgrade
    for field, wanted in (("ledger", body.ledger is not None), ("enforce", body.enforce)):
        if not wanted:
            continue
        if target is None:
            raise InvalidField(f"{field}: needs a fairness_target", param=field, code=f"{field}_needs_target")
        if strategy not in (Strategy.auto, Strategy.assign, Strategy.latent) or (body.adaptor_id and not latent_adaptor):
            raise Conflict(
                f"{field}: needs exact per-request counts, which only strategies 'assign' and 'latent' (or 'auto') give; "
                f"strategy {strategy.value!r}" + (" with an adaptor_id" if body.adaptor_id is not None else "")
                + " holds the target only in expectation", param=field, code="strategy_conflict",
            )  # fmt: skip
    if body.enforce and (not body.audit or not info.attributes):
        raise InvalidField(
            "enforce: needs the audit (audit=true and a classifier for the base model)", param="enforce",
            code="enforce_needs_audit",
        )  # fmt: skip

    return GenerateJob(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        num_images=body.num_images,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        steps=body.steps if body.steps is not None else info.default_steps,
        guidance_scale=body.guidance_scale if body.guidance_scale is not None else info.default_guidance_scale,
        height=info.height,
        width=info.width,
        fairness_target=target,
        strategy=strategy.value,
        adaptor_id=body.adaptor_id,
        audit=body.audit,
        enforce=bool(body.enforce),
        strict=body.enforce == "strict",
        ledger=body.ledger,
        extra=output_options(body),
    )


def output_options(body: GenerateRequest) -> dict[str, str]:
    """How the gateway presents the images (workers ignore it): only what differs from the defaults."""
    options = {"output_format": body.output_format, "response_format": body.response_format}
    return {k: v for k, v in options.items() if v != GenerateRequest.model_fields[k].default}


def existing_job(store: JobStore, job_id: str) -> dict[str, Any]:
    """The job an Idempotency-Key already belongs to, allowing its creator a moment to write it."""
    deadline = time.monotonic() + _IDEMPOTENCY_SETTLE_S
    while True:
        job = store.get(job_id)
        if job is not None:
            return job
        if time.monotonic() > deadline:
            raise Conflict(
                "Idempotency-Key: a request with this key is still being accepted; retry shortly",
                param="Idempotency-Key",
                code="idempotency_key_in_use",
            )
        time.sleep(0.05)


@dataclass(frozen=True)
class Idempotency:
    """A request's Idempotency-Key, scoped to its tenant, with the fingerprint of the body it came with."""

    tenant: str
    key: str
    fingerprint: str


def request_fingerprint(body: GenerateRequest) -> str:
    """The body as validated (defaults filled in), hashed: equal for the same request however it was written."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def enqueue(store: JobStore, celery: Celery, job: GenerateJob, owner: str, idem: Idempotency | None,
            max_active: int = 0) -> tuple[str, bool]:  # fmt: skip
    """Claim the idempotency key, write the job, send the task; (the id of the new job or of the key's owner,
    whether it is a replay).

    The key is claimed before anything is written or sent, so two requests with one key never both enqueue; the
    later one answers with the earlier one's job, or 422 when it came with another body.
    """
    job_id = new_job_id()
    if idem is not None:
        owner_id, fingerprint = store.claim_idempotency(idem.tenant, idem.key, job_id, idem.fingerprint)
        if owner_id != job_id:
            if fingerprint and fingerprint != idem.fingerprint:
                raise InvalidField(
                    "Idempotency-Key: this key was already used with a different request body; use a new key",
                    param="Idempotency-Key",
                    code="idempotency_key_reused",
                )
            existing_job(store, owner_id)
            return owner_id, True
    try:  # a replay above is never refused: it adds no job
        check_active(store, owner, max_active)
    except TooManyRequests:
        if idem is not None:
            store.release_idempotency(idem.tenant, idem.key, job_id)
        raise
    store.create(JobKind.generate, INFERENCE_QUEUE, job.to_dict(), job_id=job_id, owner=owner)
    try:
        celery.send_task(GENERATE_TASK, args=[job_id], queue=INFERENCE_QUEUE, task_id=job_id)
    except Exception as exc:
        logger.exception("could not enqueue generate job %s", job_id)
        store.finish(job_id, JobState.failed, error={"message": "could not enqueue the job", "type": "broker"})
        if idem is not None:  # let the client retry with the same key
            store.release_idempotency(idem.tenant, idem.key, job_id)
        raise ServiceUnavailable("the broker did not accept the job; retry shortly", code="broker_unavailable") from exc
    logger.info("job %s queued (%d images, strategy %s)", job_id, job.num_images, job.strategy)
    return job_id, False


async def respond(request: Request, store: JobStore, job_id: str, wait_s: float) -> JSONResponse:
    """200 with the whole job if it finished within the wait, else 202 with where to poll it.

    Only `max_wait_holders` requests per process wait at once; past them a request is answered at once, as
    `Prefer` allows (it is a preference, not a demand).
    """
    holders: WaitHolders = request.app.state.wait_holders
    held = wait_s > 0 and holders.acquire()
    if not held:
        wait_s = 0.0
    try:
        job = await wait_for_finish(store, job_id, wait_s)
    finally:
        if held:
            holders.release()
    if job is None:  # expired between acceptance and now
        raise ServiceUnavailable("the job record disappeared; retry", code="job_lost")
    url = job_url(request, job)
    if JobState(job["state"]).finished and wait_s > 0:
        view = await run_in_threadpool(public_job, request, store, job)
        return JSONResponse(JobPublic.model_validate(view).model_dump(mode="json", by_alias=True), status_code=200)
    accepted = JobAccepted(id=job_id, url=url, state=JobState(job["state"]))
    return JSONResponse(accepted.model_dump(mode="json"), status_code=202, headers={"Location": url})


@router.post(
    "/generate",
    status_code=202,
    response_model=None,
    summary="Generate images, optionally with a fairness target",
    responses={
        200: {"model": JobPublic, "description": "Finished within `Prefer: wait=N`: the whole job.", "headers": _REPLAYED},
        202: {"model": JobAccepted, "description": "Accepted; poll `url`.", "headers": _REPLAYED},
        **error_responses(400, 401, 403, 404, 409, 413, 422, 503),
        429: {**error_responses(429)[429], "headers": {"Retry-After": {"description": "Seconds", "schema": {"type": "integer"}}}},
    },
)
async def generate(
    body: GenerateRequest,
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
    caller: CallerDep,
    prefer: Annotated[str | None, Header(description="`wait=N`: answer 200 if the job finishes within N s.")] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            description="Same key (per API key) and same body = same job, enqueued once; the answer then carries "
            "`Idempotent-Replayed: true`. The same key with another body is a 422 (`idempotency_key_reused`).",
        ),
    ] = None,
) -> JSONResponse:
    await run_in_threadpool(check_rate, store, rate_scope(request, caller), settings.rate_limit_per_minute)
    info = await run_in_threadpool(require_model_info, store, settings.base_model)
    job = await run_in_threadpool(build_generate_job, body, settings, info)
    job.ledger_scope = caller.tenant
    await run_in_threadpool(check_webhook, body.webhook, settings)
    idem = Idempotency(caller.tenant, idempotency_key, request_fingerprint(body)) if idempotency_key else None
    job_id, replayed = await run_in_threadpool(enqueue, store, celery, job, caller.tenant, idem, settings.max_active_jobs_per_key)
    if body.webhook and not replayed:
        await run_in_threadpool(register, store, job_id, body.webhook, body.webhook_events)
    response = await respond(request, store, job_id, parse_prefer_wait(prefer, settings.max_wait_s))
    if replayed:
        response.headers[REPLAY_HEADER] = "true"
    return response
