"""Typed contracts for /openapi.json: what a generate job's `result` holds, and each finetune method's hyperparameters.

The hyperparameter models are built from the trainers' own dataclasses (common.finetune_config), so the schema's
names, types and defaults are the ones the trainers read; the gateway still checks a request with
`check_hyperparameters`, whose errors name `hyperparameters.<key>`. The result models describe what the inference
worker writes (workers/inference.py) and let fields it adds later through (`extra="allow"`).
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from common.finetune_config import (
    COVARIANCE_CHOICES,
    PRESERVE_REGIONS,
    TEXT_ENCODER_MODULE_CHOICES,
    TRAIN_CHOICES,
    UNET_MODULE_CHOICES,
    DFTConfig,
    FairMappingConfig,
    GMMConfig,
    IDAConfig,
    InvDiffConfig,
)

# -- the generate result ------------------------------------------------------------------------


class ClassReading(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")

    class_: str = Field(..., alias="class", description="The class the audit classifier reads.")
    confidence: float = Field(..., description="Its probability, 0 to 1.")


class ImageResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    url: str = Field(..., description="Where the PNG is served.")
    seed_index: int = Field(..., description="The image's index in the request; its noise is drawn from the seed and it.")
    attributes: dict[str, ClassReading] | None = Field(None, description="Per attribute, the class read; null unaudited.")
    person: bool | None = Field(None, description="Whether the audit found a person.")
    person_confidence: float | None = None
    assigned: dict[str, str] | None = Field(
        None, description="With `assign` or `latent`: the classes this image was conditioned on (moved towards)."
    )


class TargetDistance(BaseModel):
    model_config = ConfigDict(extra="allow")

    total_variation: float = Field(..., description="Half the L1 distance between realised and target (docs/api.md).")
    kl: float = Field(..., description="KL(realised || target) in nats.")


class StrategyUsed(BaseModel):
    model_config = ConfigDict(extra="allow")

    requested: str
    used: str = Field(..., description="The strategy that served the request.")
    reason: str = Field(..., description="Why it was chosen.")
    guarantee: Literal["exact", "expected"] | None = Field(
        None,
        description="exact: counts assigned per request (assign, latent); expected: the target holds on average "
        "(adaptor, guidance).",
    )
    fit: dict[str, Any] | None = Field(
        None,
        description="With an adaptor or guidance weights: their measured fit to the target (`tv`: mean per-prompt total "
        "variation on held-out evaluation prompts, or on held-out seeds of this prompt; null when never measured).",
    )


class Enforcement(BaseModel):
    model_config = ConfigDict(extra="allow")

    applied: bool
    reason: str | None = Field(None, description="Why not, when it was not applied.")
    rounds: int | None = None
    regenerated: int | None = None
    satisfied: bool | None = Field(None, description="Whether the audited counts met the assigned ones.")
    missed: int | None = None
    per_attribute: dict[str, dict[str, Any]] | None = Field(
        None, description="Per targeted attribute: `assigned` and audited `delivered` counts, and whether they meet."
    )


class LedgerState(BaseModel):
    model_config = ConfigDict(extra="allow")

    key: str
    delivered: dict[str, int] = Field(..., description="Delivered images per joint class so far.")
    drift: float | None = Field(
        None, description="Largest total variation, over the target's attributes, between delivered shares and the target."
    )


class Timings(BaseModel):
    model_config = ConfigDict(extra="allow")

    queue_s: float
    load_s: float
    generate_s: float
    audit_s: float
    total_s: float


class AdaptorApplication(BaseModel):
    model_config = ConfigDict(extra="allow")

    applied: bool = Field(..., description="Whether the adaptor changed this request's prompt embedding.")
    reason: str = Field(..., description="Why (a skipped map names the group words the prompt already holds).")


class BatchInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    jobs: int = Field(..., description="Requests in the pass, this one included.")
    images: int = Field(..., description="Images in the pass.")
    wait_s: float = Field(..., description="Time the pass waited for more requests to join it.")


class GenerateResult(BaseModel):
    """A finished generate job's `result` (docs/api.md defines realised, bias, TV and KL)."""

    model_config = ConfigDict(extra="allow")

    images: list[ImageResult]
    realised: dict[str, dict[str, float]] | None = Field(None, description="Per attribute, each class's share.")
    counts: dict[str, dict[str, int]] | None = None
    bias: dict[str, float] | None = Field(None, description="Per attribute, Shen et al.'s bias of the realised shares.")
    no_person: int | None = None
    target_distance: dict[str, TargetDistance] | None = None
    audited: bool
    audit_reader: dict[str, Any] | None = Field(
        None, description="The reader that audited (`name`) and whether it also steered this job (`steered`)."
    )
    assigned_counts: dict[str, dict[str, int]] | None = None
    guarantee: Literal["exact", "expected"] | None = Field(
        None,
        description="exact (assign, latent: counts per request) or expected (adaptor, guidance); null without a target.",
    )
    enforcement: Enforcement | None = None
    ledger: LedgerState | None = None
    strategy: StrategyUsed
    adaptor: str | None = None
    adaptor_application: AdaptorApplication | None = Field(
        None, description="For an adaptor that may skip a prompt (a `mapping`'s keyword detector): whether it applied."
    )
    timings: Timings
    batch: BatchInfo | None = Field(
        None, description="The denoising pass this job was rendered in; null for a job that cannot share one."
    )


