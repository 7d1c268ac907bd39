"""Fixtures for the worker tests: a private redis-server and a real Celery inference worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import (
    ManagedProcess,
    dump_logs,
    fairdiff_env,
    free_port,
    start_redis,
    start_worker,
    wait_worker_alive,
)

REPO = Path(__file__).resolve().parents[2]


def base_model_settings(scratch: Path) -> dict[str, str]:
    """The committed testbed model and classifier."""
    return {"base_model": "testbed", "classifier": str(REPO / "testbed/weights/classifier")}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def process_registry() -> list[ManagedProcess]:
    return []


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, process_registry: list[ManagedProcess]) -> Iterator[None]:
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        dump_logs(process_registry)


@pytest.fixture(scope="session")
def workers_redis(tmp_path_factory: pytest.TempPathFactory, process_registry: list[ManagedProcess]) -> Iterator[str]:
    """A module-private redis-server (append-only) on a free port; yields its URL."""
    proc = start_redis(free_port(), tmp_path_factory.mktemp("redis"), appendonly=True)
    process_registry.append(proc)
    yield proc.info["url"]
    proc.stop()


@pytest.fixture(scope="session")
def worker_env(workers_redis: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    model = base_model_settings(tmp_path_factory.mktemp("models"))
    return fairdiff_env(
        workers_redis, tmp_path_factory.mktemp("data"), model["base_model"], classifier=model["classifier"], max_batch="4"
    )


@pytest.fixture(scope="session")
def inference_worker(
    worker_env: dict[str, str],
    workers_redis: str,
    tmp_path_factory: pytest.TempPathFactory,
    process_registry: list[ManagedProcess],
) -> Iterator[ManagedProcess]:
    proc = start_worker("inference", worker_env, tmp_path_factory.mktemp("logs"))
    process_registry.append(proc)
    wait_worker_alive(proc, workers_redis, timeout=120)
    yield proc
    proc.stop(timeout=15)


@pytest.fixture(scope="session")
def training_worker(worker_env: dict[str, str], workers_redis: str, tmp_path_factory: pytest.TempPathFactory,
                    process_registry: list[ManagedProcess]) -> Iterator[ManagedProcess]:  # fmt: skip
    proc = start_worker("training", worker_env, tmp_path_factory.mktemp("logs"))
    process_registry.append(proc)
    wait_worker_alive(proc, workers_redis, timeout=120)
    yield proc
    proc.stop(timeout=15)
