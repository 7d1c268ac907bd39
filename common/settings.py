"""All configuration, read from FAIRDIFF_* environment variables in one place.

Nothing else in fairdiff reads os.environ: tests and deployments change behaviour only here.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TESTBED = "testbed"
# the shared-axis variant of the testbed (testbed.shared_axis): the same world, renderer and words
TESTBED_SHARED_AXES = "testbed-shared-axes"
# its neutral-looks form: the stereotypes on the shared directions only, none in an occupation's look
TESTBED_NEUTRAL_LOOKS = "testbed-neutral-looks"
TESTBED_MODELS = (TESTBED, TESTBED_SHARED_AXES, TESTBED_NEUTRAL_LOOKS)
DEFAULT_ADMIN_TOKEN = "dev-admin-token"


def has_attribute_classifier(classifier: str, base_model: str) -> bool:
    """Whether the `classifier` setting gives this base model one: 'auto' knows only the embedded
    testbed models, an explicit folder serves any base model. Torch-free, so the launcher can ask."""
    if classifier == "none":
        return False
    return classifier != "auto" or base_model in TESTBED_MODELS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAIRDIFF_", extra="ignore")

    base_model: str = Field(
        TESTBED,
        description="Base pipeline: 'testbed' (the embedded tiny model), 'testbed-shared-axes' (its shared-axis "
        "variant), 'testbed-neutral-looks' (that variant with stereotype-free looks), a local diffusers folder, or a hub id.",
    )
    classifier: str = Field(
        "auto",
        description="Attribute classifier: 'auto' (the testbed classifier for the testbed), 'none', or a folder.",
    )
    audit_reader: str = Field(
        "auto",
        description="Reader that audits outputs and that `enforce` checks with: 'auto' (the profile's auditor: the "
        "testbed's tiny CLIP on testbed models, the `classifier` elsewhere), 'classifier' (the steering reader), "
        "'none', 'testbed-cnn', 'testbed-clip', or a reader folder (CLIP zero-shot reader.json, a CLIP probe, a CNN head).",
    )
    subject_reader: str = Field(
        "auto",
        description="What the finetune subject gate reads the subject with: 'auto' (the testbed oracle on testbed "
        "models, none elsewhere), 'none', 'testbed-clip', or a local CLIP folder (prompt retrieval among the "
        "evaluation prompts: an image keeps its subject when it is closest to its own prompt).",
    )
    preserve_features: str = Field(
        "classifier",
        min_length=1,
        description="Feature space of DFT's semantics-preservation term: 'classifier' (its trunk), or comma-separated "
        "local CLIP / DINOv2 folders (real Stable Diffusion), optionally with 'classifier'.",
    )
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu' or 'cuda[:N]'.")
    offline: bool = Field(True, description="Never reach a model hub: hub ids must already be in the local cache.")
    default_steps: int = Field(20, ge=1, le=200)
    default_guidance_scale: float = Field(5.0, ge=0.0, le=50.0)
    torch_threads: int = Field(
        0, ge=0, description="CPU threads per process; 0 = half the cores (at most 4), so workers do not oversubscribe."
    )
    assign_mode: str = Field(
        "both",
        pattern="^(prompt|guidance|both)$",
        description="How `assign` conditions each image: class-named prompt, group-direction guidance, or both.",
    )
    assign_guidance_weight: float = Field(
        30.0, ge=0.0, description="Group-direction guidance weight for `assign` (30 measured best on the testbed)."
    )
    assign_classifier_scale: float = Field(
        0.3,
        ge=0.0,
        description="Classifier guidance (the audit classifier) for attributes of more than two classes in "
        "`assign`/`enforce` (0: off; 0.3 measured best on the testbed, 0.5 starts to lose the occupation).",
    )
    enforce_max_rounds: int = Field(3, ge=0, le=20, description="Regeneration rounds `enforce` may spend per request.")
    max_batch: int = Field(16, ge=1, description="Images denoised together; larger requests run in chunks.")
    data_dir: Path = Field(Path("./fairdiff-data"), description="Job images and the adaptor store (shared volume).")

    # runtime: broker, queues, gateway
    env: str = Field("dev", description="'dev' or 'prod'; prod refuses the default admin token.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Broker, result backend and job store.")
    admin_token: str = Field(DEFAULT_ADMIN_TOKEN, description="Bearer token for /v1/admin/*.")
    api_keys: str = Field("", description="Comma-separated API keys for /v1; empty = no auth on /v1.")
    max_body_bytes: int = Field(64 * 1024, description="Requests with a larger body get 413.")
    job_ttl_s: int = Field(7 * 24 * 3600, description="How long finished jobs and their records are kept.")
    visibility_timeout_s: int = Field(6 * 3600, description="Redis redelivery timeout; above the longest job.")
    adaptor_cache_bytes: int = Field(512 * 1024 * 1024, description="In-memory adaptor LRU bound per worker.")
    max_wait_s: float = Field(60.0, description="Upper bound on `Prefer: wait=N`.")

    @property
    def audits_attributes(self) -> bool:
        """Whether workers will load an attribute classifier, so a fairness_target can be served."""
        return has_attribute_classifier(self.classifier, self.base_model)

    @property
    def adaptor_dir(self) -> Path:
        return self.data_dir / "adaptors"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @model_validator(mode="after")
    def _refuse_default_token_outside_dev(self) -> Settings:
        if self.env != "dev" and self.admin_token == DEFAULT_ADMIN_TOKEN:
            raise ValueError("FAIRDIFF_ADMIN_TOKEN must be set to a secret outside FAIRDIFF_ENV=dev")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
