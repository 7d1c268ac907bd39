"""Fixtures shared by every test package.

`redis_server` is one real redis-server per test session (no persistence), on a free port, in a
temporary directory; tests that need isolation use their own database number or flush it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.support.processes import free_port, start_redis


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Every in-process test runs torch on one thread.

    Tiny models run fastest on one thread, and two threads on a busy 2-core box spin for seconds
    per call (the worker processes the integration tests start are busy beside this one). Set for
    the whole session, before any module fixture: the cached testbed pipeline is loaded by
    whichever test comes first, so a setting made only where it is loaded depended on the order
    tests ran in (the testbed bias fixture took 150 s instead of 47 s after the adaptor tests).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `redis-server --save "" --appendonly no`; yields its URL (database 0). Stopped at teardown."""
    proc = start_redis(free_port(), tmp_path_factory.mktemp("redis-session"), appendonly=False)
    try:
        yield proc.info["url"]
    finally:
        proc.stop()
