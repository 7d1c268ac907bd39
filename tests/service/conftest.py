"""Gateway tests: FastAPI's TestClient against a real redis-server, with no Celery worker.

Jobs therefore stay queued (which is what the queue-position, cancel and idempotency tests
need); where a test needs a job to finish, it plays the worker's part through the same
JobStore calls a worker makes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from common.jobs import JobStore
from common.schemas import ModelInfo
from common.settings import Settings
from service.app import create_app
from testbed import world

REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "test-admin-token"
SERVICE_DB = 3  # the session's redis-server is shared; these tests flush only their own database


@pytest.fixture(scope="session")
def tokenizer_json() -> str:
    """The committed testbed tokenizer, as a worker publishes it."""
    return (REPO / "testbed/weights/pipeline/tokenizer/tokenizer.json").read_text()


@pytest.fixture(scope="session")
def testbed_info(tokenizer_json: str) -> ModelInfo:
    """What an inference worker on the testbed publishes."""
    return ModelInfo(
        base_model="testbed",
        attributes={k: list(v) for k, v in world.ATTRIBUTES.items()},
        height=32,
        width=32,
        max_tokens=32,
        tokenizer_json=tokenizer_json,
        default_steps=20,
        default_guidance_scale=5.0,
        prompt_sets={name: world.prompt_set(name) for name in world.PROMPT_SETS},
        held_out_sets=dict(world.HELD_OUT_SET),
    )


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    url = redis_server.rsplit("/", 1)[0] + f"/{SERVICE_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    yield url


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url,
        data_dir=tmp_path / "data",
        base_model="testbed",
        admin_token=ADMIN_TOKEN,
        api_keys="",
        max_body_bytes=8 * 1024,
        max_wait_s=5.0,
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    s = JobStore.from_url(settings.redis_url, ttl_s=settings.job_ttl_s)
    yield s
    s.r.close()


@pytest.fixture
def raw_redis(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def client(settings: Settings, store: JobStore, testbed_info: ModelInfo) -> Iterator[TestClient]:
    """A gateway whose base model has been registered (as a worker would)."""
    store.publish_model(testbed_info)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
