"""All configuration, read from FAIRDIFF_* environment variables in one place.

Nothing else in fairdiff reads os.environ: tests and deployments change behaviour only here.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common import disk_layout
from common.disk_layout import REDIS_URL_FILE  # noqa: F401  (re-exported for workers.embedded)

TESTBED = "testbed"  # the embedded tiny model's base-model name (testbed.BASE_MODEL_NAME)
TESTBED_MODELS = (TESTBED,)
DEFAULT_ADMIN_TOKEN = "dev-admin-token"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# `fairdiff up` writes the URL of the Redis it started here (under the data dir) while it runs


def is_loopback(host: str | None) -> bool:
    """Whether `host` (a listening or local address) is reachable only from this machine. None: a Unix socket."""
    if host is None:
        return True
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def has_attribute_classifier(classifier: str, base_model: str) -> bool:
    """Whether the `classifier` setting gives this base model one: 'auto' knows only the embedded
    testbed models, an explicit folder serves any base model. Torch-free, so the launcher can ask."""
    if classifier == "none":
        return False
    return classifier != "auto" or base_model in TESTBED_MODELS


class Settings(BaseSettings):
    """Every FAIRDIFF_* setting.

    Tenants: with FAIRDIFF_API_KEYS set, each job (record, images, cancel, idempotency keys, ledgers) belongs to the
    key that created it, stored under an HMAC of the key (FAIRDIFF_TENANT_SECRET) that no response shows; other keys
    get 404, the admin token sees every job. Secrets: the default admin token is refused outside FAIRDIFF_ENV=dev,
    and in dev anywhere but loopback. Limits (per deployment): FAIRDIFF_RATE_LIMIT_PER_MINUTE,
    FAIRDIFF_MAX_ACTIVE_JOBS_PER_KEY (both 429 with Retry-After), FAIRDIFF_MAX_WAIT_HOLDERS,
    FAIRDIFF_MAX_WORK_PER_REQUEST. Retention: FAIRDIFF_JOB_TTL_S after a job ends, swept by the workers.
    """

    model_config = SettingsConfigDict(env_prefix="FAIRDIFF_", extra="ignore")

    base_model: str = Field(
        TESTBED,
        description="Base pipeline: 'testbed' (the embedded tiny model), a local diffusers folder, or a hub id.",
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
        description="Classifier guidance by the steering reader (FAIRDIFF_CLASSIFIER) for attributes of more than two "
        "classes in `assign`/`enforce` (0: off; 0.3 measured best on the testbed, 0.5 starts to lose the occupation).",
    )
    enforce_max_rounds: int = Field(3, ge=0, le=20, description="Regeneration rounds `enforce` may spend per request.")
    auto_max_tv: float = Field(
        0.10,
        ge=0.0,
        le=1.0,
        description="`auto` serves a request with a stored adaptor or calibration only when its measured fit (mean "
        "per-prompt total variation to its target on held-out evaluation prompts, or on held-out seeds of this "
        "prompt for guidance weights) is at most this; otherwise it uses the exact `assign`.",
    )
    max_batch: int = Field(
        16,
        ge=1,
        description="Images denoised together: larger requests run in chunks, and an inference worker batches waiting "
        "compatible requests (same steps and size, no adaptor) up to this many images into one pass.",
    )
    batch_window_ms: float = Field(
        50.0,
        ge=0.0,
        le=1000.0,
        description="How long an inference worker under load waits for more compatible requests when its batch is "
        "not full and the queue is empty, counted from the last request that joined (at most 4 windows in all; 0: "
        "never wait). A worker whose last pass served one request does not wait, so a lone client pays nothing.",
    )
    data_dir: Path = Field(Path("./fairdiff-data"), description="Job images and the adaptor store (shared volume).")

    # runtime: broker, queues, gateway
    env: str = Field(
        "dev",
        description="'dev' or 'prod'. Outside dev the default admin token is refused at start-up; in dev it is refused "
        "by a gateway listening on anything but loopback (`fairdiff gateway`/`up --host 0.0.0.0` exit 2), and by "
        "admin routes for any request not arriving over loopback.",
    )
    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        description="Broker, result backend and job store. Unset, it is the Redis a running `fairdiff up` with the "
        f"same data dir started (its URL is in <data_dir>/redis/{REDIS_URL_FILE}), else {DEFAULT_REDIS_URL}: "
        "standalone workers and gateways find the embedded stack's Redis the way `fairdiff up` does.",
    )
    admin_token: str = Field(
        DEFAULT_ADMIN_TOKEN,
        description=f"Bearer token for /v1/admin/*. The default ({DEFAULT_ADMIN_TOKEN!r}) serves only a dev gateway on "
        "loopback: set a secret before listening on a network address.",
    )
    api_keys: str = Field(
        "",
        description="Comma-separated API keys for /v1; empty = no auth on /v1. With keys, every job, its images, its "
        "cancel, its idempotency keys and its ledgers belong to the key that created it; other keys get 404.",
    )
    tenant_secret: str = Field(
        "",
        description="HMAC secret that turns an API key into the opaque tenant id jobs are stored under (never shown to "
        "clients); empty = derived from admin_token, so rotating the admin token then orphans unfinished jobs' owners.",
    )
    max_body_bytes: int = Field(64 * 1024, description="Requests with a larger body get 413.")
    job_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=1,
        description="How long a finished job is kept (record, listings, images), counted from its end; workers remove "
        "expired ones in a bounded periodic sweep.",
    )
    visibility_timeout_s: int = Field(6 * 3600, description="Redis redelivery timeout; above the longest job.")
    adaptor_cache_bytes: int = Field(512 * 1024 * 1024, description="In-memory adaptor LRU bound per worker.")
    max_wait_s: float = Field(60.0, description="Upper bound on `Prefer: wait=N`.")

    # limits: per deployment, permissive by default; each refusal names the setting that drew it
    rate_limit_per_minute: int = Field(
        600, ge=0, description="Job submissions per API key (per client address without keys) per minute; 0 = no limit."
    )
    max_active_jobs_per_key: int = Field(
        1000, ge=0, description="Queued plus running generate jobs per API key (all clients without keys); 0 = no limit."
    )
    max_wait_holders: int = Field(
        64,
        ge=0,
        description="Requests per gateway process that may hold their connection for `Prefer: wait`; past it, a "
        "request is answered 202 at once, as without the header.",
    )
    max_work_per_request: int = Field(
        64 * 100, ge=1, description="Most image-steps (num_images x steps) one generate request may ask for."
    )

    # webhooks: a POST when a job finishes, signed as in the Standard Webhooks convention
    webhook_secret: str = Field(
        "",
        description="HMAC-SHA256 key that signs webhook deliveries (`whsec_<base64>` or plain text); empty = requests "
        "with a `webhook` are refused (422 webhooks_disabled).",
    )
    webhook_allow_private: bool = Field(
        False, description="Allow webhook URLs that resolve to private, loopback or link-local addresses (SSRF guard)."
    )
    webhook_allowed_hosts: str = Field("", description="Comma-separated host names webhooks may call; empty = any public host.")
    webhook_max_attempts: int = Field(5, ge=1, le=20, description="Deliveries tried per webhook before giving up.")
    webhook_retry_base_s: float = Field(2.0, gt=0, description="First retry delay; each next one doubles (at most 5 min).")
    webhook_timeout_s: float = Field(10.0, gt=0, description="Time one delivery may take before it counts as failed.")

    @property
    def audits_attributes(self) -> bool:
        """Whether workers will load an attribute classifier, so a fairness_target can be served."""
        return has_attribute_classifier(self.classifier, self.base_model)

    @property
    def adaptor_dir(self) -> Path:
        return disk_layout.adaptor_dir(self.data_dir)

    @property
    def jobs_dir(self) -> Path:
        return disk_layout.jobs_dir(self.data_dir)

    @property
    def default_admin_token(self) -> bool:
        return self.admin_token == DEFAULT_ADMIN_TOKEN

    def admin_token_refusal(self, host: str | None) -> str | None:
        """Why a gateway listening on (or reached through) `host` must not run with this admin token; None if it may.

        Everybody knows the default token, so it only ever guards a gateway that only this machine can reach.
        """
        if self.default_admin_token and not is_loopback(host):
            return (
                f"the default admin token ({DEFAULT_ADMIN_TOKEN!r}) is only accepted on a loopback address, and this "
                f"gateway listens on {host!r}: set FAIRDIFF_ADMIN_TOKEN to a secret, or listen on 127.0.0.1"
            )
        return None

    @model_validator(mode="after")
    def _embedded_redis(self) -> Settings:
        if "redis_url" not in self.model_fields_set:
            try:
                url = (disk_layout.redis_dir(self.data_dir) / REDIS_URL_FILE).read_text().strip()
            except OSError:
                url = ""
            if url.startswith("redis://"):
                self.redis_url = url
        return self

    @model_validator(mode="after")
    def _refuse_default_token_outside_dev(self) -> Settings:
        if self.env != "dev" and self.admin_token == DEFAULT_ADMIN_TOKEN:
            raise ValueError("FAIRDIFF_ADMIN_TOKEN must be set to a secret outside FAIRDIFF_ENV=dev")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