# -- finetune hyperparameters -------------------------------------------------------------------

_CHOICES: dict[str, tuple[str, ...]] = {
    "train": TRAIN_CHOICES,
    "text_encoder_modules": TEXT_ENCODER_MODULE_CHOICES,
    "unet_modules": UNET_MODULE_CHOICES,
    "preserve_region": PRESERVE_REGIONS,
    "solver": ("ida", "policy_gradient"),
    "covariance": COVARIANCE_CHOICES,
}
_DESCRIPTIONS: dict[str, str] = {
    "train": "What DFT trains: LoRA on the text encoder, the UNet, both, or soft prefix tokens.",
    "text_encoder_modules": "Text-encoder LoRA targets: attention and MLP (Shen et al.), or attention only.",
    "unet_modules": "UNet LoRA targets: every attention projection, or only the cross-attention's key and value.",
    "rank": "LoRA rank.",
    "num_tokens": "Soft prefix tokens.",
    "init_scale": "Initial scale of the prefix tokens.",
    "steps": "Sampling steps of each training image.",
    "steps_jitter": "Random change of the steps per iteration, +- this many.",
    "guidance_scale": "Classifier-free guidance scale (1: none).",
    "images_per_prompt": "Images per training prompt and iteration.",
    "prompts_per_iteration": "Training prompts per iteration.",
    "adjusted": "Adjusted direct finetuning (latent input detached, per-step gradient rescaled); false: plain DFT.",
    "iterations": "Training iterations.",
    "lr": "Learning rate (0: 1e-2 for LoRA, 2e-2 for prefix tokens).",
    "weight_decay": "AdamW weight decay.",
    "ema_decay": "Decay of the published exponential moving average of the weights.",
    "max_grad_norm": "Gradient clipping (0: none).",
    "seed": "Seed of the initialisation and the noise.",
    "confidence": "Only images whose optimal-transport target is at least this certain take one.",
    "target_draws": "Target distributions drawn per batch for the optimal transport (0: exact counts).",
    "ce_temperature": "Temperature of the alignment cross-entropy (> 1 softens a saturated classifier).",
    "preserve_pixel_weight": "Weight of the pixel term of semantics preservation.",
    "preserve_feature_weight": "Weight of the feature term of semantics preservation.",
    "flip_weight": "Preservation weight on images meant to change class.",
    "region_share": "Share of pixels taken as the attribute's region, spared by preservation (0: none).",
    "preserve_region": "Where the attribute's region is spared: on images meant to flip, or on all.",
    "person_weight": "Weight of the term that keeps a person in every image that had one.",
    "checkpoint_every": "Iterations between checkpoints (a killed job resumes from the last).",
    "eval_images": "Evaluation images per prompt, before and after.",
    "eval_steps": "Sampling steps of the evaluation images.",
    "eval_seed": "First seed of the evaluation images.",
    "min_subject_kept": "Share of evaluation images that must keep their subject, or nothing is published (0: off).",
    "min_fairness_gain": "Share by which the mean per-prompt total variation to the target on the evaluation prompts "
    "must fall, or the job fails with no_fairness_gain and nothing is published (0: off).",
    "solver": "ida: iterative distribution alignment; policy_gradient: the paper's baseline.",
    "images_per_iteration": "Images per calibration iteration.",
    "max_iterations": "Calibration iterations at most.",
    "kl_threshold": "Stop once the KL to the target is below this.",
    "step": "Initial step of each class's weight per unit of error.",
    "warmup_steps": "Sampling steps before the guidance starts.",
    "pg_samples": "Policy-gradient samples per iteration.",
    "pg_sigma": "Policy-gradient exploration noise.",
    "max_batch": "Images denoised together.",
    "depth": "Linear layers of the residual mapping network (its last layer starts at zero: the identity map).",
    "fair_weight": "lambda: weight of the fair-distance term against the text-consistency term.",
    "skip_keywords": "Comma-separated words besides the base model's class words that make the map skip a prompt.",
    "components": "K: mixture components per class at most (a class with few images gets fewer, at least one).",
    "at_step": "t*: the denoising step (0 = the first) after which latents are recorded, and moved at request time.",
    "dims": "Principal components of the latent the mixture is fitted on.",
    "covariance": "Covariance of each component: full or diagonal.",
    "eval_requests": "Held-out requests on which the latent strategy and assign are measured side by side.",
    "dataset": "InvDiff's training set on the training worker: a folder of images with metadata.jsonl (file_name, "
    "text) or a CSV (image, caption); empty: the base model's own training data, where its profile has it.",
    "groups": "K: soft groups inferred from the base model's losses.",
    "loss_draws": "Timesteps each example's loss is averaged over when inferring groups.",
    "group_iterations": "Adam iterations of the group inference.",
    "group_lr": "Learning rate of the group inference.",
    "variance_weight": "lambda of mean + lambda * variance of the group losses.",
    "mix_ratio": "r: the denoiser is (1 - r) * base + r * G, in training and in the published adaptor.",
    "batch_size": "Training examples per iteration.",
}


