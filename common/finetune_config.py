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
TEXT_ENCODER_MODULE_CHOICES = ("attention_mlp", "attention", "last_layer", "last_outputs", "token_map")
UNET_MODULE_CHOICES = ("attention", "cross_attention_kv", "cross_attention_out")

PRESERVE_REGIONS = ("flipped", "all")
TOKEN_MAP_READS = ("span", "varying", "positive")
TOKEN_MAP_FORMS = ("free", "symmetric", "centred")
LR_SCHEDULES = ("constant", "cosine")
TOKEN_MAP_INITS = ("random", "measured", "regression")
TOKEN_MAP_KEEPS = ("none", "specials", "shared")
TOKEN_MAP_TRAINS = ("both", "write", "scale")


SEED_MAX = 2**63 - 1  # what torch.Generator.manual_seed takes
STEPS_MAX = 200  # denoising steps, as for /v1/generate
WEIGHT_MAX = 1e6  # loss weights and norms: far above any useful value, far below overflow

# The largest value each numeric hyperparameter takes: a job within them ends in hours on the testbed, not
# never (iterations=10**18) and not by exhausting memory (rank=10**9). The gateway refuses anything above them.
DFT_MAXIMUM: dict[str, float] = {
    "measure_images": 1024, "regression_scale": 100.0, "measure_guidance_scale": 50.0, "rank": 256,
    "num_tokens": 75, "iterations": 100_000, "steps": STEPS_MAX, "steps_jitter": STEPS_MAX, "guidance_scale": 50.0,
    "images_per_prompt": 256, "prompts_per_iteration": 1024, "lr": 10.0, "weight_decay": 10.0, "confidence": 1.0,
    "target_draws": 100_000, "preserve_pixel_weight": WEIGHT_MAX, "preserve_feature_weight": WEIGHT_MAX,
    "flip_weight": 1.0, "region_share": 1.0, "person_weight": WEIGHT_MAX, "distribution_weight": WEIGHT_MAX,
    "prompt_mixing": 1.0, "prompt_noise": 100.0, "ce_temperature": 1000.0, "ema_decay": 1.0,
    "max_grad_norm": WEIGHT_MAX, "checkpoint_every": 100_000, "seed": SEED_MAX, "eval_images": 1024,
    "eval_steps": STEPS_MAX, "eval_seed": SEED_MAX, "init_scale": 100.0, "min_subject_kept": 1.0,
}  # fmt: skip
IDA_MAXIMUM: dict[str, float] = {
    "images_per_iteration": 4096, "max_iterations": 1000, "kl_threshold": 10.0, "step": 1e4, "steps": STEPS_MAX,
    "guidance_scale": 50.0, "warmup_steps": STEPS_MAX, "pg_samples": 1024, "pg_sigma": 1e3, "seed": SEED_MAX,
    "eval_images": 4096, "eval_seed": SEED_MAX, "max_batch": 1024,
}  # fmt: skip


def upper_bounds(cls: type) -> dict[str, float]:
    """The upper bound of each numeric hyperparameter of a config class (shown in OpenAPI, checked at the gateway)."""
    return {DFTConfig: DFT_MAXIMUM, IDAConfig: IDA_MAXIMUM}[cls]


