"""Shared fixtures. Shared data and plain helpers (the spec's example bodies, API
constants, mocked answers) live in tests/_support.py.

Async tests use ``@pytest.mark.anyio`` and run on asyncio and trio (the ``anyio_backend``
fixture below); the few that test asyncio-only behaviour use ``@pytest.mark.asyncio``
(pytest-asyncio) and say why."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import respx
from _redis_server import RedisServer
from _support import API


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def api() -> Iterator[respx.MockRouter]:
    """Novita's API host (``_support.API``) mocked by respx. respx patches httpx's own
    transport: clients under test pass ``transport=httpx.AsyncHTTPTransport()``."""
    with respx.mock(base_url=API, assert_all_called=False) as router:
        yield router


# --------------------------------------------------------------------------- Redis
# A real redis-server on loopback (tests/_redis_server.py), for tests/test_redis_*.py.


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the session (nothing persisted); tests use their own keys."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, with an fsynced append-only file: restart it at will."""
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_key() -> str:
    """A key prefix no other test uses."""
    return f"test:{uuid.uuid4().hex}"