# the ranges common.finetune_config checks, as schema bounds (it stays the check: its errors name the field)
_RANGES: dict[str, dict[str, float]] = {
    **{
        k: {"ge": 1}
        for k in (
            "rank",
            "depth",
            "images",
            "loss_draws",
            "group_iterations",
            "batch_size",
            "num_tokens",
            "steps",
            "images_per_prompt",
            "prompts_per_iteration",
            "iterations",
            "eval_images",
            "eval_steps",
            "checkpoint_every",
            "images_per_iteration",
            "max_iterations",
            "pg_samples",
            "max_batch",
            "images",
            "components",
            "dims",
            "eval_requests",
            "guidance_scale",
        )
    },  # fmt: skip
    **{
        k: {"ge": 0}
        for k in (
            "lr",
            "weight_decay",
            "steps_jitter",
            "target_draws",
            "preserve_pixel_weight",
            "preserve_feature_weight",
            "person_weight",
            "max_grad_norm",
            "init_scale",
            "warmup_steps",
            "seed",
            "eval_seed",
            "kl_threshold",
            "fair_weight",
            "at_step",
            "variance_weight",
        )
    },  # fmt: skip
    **{k: {"ge": 0, "le": 1} for k in ("confidence", "flip_weight", "region_share", "min_subject_kept", "min_fairness_gain")},
    **{k: {"gt": 0} for k in ("ce_temperature", "step", "pg_sigma", "group_lr")},
    "mix_ratio": {"ge": 0, "le": 1},
    "groups": {"ge": 2},
    "ema_decay": {"ge": 0, "lt": 1},
}


def _hyperparameter_model(
    name: str, config: type, doc: str, descriptions: dict[str, str] | None = None, **fixed: Any
) -> type[BaseModel]:
    """A pydantic model of a method's config; `descriptions` overrides the shared ones for fields whose meaning
    differs by method (e.g. `images`)."""
    described = {**_DESCRIPTIONS, **(descriptions or {})}
    defaults = config()
    spec: dict[str, Any] = {}
    for f in fields(config):
        if f.name in fixed:
            continue
        default = getattr(defaults, f.name) if f.default is MISSING else f.default
        kind: Any = type(default)
        if f.name in _CHOICES:
            kind = Literal[_CHOICES[f.name]]  # type: ignore[valid-type]
        spec[f.name] = (kind, Field(default, description=described.get(f.name), **_RANGES.get(f.name, {})))
    model = create_model(name, __config__=ConfigDict(extra="forbid"), __doc__=doc, **spec)
    return model