@dataclass
class DFTConfig:
    """Hyperparameters (a job's `hyperparameters` override any of them); defaults suit the testbed on a CPU."""

    train: str = "text_encoder"
    text_encoder_modules: str = "attention_mlp"  # Shen et al. also adapt the MLPs; "attention" only
    unet_modules: str = "attention"  # every attention projection (Shen et al.); "cross_attention_kv" only
    # what the token map reads: "span" of the training prompts' tokens, or only the "varying" words, orthogonal
    # to the tokens every prompt shares (the template), which it then leaves as they are, or the "positive" span:
    # orthogonal to the empty negative prompt's tokens only, which it leaves as they are (trainable.prompt_span)
    token_map_read: str = "span"
    # "free": e -> e + B M e; "symmetric": e -> e - U U^T e, which only takes directions out; "centred":
    # e -> e - U (U^T e - c), which moves them to learnt values (TokenMapTrainable)
    token_map_form: str = "free"
    # tokens the map leaves as they are (trainable.kept_token_ids): "none"; "specials" (BOS, EOS, padding: the
    # empty negative prompt is only these); "shared" (those and the template's words every training prompt has)
    token_map_keep: str = "none"
    # what training changes: "both" factors of the free map, or only its "write" (B), the read (M) staying where
    # a regression start put it, or only a "scale" per direction of the start's map (how far it moves every
    # word, learnt on the training words instead of chosen). The read fitted by DFT's objective follows the
    # training words and moved the neutral-looks testbed's held-out words less than the regression did
    # (docs/dft-findings.md)
    token_map_train: str = "both"
    # with `scale`: fit the regression's read on every other training prompt and learn the scale by DFT on the
    # rest, words the read never saw, as the held-out ones are. Fitted and trained on the same words, DFT made the
    # map 6-10% shorter than the held-out words needed; cross-fitted it still made it ~10% shorter, so the gap is
    # not the regression's in-sample fit. The pixel preservation term does the shortening: with both preservation
    # weights at 0 the learnt scale stays at the start's (docs/dft-findings.md)
    token_map_cross_fit: bool = False
    # "measured": the map starts at the rule the base model's own images of the training prompts suggest
    # (TokenMapTrainable, `leanings`), which costs one batch of base images per prompt; "random": at random
    token_map_init: str = "random"
    # base images per training prompt that `measured` and `regression` read the leans from (0: images_per_prompt)
    measure_images: int = 0
    # multiplies the move `regression` starts the map at. With leans from 32 images at guidance 5 the fit moved the
    # neutral-looks testbed's held-out words by ~0.8 of the rule, and 1.25 made up for it; with the words' true
    # shares, or leans from 256 images at guidance 1, it moves them by ~1 and 1 is right (docs/dft-findings.md)
    regression_scale: float = 1.0
    # the guidance scale of those base images (0: guidance_scale). Guidance multiplies a prompt's log-odds, so
    # at 5 a strongly stereotyped word's images are all one class and its lean saturates at what 32 images can
    # show; at 1 (the conditional model alone) the log-odds are the data's, and a map that zeroes them zeroes
    # them at every scale, the unconditional branch being the same for every prompt (on the neutral-looks testbed
    # 1 was worse at 32 images, too noisy, and the best start with no held-out choice at 256; docs/dft-findings.md)
    measure_guidance_scale: float = 0.0
    rank: int = 8
    num_tokens: int = 5
    iterations: int = 100
    steps: int = 10
    steps_jitter: int = 0
    guidance_scale: float = 5.0
    images_per_prompt: int = 8
    prompts_per_iteration: int = 3
    lr: float = 0.0  # 0: 1e-2 for LoRA, 2e-2 for prefix tokens
    # "cosine": the rate falls from lr to zero over the iterations, so the last steps, which the EMA publishes,
    # are small ones: each iteration's batch is a few images per prompt and a constant rate keeps jumping
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    adjusted: bool = True
    confidence: float = 0.8
    target_draws: int = 100
    # a gender change on the testbed also moves pixels outside the region the pixel term spares, so the term pulls
    # towards the stereotyped base image: it made a regression-started token map 6-10% shorter, where the alignment
    # alone keeps the start's length; 0 (feature weight 0 too) kept every held-out image's occupation there
    # (docs/dft-findings.md)
    preserve_pixel_weight: float = 30.0
    preserve_feature_weight: float = 1.0
    flip_weight: float = 0.0
    region_share: float = 0.3  # 0: no region-aware preservation
    # where the pixel term spares the attribute's region: on the images meant to flip ("flipped"), or
    # on every image ("all"), so that moving the attribute of the prompt as a whole costs no pixels
    preserve_region: str = "flipped"
    person_weight: float = 0.1
    distribution_weight: float = 0.0
    prompt_mixing: float = 0.0  # share of prompts replaced by a mixture with another training prompt (LoRA only)
    prompt_noise: float = 0.0  # Gaussian noise on the varying tokens, in units of the embedding table's std
    # > 1 softens the cross-entropy of a saturated classifier (Shen et al.: 1). On the testbed, whose
    # classifier puts ~0.999 on its class, T=1 made each flipped image cost 5-8 nats and training
    # oscillated; T=8 with a larger step kept every held-out occupation (fairness_dft benchmark).
    ce_temperature: float = 8.0
    ema_decay: float = 0.9
    max_grad_norm: float = 0.0
    checkpoint_every: int = 10
    seed: int = 0
    eval_images: int = 16
    eval_steps: int = 20
    eval_seed: int = 10_000
    init_scale: float = 0.1
    # the gate: the share of evaluation images whose subject (on the testbed, the occupation its oracle reads)
    # must be the base image's from the same noise, or the job fails and publishes nothing, whatever its bias
    # (adaptors.subject). 0 switches the gate off; base models with no subject reader are not gated
    min_subject_kept: float = 0.95

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any], method: str = "dft", **defaults: Any) -> DFTConfig:
        choices = {"train": TRAIN_CHOICES, "text_encoder_modules": TEXT_ENCODER_MODULE_CHOICES,
                   "unet_modules": UNET_MODULE_CHOICES, "preserve_region": PRESERVE_REGIONS,
                   "token_map_read": TOKEN_MAP_READS, "token_map_form": TOKEN_MAP_FORMS, "lr_schedule": LR_SCHEDULES,
                   "token_map_init": TOKEN_MAP_INITS, "token_map_keep": TOKEN_MAP_KEEPS,
                   "token_map_train": TOKEN_MAP_TRAINS}  # fmt: skip
        cfg = parse_hyperparameters(cls, {**defaults, **hp}, method, choices)
        require_at_most(cfg, DFT_MAXIMUM)
        require_positive(cfg, "rank", "num_tokens", "steps", "images_per_prompt", "prompts_per_iteration",
                         "eval_images", "eval_steps")  # fmt: skip
        require_non_negative(cfg, "lr", "weight_decay", "steps_jitter", "target_draws", "preserve_pixel_weight",
                             "preserve_feature_weight", "person_weight", "distribution_weight", "max_grad_norm",
                             "init_scale", "regression_scale")  # fmt: skip
        if cfg.guidance_scale < 1:
            raise ValueError("hyperparameters.guidance_scale: must be >= 1 (1: no classifier-free guidance)")
        if cfg.iterations < 0 or (cfg.iterations == 0 and cfg.token_map_init == "random"):
            # a measured start is an adaptor in itself; a random one with no training is none
            raise ValueError("hyperparameters.iterations: must be > 0 (0 only publishes a measured token map's start)")
        if cfg.regression_scale != 1.0 and cfg.token_map_init != "regression":
            raise ValueError("hyperparameters.regression_scale: only for token_map_init regression")
        if cfg.measure_images < 0:
            raise ValueError("hyperparameters.measure_images: must be >= 0")
        if cfg.measure_guidance_scale != 0 and (cfg.measure_guidance_scale < 1 or cfg.token_map_init == "random"):
            raise ValueError("hyperparameters.measure_guidance_scale: must be 0 or >= 1, and only for a measured "
                             "or regression token_map_init")  # fmt: skip
        if cfg.token_map_init == "regression" and cfg.token_map_form != "free":
            raise ValueError("hyperparameters.token_map_init: regression reads and writes different directions; "
                             "it needs token_map_form free")  # fmt: skip
        if cfg.token_map_train != "both" and cfg.token_map_init != "regression":
            # from a random or measured start a fixed read is zero or a guess: the regression is the fitted one
            raise ValueError(f"hyperparameters.token_map_train: {cfg.token_map_train} needs token_map_init regression")
        if cfg.token_map_cross_fit and cfg.token_map_train != "scale":
            raise ValueError("hyperparameters.token_map_cross_fit: only with token_map_train scale")
        require_positive(cfg, "checkpoint_every")
        require_unit_interval(cfg, "confidence", "flip_weight", "ema_decay", "region_share", "min_subject_kept")
        if cfg.ema_decay == 1.0:
            raise ValueError("hyperparameters.ema_decay: must be below 1 (at 1 the published average never moves)")
        if cfg.steps_jitter >= cfg.steps:
            raise ValueError("hyperparameters.steps_jitter: must be smaller than steps")
        require_unit_interval(cfg, "prompt_mixing")
        if cfg.prompt_noise < 0:
            raise ValueError("hyperparameters.prompt_noise: must be >= 0")
        for key in ("prompt_mixing", "prompt_noise"):
            if getattr(cfg, key) > 0 and cfg.train == "prefix":
                raise ValueError(f"hyperparameters.{key}: changes prompts inside the text encoder; not for prefix tokens")
        if cfg.text_encoder_modules == "token_map" and cfg.train != "text_encoder":
            raise ValueError("hyperparameters.text_encoder_modules: token_map needs train text_encoder")
        for key, default in (
            ("token_map_read", "span"),
            ("token_map_form", "free"),
            ("token_map_init", "random"),
            ("token_map_keep", "none"),
            ("token_map_train", "both"),
        ):
            if getattr(cfg, key) != default and cfg.text_encoder_modules != "token_map":
                raise ValueError(f"hyperparameters.{key}: only for text_encoder_modules token_map")
        if cfg.text_encoder_modules == "token_map" and cfg.prompt_noise > 0:
            # the noise stands in for unseen words, but it is added after the map has read the table, so the map
            # would never see it: a run with it would only look regularised
            raise ValueError("hyperparameters.prompt_noise: is added after the token map and never reaches it; not for token_map")
        if cfg.ce_temperature <= 0:
            raise ValueError("hyperparameters.ce_temperature: must be > 0")
        if cfg.lr == 0:
            cfg.lr = 2e-2 if cfg.train == "prefix" else 1e-2
        return cfg


