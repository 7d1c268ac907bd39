"""schemathesis against a live gateway (real uvicorn, real redis-server): every operation of /openapi.json, a
bounded number of generated requests each, no 5xx and no response outside what the schema declares.

schemathesis (4.x: the 3.x line pins starlette < 1) is a dev dependency; without it this module is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from common.jobs import JobStore
from common.schemas import ModelInfo
from tests.support.processes import fairdiff_env, start_gateway

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (hypothesis comes with schemathesis)
from schemathesis.checks import not_a_server_error, response_schema_conformance  # noqa: E402  (schemathesis 4)

pytestmark = pytest.mark.integration

FUZZ_DB = 8
ADMIN_TOKEN = "fuzz-admin-secret"
EXAMPLES_PER_OPERATION = 10


@pytest.fixture(scope="module")
def live_gateway(redis_server: str, tmp_path_factory: pytest.TempPathFactory, testbed_info: ModelInfo) -> Iterator[str]:
    url = redis_server.rsplit("/", 1)[0] + f"/{FUZZ_DB}"
    redis.Redis.from_url(url).flushdb()
    store = JobStore.from_url(url)
    store.publish_model(testbed_info)
    store.heartbeat("inference", "fuzz-worker", ttl_s=3600)  # /readyz answers 200, as with a worker up
    # no worker runs here: a request that waits for its job (Prefer: wait, the images endpoint) gives up after 2 s
    env = fairdiff_env(url, tmp_path_factory.mktemp("fuzz-data"), "testbed", admin_token=ADMIN_TOKEN, max_wait_s="2")
    proc = start_gateway(env, tmp_path_factory.mktemp("fuzz-logs"))
    try:
        yield proc.info["url"]
    finally:
        proc.stop()
        store.r.close()


@pytest.fixture(scope="module")
def live_schema(live_gateway: str):
    schema = schemathesis.openapi.from_url(f"{live_gateway}/openapi.json")
    schema.config.update(base_url=live_gateway)
    return schema


def test_no_server_errors_and_no_undeclared_responses(live_schema) -> None:
    """Each operation in turn (schemathesis's own pytest plugin does not load under this pytest)."""
    failures: dict[str, str] = {}
    operations = 0
    calls: list[int] = []
    for result in live_schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy())
        def check(case) -> None:
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if case.path.startswith("/v1/admin") else {}
            response = case.call(headers=headers, timeout=30)
            calls.append(response.status_code)
            # the images endpoint answers a job no worker finished in time with its declared 504 (no worker runs here)
            waited = response.status_code == 504 and response.json()["error"]["code"] == "job_not_finished"
            checks = (response_schema_conformance,) if waited else (not_a_server_error, response_schema_conformance)
            case.validate_response(response, checks=checks)

        try:
            check()
        except Exception as exc:  # the failing case, shrunk, with a curl line to replay it
            failures[operation.label] = str(exc)[:2000]
    assert operations >= 10 and len(calls) >= 5 * operations
    assert not failures, "\n\n".join(f"{name}: {why}" for name, why in failures.items())
