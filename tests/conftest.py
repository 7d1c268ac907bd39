"""Fixtures shared by every test package.

`redis_server` is one real redis-server per test session (no persistence), on a free port, in a
temporary directory; tests that need isolation use their own database number or flush it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.processes import free_port, start_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `redis-server --save "" --appendonly no`; yields its URL (database 0). Stopped at teardown."""
    proc = start_redis(free_port(), tmp_path_factory.mktemp("redis-session"), appendonly=False)
    try:
        yield proc.info["url"]
    finally:
        proc.stop()
