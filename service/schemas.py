"""HTTP models, split by direction: `*Request` bodies come in, `*Public` views go out.

Request models check shape and ranges only; checks that need the base model (size, attributes,
tokenizer) or the adaptor store run in the routes, which then build the torch-free job
dataclasses of `common.schemas`. Workers never see these classes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from common.finetune_config import DFT_MAXIMUM, FAIR_MAPPING_MAXIMUM, IDA_MAXIMUM, INVDIFF_MAXIMUM
from common.schemas import JobState, Strategy
from service.contracts import GenerateResult

# Finetune methods the gateway accepts; the training worker's trainer registry must know each.
FINETUNE_METHODS: frozenset[str] = frozenset({"dft", "fair_mapping", "gmm", "ida", "invdiff", "prefix"})
# methods that take no fairness_target (they debias towards invariance, not towards a distribution)
TARGETLESS_METHODS: frozenset[str] = frozenset({"invdiff"})


def encodable(text: str) -> str:
    """Valid Unicode only: a lone UTF-16 surrogate (JSON's "\\ud83d") passes JSON parsing but no tokenizer, file or
    response can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"must be valid Unicode text (found an unpaired surrogate at character {exc.start})") from None
    return text


def _encodable_tree(value: Any, where: str) -> None:
    """Every string in a JSON value (keys included) is valid Unicode; ValueError naming the first that is not."""
    if isinstance(value, str):
        try:
            encodable(value)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _encodable_tree(key, where)
            _encodable_tree(item, where)
    elif isinstance(value, list):
        for item in value:
            _encodable_tree(item, where)


def _encodable_target(target: Any) -> Any:
    if target is not None:
        _encodable_tree(target, "attribute and class names")
    return target


Text = Annotated[str, AfterValidator(encodable)]
Probability = Annotated[float, Field(strict=True)]
FairnessTargetIn = Annotated[dict[str, dict[str, Probability]], AfterValidator(_encodable_target)]

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

    prompt: Text = Field(..., min_length=1, description="Text prompt; at most the base model's token limit.")
    negative_prompt: Text | None = Field(None, description="Optional negative prompt; same token limit.")
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
    adaptor_id: Text | None = Field(
        None, description="Use this adaptor from the store (must match the base model); a `gmm` one serves `latent`."
    )
    audit: bool = Field(True, description="Classify every output and report the realised distribution.")
    ledger: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="Count delivered classes across requests under this key (scoped to the API key) and assign "
        "each request's images to the classes most behind the target, so single-image streams converge.",
    )
    enforce: bool | Literal["strict"] = Field(
        False,
        description="Regenerate images that missed their assigned class (or show no person) until the audited "
        "counts are exact or the retry budget is spent; served by the exact `assign` or `latent` (with `auto`, "
        "whatever adaptors exist). `true`: a budget that ends short still succeeds and `enforcement.satisfied` is false, "
        'with the counts per attribute. `"strict"`: such a job fails with `enforcement_incomplete` instead.',
    )
    output_format: Literal["png", "webp", "jpeg"] = Field(
        "png", description="Image format of the result's URLs and inline images; each carries its prompt, seed, assigned "
        "and audited classes as metadata (PNG text chunks, or EXIF in JPEG and WebP).",
    )  # fmt: skip
    response_format: Literal["url", "b64_json"] = Field(
        "url", description="`b64_json`: the finished job's images are also inline, base64 in each image's `b64_json`."
    )
    webhook: Text | None = Field(
        None, max_length=2048, description="An http(s) URL POSTed the finished job once, signed (Standard Webhooks headers "
        "`webhook-id`, `webhook-timestamp`, `webhook-signature`), retried with backoff. Private and loopback addresses "
        "are refused unless the deployment allows them.",
    )  # fmt: skip
    webhook_events: list[Literal["succeeded", "failed", "cancelled"]] | None = Field(
        None, min_length=1, description="Final states that call the webhook; all three when left out."
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
    webhook: dict[str, Any] | None = Field(
        None, description="With a `webhook`: its delivery `state` (pending, delivered, failed, refused, skipped), `attempts`, "
        "`last_status`, `last_error`.",
    )  # fmt: skip


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

    method: Text = Field(..., description=f"Trainer; one of {sorted(FINETUNE_METHODS)}.")
    base_model: Text | None = Field(None, description="Defaults to the gateway's configured base model.")
    fairness_target: FairnessTargetIn | None = Field(
        None, description=_TARGET_DOC + " Required, except for `invdiff`, which takes none."
    )
    prompts: list[Text] | None = Field(None, min_length=1, max_length=10_000)
    prompt_set: Text | None = Field(
        None, description="Instead of prompts: a named prompt set of the base model (its workers publish the names)."
    )
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the method's defaults; every numeric one has an upper bound (`x-maximum`, per method).",
        json_schema_extra={
            "x-maximum": {
                "dft": DFT_MAXIMUM,
                "prefix": DFT_MAXIMUM,
                "ida": IDA_MAXIMUM,
                "fair_mapping": FAIR_MAPPING_MAXIMUM,
                "invdiff": INVDIFF_MAXIMUM,
            }
        },
    )
    name: Text | None = Field(None, max_length=200)
    eval_prompts: list[Text] | None = Field(
        None, min_length=1, max_length=1_000, description="Held-out prompts for the before/after metrics."
    )
    eval_prompt_set: Text | None = Field(
        None, description="Instead of eval_prompts; a training prompt set defaults to its held-out partner, if it has one."
    )
    webhook: Text | None = Field(
        None, max_length=2048, description="An http(s) URL POSTed the finished job once, signed (Standard Webhooks headers "
        "`webhook-id`, `webhook-timestamp`, `webhook-signature`), retried with backoff. Private and loopback addresses "
        "are refused unless the deployment allows them.",
    )  # fmt: skip
    webhook_events: list[Literal["succeeded", "failed", "cancelled"]] | None = Field(
        None, min_length=1, description="Final states that call the webhook; all three when left out."
    )

    @field_validator("hyperparameters")
    @classmethod
    def _encodable_hyperparameters(cls, hp: dict[str, Any]) -> dict[str, Any]:
        _encodable_tree(hp, "names and values")
        return hp


