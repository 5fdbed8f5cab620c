"""Shared fixtures. Async tests use ``@pytest.mark.anyio`` (asyncio and trio) or
``@pytest.mark.asyncio`` (pytest-asyncio, asyncio only)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