def check_prompts(cfg: DFTConfig | IDAConfig, prompts: list[str]) -> None:
    """What a config asks of the training prompts, checked where the prompts are known (the gateway, the trainer)."""
    if isinstance(cfg, DFTConfig) and cfg.token_map_cross_fit and len(prompts) < 4:
        raise ValueError("prompts: token_map_cross_fit needs at least 4 training prompts, 2 on each side")


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

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any]) -> IDAConfig:
        cfg = parse_hyperparameters(cls, hp, "ida", {"solver": ("ida", "policy_gradient")})
        require_at_most(cfg, IDA_MAXIMUM)
        require_positive(cfg, "images_per_iteration", "max_iterations", "steps", "pg_samples", "eval_images", "max_batch")
        for name in ("step", "pg_sigma"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"hyperparameters.{name}: must be > 0")
        return cfg


def check_hyperparameters(method: str, hp: dict[str, Any]) -> DFTConfig | IDAConfig:
    """The validated config of a finetune `method` (a key of FINETUNE_METHODS); ValueError naming the field."""
    if method == "ida":
        return IDAConfig.from_hyperparameters(hp)
    if method == "prefix":  # `dft` with the prefix tokens as what it trains
        if hp.get("train", "prefix") != "prefix":
            raise ValueError("hyperparameters.train: method 'prefix' trains prefix tokens only; use method 'dft'")
        return DFTConfig.from_hyperparameters(hp, method, train="prefix")
    return DFTConfig.from_hyperparameters(hp, method)