class FinetunePublic(JobPublic):
    curve: list[dict[str, Any]] = Field(default_factory=list, description="Loss and measured bias so far.")


class FinetuneList(BaseModel):
    data: list[FinetunePublic]


# -- OpenAI-compatible images API ---------------------------------------------------------------
class ImagesGenerationRequest(BaseModel):
    """OpenAI's `POST /v1/images/generations` body, plus fairdiff's fields as extensions (an OpenAI client sends them
    through `extra_body`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a photo of the face of a nurse, a person",
                    "n": 4,
                    "response_format": "b64_json",
                    "fairness_target": {"gender": {"female": 0.5, "male": 0.5}},
                }
            ]
        },
    )

    prompt: Text = Field(..., min_length=1)
    n: int = Field(1, ge=1, le=64, description="Number of images.")
    size: str | None = Field(
        None, pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$", description="`WIDTHxHEIGHT`, the base model's size; `auto` or none: it."
    )
    response_format: Literal["url", "b64_json"] | None = Field(None, description="`url` (default) or inline `b64_json`.")
    output_format: Literal["png", "webp", "jpeg"] | None = Field(None, description="Image format (default png).")
    model: Text | None = Field(None, description="The base model's name, or an adaptor id from GET /v1/adaptors.")
    # accepted for compatibility with OpenAI clients; they do not change what fairdiff makes
    quality: str | None = None
    style: str | None = None
    user: str | None = Field(None, max_length=256)
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    # fairdiff's extensions
    fairness_target: FairnessTargetIn | None = Field(None, description=_TARGET_DOC)
    strategy: Strategy = Strategy.auto
    enforce: bool | Literal["strict"] = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    negative_prompt: Text | None = None
    steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, allow_inf_nan=False)


class ImageDatum(BaseModel):
    url: str | None = Field(None, description="Absolute URL of the image (with `response_format` url).")
    b64_json: str | None = Field(None, description="The image, base64 (with `response_format` b64_json).")
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int = Field(..., description="Unix time the job was created.")
    data: list[ImageDatum]
    output_format: str
    size: str
    fairdiff: dict[str, Any] = Field(
        ...,
        description="The job (`id`, `url`, `seed`) and its audit as in a generate job's result (`realised`, `counts`, "
        "`target_distance`, `strategy`, `guarantee`, `enforcement`, `timings`), with each image's audited classes.",
    )


# -- models -------------------------------------------------------------------------------------
class ModelPublic(BaseModel):
    """A base model as its workers registered it; OpenAI's model object plus what a fairness target needs."""

    id: str = Field(..., description="The base model's name.")
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "fairdiff"
    attributes: dict[str, list[str]] | None = Field(None, description="Attribute -> its classes; null without a classifier.")
    height: int
    width: int
    max_tokens: int
    default_steps: int
    default_guidance_scale: float
    prompt_sets: list[str] = Field(default_factory=list, description="Named prompt sets (for finetunes).")
    strategies: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


# -- health -------------------------------------------------------------------------------------
class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    workers: list[str]