DFTHyperparameters = _hyperparameter_model(
    "DFTHyperparameters", DFTConfig, "Method `dft` (docs/methods/dft.md); every key is optional."
)
PrefixHyperparameters = _hyperparameter_model(
    "PrefixHyperparameters", DFTConfig, "Method `prefix`: `dft` on soft prefix tokens (docs/methods/prefix.md).", train="prefix"
)
IDAHyperparameters = _hyperparameter_model("IDAHyperparameters", IDAConfig, "Method `ida` (docs/methods/ida.md).")
FairMappingHyperparameters = _hyperparameter_model(
    "FairMappingHyperparameters", FairMappingConfig, "Method `fair_mapping` (docs/methods/fair_mapping.md)."
)
GMMHyperparameters = _hyperparameter_model(
    "GMMHyperparameters",
    GMMConfig,
    "Method `gmm` (docs/methods/gmm.md).",
    descriptions={"images": "N: calibration images per prompt (their latents are what the mixture is fitted on)."},
)
InvDiffHyperparameters = _hyperparameter_model(
    "InvDiffHyperparameters",
    InvDiffConfig,
    "Method `invdiff` (docs/methods/invdiff.md); takes no fairness_target.",
    descriptions={"images": "Training examples used (a random subset of a larger set)."},
)
HYPERPARAMETERS: dict[str, type[BaseModel]] = {
    "dft": DFTHyperparameters,
    "prefix": PrefixHyperparameters,
    "ida": IDAHyperparameters,
    "fair_mapping": FairMappingHyperparameters,
    "gmm": GMMHyperparameters,
    "invdiff": InvDiffHyperparameters,
}


# -- response examples (/openapi.json) ----------------------------------------------------------

_JOB_ID = "3f2b9c0d4e5f46a7b8c9d0e1f2a3b4c5"
GENERATE_ACCEPTED_EXAMPLE = {"id": _JOB_ID, "url": f"/v1/jobs/{_JOB_ID}", "state": "queued"}
JOB_EXAMPLE = {
    "id": _JOB_ID,
    "kind": "generate",
    "state": "succeeded",
    "url": f"/v1/jobs/{_JOB_ID}",
    "queue_position": None,
    "progress": {"step": 20, "total": 20},
    "cancel_requested": False,
    "request": {"prompt": "a photo of the face of a nurse, a person", "num_images": 2, "seed": 7, "steps": 20,
                "guidance_scale": 5.0, "fairness_target": {"gender": {"female": 0.5, "male": 0.5}}, "strategy": "auto"},
    "result": {
        "images": [
            {"url": f"/v1/jobs/{_JOB_ID}/images/{k}.png", "seed_index": k, "person": True, "person_confidence": 0.99,
             "attributes": {"gender": {"class": cls, "confidence": 0.98}}, "assigned": {"gender": cls}}
            for k, cls in enumerate(("female", "male"))
        ],
        "realised": {"gender": {"female": 0.5, "male": 0.5}},
        "counts": {"gender": {"female": 1, "male": 1}},
        "bias": {"gender": 0.0},
        "no_person": 0,
        "target_distance": {"gender": {"total_variation": 0.0, "kl": 0.0}},
        "audited": True,
        "assigned_counts": {"gender": {"female": 1, "male": 1}},
        "enforcement": None,
        "ledger": None,
        "guarantee": "exact",
        "strategy": {"requested": "auto", "used": "assign", "guarantee": "exact",
                     "reason": "no stored adaptor for this fairness_target has a measured held-out fit within TV 0.1 ..."},
        "adaptor": None,
        "timings": {"queue_s": 0.01, "load_s": 0.0, "generate_s": 0.61, "audit_s": 0.01, "total_s": 0.65},
    },
    "error": None,
}  # fmt: skip
FINETUNE_REQUEST_EXAMPLES = {
    "dft": {"method": "dft", "fairness_target": {"gender": {"female": 0.5, "male": 0.5}}, "prompt_set": "testbed-train",
            "hyperparameters": {"train": "both", "iterations": 100}, "name": "fair gender"},
    "prefix": {"method": "prefix", "fairness_target": {"gender": {"female": 0.5, "male": 0.5}},
               "prompts": ["a photo of the face of a senator, a person"], "hyperparameters": {"num_tokens": 5}},
    "ida": {"method": "ida", "fairness_target": {"gender": {"female": 0.5, "male": 0.5}}, "prompt_set": "testbed-test",
            "hyperparameters": {"max_iterations": 8}},
    "invdiff": {"method": "invdiff", "prompt_set": "testbed-train",
                "hyperparameters": {"dataset": "/srv/data/finetune-set", "groups": 2, "mix_ratio": 0.5}},
}  # fmt: skip
FINETUNE_EXAMPLE = {
    **{k: v for k, v in JOB_EXAMPLE.items() if k not in ("request", "result")},
    "kind": "finetune",
    "url": f"/v1/admin/finetunes/{_JOB_ID}",
    "progress": {"step": 100, "total": 100},
    "request": FINETUNE_REQUEST_EXAMPLES["dft"],
    "result": {"adaptor_id": "fair-gender-1a2b3c4d", "manifest": {"id": "fair-gender-1a2b3c4d", "kind": "lora"},
               "timings": {"total_s": 812.4}},
    "curve": [{"iteration": 100, "loss": 0.41, "batch_bias": {"gender": 0.25}}],
}  # fmt: skip
