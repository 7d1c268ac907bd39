"""HTTP models, split by direction: `*Request` bodies come in, `*Public` views go out.

Request models check shape and ranges only; checks that need the base model (size, attributes,
tokenizer) or the adaptor store run in the routes, which then build the torch-free job
dataclasses of `common.schemas`. Workers never see these classes.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from common.schemas import JobState, Strategy
from service.contracts import GenerateResult

# Finetune methods the gateway accepts; the training worker's trainer registry must know each.
FINETUNE_METHODS: frozenset[str] = frozenset({"dft", "ida", "prefix"})

Probability = Annotated[float, Field(strict=True)]
FairnessTargetIn = dict[str, dict[str, Probability]]

_TARGET_DOC = (
    "Per attribute, the wanted probability of each class, e.g. "
    '{"gender": {"female": 0.5, "male": 0.5}}. Probabilities must be >= 0 and sum to 1 (within 1e-6); '
    "classes left out get 0. Attributes and classes must be known to the base model's classifier."
)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(None, description="The offending field as a JSON path, e.g. 'fairness_target.gender'.")
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- generation ---------------------------------------------------------------------------------
class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a photo of the face of a nurse, a person",
                    "num_images": 8,
                    "seed": 7,
                    "fairness_target": {"gender": {"female": 0.5, "male": 0.5}},
                }
            ]
        },
    )

    prompt: str = Field(..., min_length=1, description="Text prompt; at most the base model's token limit.")
    negative_prompt: str | None = Field(None, description="Optional negative prompt; same token limit.")
    num_images: int = Field(1, ge=1, le=64)
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Seed of the whole request; random when left out (recorded in the job)."
    )
    steps: int | None = Field(None, ge=1, le=200, description="Denoising steps; the base model's default when left out.")
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, allow_inf_nan=False)
    width: int | None = Field(None, ge=8, le=4096, description="Must equal the base model's width.")
    height: int | None = Field(None, ge=8, le=4096, description="Must equal the base model's height.")
    fairness_target: FairnessTargetIn | None = Field(None, description=_TARGET_DOC)
    strategy: Strategy = Field(Strategy.auto, description="How the target is met; 'auto' picks and the result names it.")
    adaptor_id: str | None = Field(None, description="Use this adaptor from the store (must match the base model).")
    audit: bool = Field(True, description="Classify every output and report the realised distribution.")
    ledger: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="Count delivered classes across requests under this key (scoped to the API key) and assign "
        "each request's images to the classes most behind the target, so single-image streams converge.",
    )
    enforce: bool = Field(
        False,
        description="With `assign`: regenerate images that missed their assigned class (or show no person) "
        "until the counts are exact or the retry budget is spent; the result says which.",
    )


class JobAccepted(BaseModel):
    id: str
    url: str = Field(..., description="Where to poll the job.")
    state: JobState


class Progress(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: int
    total: int


class JobPublic(BaseModel):
    """A job as clients see it. `result` and `error` are exactly what the worker wrote."""

    model_config = ConfigDict(extra="ignore")

    id: str
    kind: str
    state: JobState
    url: str
    queue_position: int | None = Field(None, description="0 = next to run; only while queued.")
    progress: Progress | None = None
    cancel_requested: bool = False
    created: float | None = None
    started: float | None = None
    finished: float | None = None
    request: dict[str, Any] | None = Field(None, description="The validated request, including the seed used.")
    # returned exactly as the worker wrote it (the dict matches first); GenerateResult types it in /openapi.json
    result: dict[str, Any] | GenerateResult | None = Field(
        None,
        union_mode="left_to_right",
        description="A generate job's result is a GenerateResult (images with attributes and confidences, realised "
        "distribution, distance to the target, strategy, enforcement, ledger, timings); a finetune's is its own record.",
    )
    error: dict[str, Any] | None = None


# -- adaptors -----------------------------------------------------------------------------------
class AdaptorPublic(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    kind: str
    base_model: str
    name: str | None = None
    attributes: Any = None
    target: dict[str, dict[str, float]] | None = None
    metrics: dict[str, Any] | None = None
    files: Any = Field(None, description="Weight files with their sha256.")
    size_bytes: int | None = None
    created: Any = None
    hyperparameters: dict[str, Any] | None = None
    prompt_set: str | None = None
    sampler: Any = None
    provenance: dict[str, Any] | None = Field(None, description="Source of an imported adaptor (files and their sha256).")


class AdaptorList(BaseModel):
    data: list[AdaptorPublic]


class AdaptorRetired(BaseModel):
    id: str
    retired: bool = True


# -- admin --------------------------------------------------------------------------------------
class FinetuneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = Field(..., description=f"Trainer; one of {sorted(FINETUNE_METHODS)}.")
    base_model: str | None = Field(None, description="Defaults to the gateway's configured base model.")
    fairness_target: FairnessTargetIn = Field(..., description=_TARGET_DOC)
    prompts: list[str] | None = Field(None, min_length=1, max_length=10_000)
    prompt_set: str | None = Field(
        None, description="Instead of prompts: a named prompt set of the base model (its workers publish the names)."
    )
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    name: str | None = Field(None, max_length=200)
    eval_prompts: list[str] | None = Field(
        None, min_length=1, max_length=1_000, description="Held-out prompts for the before/after metrics."
    )
    eval_prompt_set: str | None = Field(
        None, description="Instead of eval_prompts; a training prompt set defaults to its held-out partner, if it has one."
    )


class FinetunePublic(JobPublic):
    curve: list[dict[str, Any]] = Field(default_factory=list, description="Loss and measured bias so far.")


class FinetuneList(BaseModel):
    data: list[FinetunePublic]


# -- health -------------------------------------------------------------------------------------
class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    workers: list[str]
