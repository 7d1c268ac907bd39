"""What each finetune method takes as `hyperparameters`: its defaults and its checks, torch-free.

The gateway checks a finetune request's hyperparameters with these before it queues the job, so a typo or a
bad value is a 422 naming `hyperparameters.<key>` at once rather than a job that fails on the worker minutes
later; the trainers read the same dataclasses, so the two can never disagree. Checks that need the model (the
prompts' tokens, the classifier's attributes) stay in the trainers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.hyperparameters import (
    parse_hyperparameters,
    require_at_most,
    require_non_negative,
    require_positive,
    require_unit_interval,
)

# what `train` and the module choices name (adaptors.trainers.trainable maps each to the modules it adapts)
TRAIN_CHOICES = ("text_encoder", "unet", "both", "prefix")
TEXT_ENCODER_MODULE_CHOICES = ("attention_mlp", "attention")
UNET_MODULE_CHOICES = ("attention", "cross_attention_kv")
PRESERVE_REGIONS = ("flipped", "all")


SEED_MAX = 2**63 - 1  # what torch.Generator.manual_seed takes
STEPS_MAX = 200  # denoising steps, as for /v1/generate
WEIGHT_MAX = 1e6  # loss weights and norms: far above any useful value, far below overflow

# The largest value each numeric hyperparameter takes: a job within them ends in hours on the testbed, not
# never (iterations=10**18) and not by exhausting memory (rank=10**9). The gateway refuses anything above them.
DFT_MAXIMUM: dict[str, float] = {
    "rank": 256,
    "num_tokens": 75, "iterations": 100_000, "steps": STEPS_MAX, "steps_jitter": STEPS_MAX, "guidance_scale": 50.0,
    "images_per_prompt": 256, "prompts_per_iteration": 1024, "lr": 10.0, "weight_decay": 10.0, "confidence": 1.0,
    "target_draws": 100_000, "preserve_pixel_weight": WEIGHT_MAX, "preserve_feature_weight": WEIGHT_MAX,
    "flip_weight": 1.0, "region_share": 1.0, "person_weight": WEIGHT_MAX,
    "ce_temperature": 1000.0, "ema_decay": 1.0,
    "max_grad_norm": WEIGHT_MAX, "checkpoint_every": 100_000, "seed": SEED_MAX, "eval_images": 1024,
    "eval_steps": STEPS_MAX, "eval_seed": SEED_MAX, "init_scale": 100.0, "min_subject_kept": 1.0,
    "min_fairness_gain": 1.0,
}  # fmt: skip
IDA_MAXIMUM: dict[str, float] = {
    "images_per_iteration": 4096, "max_iterations": 1000, "kl_threshold": 10.0, "step": 1e4, "steps": STEPS_MAX,
    "guidance_scale": 50.0, "warmup_steps": STEPS_MAX, "pg_samples": 1024, "pg_sigma": 1e3, "seed": SEED_MAX,
    "eval_images": 4096, "eval_seed": SEED_MAX, "max_batch": 1024, "min_fairness_gain": 1.0,
}  # fmt: skip


FAIR_MAPPING_MAXIMUM: dict[str, float] = {
    "depth": 16, "fair_weight": WEIGHT_MAX, "lr": 10.0, "iterations": 100_000, "guidance_scale": 50.0, "seed": SEED_MAX,
    "eval_images": 1024, "eval_steps": STEPS_MAX, "eval_seed": SEED_MAX, "min_subject_kept": 1.0, "min_fairness_gain": 1.0,
}  # fmt: skip
INVDIFF_MAXIMUM: dict[str, float] = {
    "images": 1_000_000, "groups": 64, "loss_draws": 64, "group_iterations": 100_000, "group_lr": 10.0,
    "variance_weight": WEIGHT_MAX, "mix_ratio": 1.0, "rank": 256, "lr": 10.0, "iterations": 1_000_000,
    "batch_size": 4096, "ema_decay": 1.0, "checkpoint_every": 100_000, "seed": SEED_MAX, "guidance_scale": 50.0,
    "eval_images": 1024, "eval_steps": STEPS_MAX, "eval_seed": SEED_MAX, "min_subject_kept": 1.0,
    "min_fairness_gain": 1.0,
}  # fmt: skip
SKIP_KEYWORDS_MAX_CHARS = 4000
GMM_MAXIMUM: dict[str, float] = {
    "images": 16_384, "components": 64, "at_step": STEPS_MAX, "dims": 256, "steps": STEPS_MAX, "guidance_scale": 50.0,
    "seed": SEED_MAX, "eval_requests": 256, "eval_images": 64, "eval_seed": SEED_MAX, "max_batch": 1024,
}  # fmt: skip
COVARIANCE_CHOICES = ("full", "diag")
DATASET_MAX_CHARS = 4096


def upper_bounds(cls: type) -> dict[str, float]:
    """The upper bound of each numeric hyperparameter of a config class (shown in OpenAPI, checked at the gateway)."""
    return {DFTConfig: DFT_MAXIMUM, IDAConfig: IDA_MAXIMUM, FairMappingConfig: FAIR_MAPPING_MAXIMUM, GMMConfig: GMM_MAXIMUM,
            InvDiffConfig: INVDIFF_MAXIMUM}[cls]  # fmt: skip


@dataclass
class DFTConfig:
    """Shen et al.'s recipe and the operational settings around it (a job's `hyperparameters` override any of
    them); defaults suit the testbed on a CPU. Groups: what is trained, sampling, optimisation, the loss,
    evaluation and the gate."""

    # what is trained
    train: str = "text_encoder"  # LoRA on the "text_encoder", the "unet", "both", or soft "prefix" tokens
    text_encoder_modules: str = "attention_mlp"  # Shen et al. also adapt the MLPs; "attention" only
    unet_modules: str = "attention"  # every attention projection (Shen et al.); "cross_attention_kv" only
    rank: int = 8
    num_tokens: int = 5  # prefix tokens
    init_scale: float = 0.1  # prefix tokens' initial scale

    # sampling through the chain
    steps: int = 10
    steps_jitter: int = 0
    guidance_scale: float = 5.0
    images_per_prompt: int = 8
    prompts_per_iteration: int = 3
    adjusted: bool = True  # adjusted direct finetuning (latent input detached, per-step gradient rescaled)

    # optimisation
    iterations: int = 100
    lr: float = 0.0  # 0: 1e-2 for LoRA, 2e-2 for prefix tokens
    weight_decay: float = 0.0
    ema_decay: float = 0.9
    max_grad_norm: float = 0.0
    seed: int = 0

    # the loss: distributional alignment, then semantics preservation
    confidence: float = 0.8
    target_draws: int = 100
    # > 1 softens the cross-entropy of a saturated classifier (Shen et al.: 1). On the testbed, whose
    # classifier puts ~0.999 on its class, T=1 made each flipped image cost 5-8 nats and training
    # oscillated; T=8 with a larger step kept every held-out occupation (fairness_dft benchmark).
    ce_temperature: float = 8.0
    preserve_pixel_weight: float = 30.0
    preserve_feature_weight: float = 1.0
    flip_weight: float = 0.0
    region_share: float = 0.3  # 0: no region-aware preservation
    # where the pixel term spares the attribute's region: on the images meant to flip ("flipped"), or
    # on every image ("all"), so that moving the attribute of the prompt as a whole costs no pixels
    preserve_region: str = "flipped"
    person_weight: float = 0.1

    # evaluation, checkpoints and the gate
    checkpoint_every: int = 10
    eval_images: int = 16
    eval_steps: int = 20
    eval_seed: int = 10_000
    # the share of evaluation images whose subject (on the testbed, the occupation its oracle reads) must be the
    # base image's from the same noise, or the job fails and publishes nothing, whatever its bias
    # (adaptors.subject). 0 switches the gate off; base models with no subject reader are not gated
    min_subject_kept: float = 0.95
    # the fairness gate: mean per-prompt TV to the target on the evaluation prompts must fall by at least this share
    # of its value before training, or the job fails with no_fairness_gain and publishes nothing (0: off)
    min_fairness_gain: float = 0.25

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any], method: str = "dft", **defaults: Any) -> DFTConfig:
        choices = {"train": TRAIN_CHOICES, "text_encoder_modules": TEXT_ENCODER_MODULE_CHOICES,
                   "unet_modules": UNET_MODULE_CHOICES, "preserve_region": PRESERVE_REGIONS}  # fmt: skip
        cfg = parse_hyperparameters(cls, {**defaults, **hp}, method, choices)
        require_at_most(cfg, DFT_MAXIMUM)
        require_positive(cfg, "rank", "num_tokens", "steps", "images_per_prompt", "prompts_per_iteration",
                         "iterations", "eval_images", "eval_steps", "checkpoint_every")  # fmt: skip
        require_non_negative(cfg, "lr", "weight_decay", "steps_jitter", "target_draws", "preserve_pixel_weight",
                             "preserve_feature_weight", "person_weight", "max_grad_norm",
                             "init_scale")  # fmt: skip
        if cfg.guidance_scale < 1:
            raise ValueError("hyperparameters.guidance_scale: must be >= 1 (1: no classifier-free guidance)")
        require_unit_interval(
            cfg, "confidence", "flip_weight", "ema_decay", "region_share", "min_subject_kept", "min_fairness_gain"
        )
        if cfg.ema_decay == 1.0:
            raise ValueError("hyperparameters.ema_decay: must be below 1 (at 1 the published average never moves)")
        if cfg.steps_jitter >= cfg.steps:
            raise ValueError("hyperparameters.steps_jitter: must be smaller than steps")
        if cfg.ce_temperature <= 0:
            raise ValueError("hyperparameters.ce_temperature: must be > 0")
        if cfg.lr == 0:
            cfg.lr = 2e-2 if cfg.train == "prefix" else 1e-2
        return cfg


def check_prompts(cfg: DFTConfig | IDAConfig | FairMappingConfig | GMMConfig | InvDiffConfig, prompts: list[str]) -> None:
    """What a config asks of the training prompts, checked where the prompts are known (the gateway, the trainer)."""
    if not prompts:
        raise ValueError("prompts: a finetune needs at least one training prompt")


@dataclass
class IDAConfig:
    solver: str = "ida"
    images_per_iteration: int = 128
    max_iterations: int = 8
    kl_threshold: float = 0.005
    step: float = 20.0
    steps: int = 20
    guidance_scale: float = 5.0
    warmup_steps: int = 0
    pg_samples: int = 8
    pg_sigma: float = 4.0
    seed: int = 0
    eval_images: int = 64
    eval_seed: int = 50_000
    max_batch: int = 64
    min_fairness_gain: float = 0.25  # as DFTConfig's: mean per-prompt TV to the target must fall by this share

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any]) -> IDAConfig:
        cfg = parse_hyperparameters(cls, hp, "ida", {"solver": ("ida", "policy_gradient")})
        require_at_most(cfg, IDA_MAXIMUM)
        require_positive(cfg, "images_per_iteration", "max_iterations", "steps", "pg_samples", "eval_images", "max_batch")
        for name in ("step", "pg_sigma"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"hyperparameters.{name}: must be > 0")
        require_unit_interval(cfg, "min_fairness_gain")
        return cfg


@dataclass
class FairMappingConfig:
    """Fair Mapping (Li et al.): a residual MLP after the frozen text encoder, trained in text space only."""

    depth: int = 2  # linear layers of the residual MLP (the last starts at zero: the map starts as the identity)
    # lambda of L = L_text + lambda * L_fair (the fair-distance term against the text-consistency term)
    fair_weight: float = 10.0
    lr: float = 1e-2
    iterations: int = 300
    seed: int = 0
    # words besides the profile's class words whose presence in a prompt skips the map, comma-separated
    skip_keywords: str = ""

    # evaluation and the gates, as DFTConfig's
    guidance_scale: float = 5.0
    eval_images: int = 16
    eval_steps: int = 20
    eval_seed: int = 10_000
    min_subject_kept: float = 0.95
    min_fairness_gain: float = 0.25

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any]) -> FairMappingConfig:
        cfg = parse_hyperparameters(cls, hp, "fair_mapping")
        require_at_most(cfg, FAIR_MAPPING_MAXIMUM)
        require_positive(cfg, "depth", "iterations", "eval_images", "eval_steps")
        require_non_negative(cfg, "fair_weight", "seed", "eval_seed")
        if cfg.lr <= 0:
            raise ValueError("hyperparameters.lr: must be > 0")
        if cfg.guidance_scale < 1:
            raise ValueError("hyperparameters.guidance_scale: must be >= 1 (1: no classifier-free guidance)")
        require_unit_interval(cfg, "min_subject_kept", "min_fairness_gain")
        if len(cfg.skip_keywords) > SKIP_KEYWORDS_MAX_CHARS:
            raise ValueError(f"hyperparameters.skip_keywords: must be at most {SKIP_KEYWORDS_MAX_CHARS} characters")
        return cfg

    def keywords(self) -> list[str]:
        """The configured skip keywords, trimmed and lower-cased, empty entries dropped."""
        return [w.strip().lower() for w in self.skip_keywords.split(",") if w.strip()]


@dataclass
class GMMConfig:
    """GMM latent balancing (Pal et al.): per prompt, a Gaussian mixture over the latents after denoising step `step`,
    fitted per class the attribute reader saw (docs/methods/gmm.md says why, and how the defaults were measured)."""

    images: int = 512  # N: calibration images per prompt (about a minute per prompt on the testbed CPU, evaluation included)
    components: int = 4  # K: components per class at most (a class with few images gets fewer, at least one)
    at_step: int = 9  # t*: latents are recorded, and at request time moved, after this denoising step (0 = the first)
    dims: int = 16  # the mixture is fitted on this many principal components of the latent
    covariance: str = "full"
    steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0
    # held-out requests on which the latent strategy and `assign` are measured side by side (what `auto` reads)
    eval_requests: int = 8
    eval_images: int = 8
    eval_seed: int = 50_000
    max_batch: int = 64

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any]) -> GMMConfig:
        cfg = parse_hyperparameters(cls, hp, "gmm", {"covariance": COVARIANCE_CHOICES})
        require_at_most(cfg, GMM_MAXIMUM)
        require_positive(cfg, "images", "components", "dims", "steps", "eval_requests", "eval_images", "max_batch")
        require_non_negative(cfg, "at_step", "seed", "eval_seed")
        if cfg.images < cfg.components:
            raise ValueError(f"hyperparameters.images: must be at least components ({cfg.components}): "
                             "every component needs images to be fitted on")  # fmt: skip
        if cfg.at_step >= cfg.steps - 1:
            raise ValueError(f"hyperparameters.at_step: must be below steps - 1 ({cfg.steps - 1}): the moved latent needs "
                             "steps left to become an image")  # fmt: skip
        if cfg.guidance_scale < 1:
            raise ValueError("hyperparameters.guidance_scale: must be >= 1 (1: no classifier-free guidance)")
        return cfg


@dataclass
class InvDiffConfig:
    """InvDiff (Hou et al.): soft groups inferred from the frozen model's denoising losses on its training data, then
    a UNet LoRA G mixed as (1 - r) * eps + r * G, trained on mean + lambda * variance of the groups' losses."""

    # the training set: a folder with metadata.jsonl or a CSV on the training worker ("": the base model's own
    # training data, written by its profile, where it has one)
    dataset: str = ""
    images: int = 2048  # examples used (a random subset of a larger set)

    # stage 1: group inference
    groups: int = 2  # K
    loss_draws: int = 16  # timesteps (shared by every example) each example's loss is averaged over
    group_iterations: int = 500
    group_lr: float = 0.05

    # stage 2: G
    variance_weight: float = 1.0  # lambda of mean + lambda * variance of the group losses
    # r, in training and in the published adaptor (the authors sample at 0.8; their training, by a slip, at 0.5)
    mix_ratio: float = 0.8
    rank: int = 8
    lr: float = 1e-3
    iterations: int = 300
    batch_size: int = 64
    ema_decay: float = 0.95
    checkpoint_every: int = 50
    seed: int = 0

    # evaluation and the gates, as DFTConfig's (the reference is uniform: the method has no target)
    guidance_scale: float = 5.0
    eval_images: int = 16
    eval_steps: int = 20
    eval_seed: int = 10_000
    min_subject_kept: float = 0.95
    min_fairness_gain: float = 0.0

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any]) -> InvDiffConfig:
        cfg = parse_hyperparameters(cls, hp, "invdiff")
        require_at_most(cfg, INVDIFF_MAXIMUM)
        require_positive(cfg, "images", "loss_draws", "group_iterations", "rank", "iterations", "batch_size",
                         "checkpoint_every", "eval_images", "eval_steps")  # fmt: skip
        require_non_negative(cfg, "variance_weight", "seed", "eval_seed")
        if cfg.groups < 2:
            raise ValueError("hyperparameters.groups: must be >= 2")
        for name in ("lr", "group_lr"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"hyperparameters.{name}: must be > 0")
        if cfg.guidance_scale < 1:
            raise ValueError("hyperparameters.guidance_scale: must be >= 1 (1: no classifier-free guidance)")
        require_unit_interval(cfg, "mix_ratio", "ema_decay", "min_subject_kept", "min_fairness_gain")
        if cfg.ema_decay == 1.0:
            raise ValueError("hyperparameters.ema_decay: must be below 1 (at 1 the published average never moves)")
        if len(cfg.dataset) > DATASET_MAX_CHARS or "\x00" in cfg.dataset:
            raise ValueError(f"hyperparameters.dataset: must be a path of at most {DATASET_MAX_CHARS} characters")
        return cfg


FinetuneConfig = DFTConfig | IDAConfig | FairMappingConfig | GMMConfig | InvDiffConfig


def check_hyperparameters(method: str, hp: dict[str, Any]) -> FinetuneConfig:
    """The validated config of a finetune `method` (a key of FINETUNE_METHODS); ValueError naming the field."""
    if method == "gmm":
        return GMMConfig.from_hyperparameters(hp)
    if method == "invdiff":
        return InvDiffConfig.from_hyperparameters(hp)
    if method == "ida":
        return IDAConfig.from_hyperparameters(hp)
    if method == "fair_mapping":
        return FairMappingConfig.from_hyperparameters(hp)
    if method == "prefix":  # `dft` with the prefix tokens as what it trains
        if hp.get("train", "prefix") != "prefix":
            raise ValueError("hyperparameters.train: method 'prefix' trains prefix tokens only; use method 'dft'")
        return DFTConfig.from_hyperparameters(hp, method, train="prefix")
    return DFTConfig.from_hyperparameters(hp, method)
