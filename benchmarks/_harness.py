"""Client-process helpers: transports (with an in-flight counter) and resource meters."""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import httpx

__all__ = [
    "EMULATOR_KEY",
    "CountingTransport",
    "Meter",
    "jsonable_stats",
    "make_transport",
    "transport_name",
]

EMULATOR_KEY = "emulator-key"
#: AsyncNovita's default pool size (``max_connections=64``).
POOL_SIZE = 64
#: AsyncNovita's default cap on task-result GETs in flight (``max_concurrent_polls=16``).
POLL_CAP = 16


class CountingTransport(httpx.AsyncBaseTransport):
    """Wraps a transport; counts requests and the most ever in flight at once.

    "In flight" runs from handing the request to the transport until its
    response headers are back, so it includes time queued for a pooled
    connection. The bookkeeping is two integer updates per request, the same
    for every scenario.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, *, limit: int | None = None) -> None:
        self.inner = inner
        self.limit = limit  # requests in flight at most (None: the pool's own bound)
        self._limiter: Any = None  # made on first use, inside the event loop
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def reset(self) -> None:
        self.requests = 0
        self.max_in_flight = self.in_flight

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.limit is None:
            return await self._counted(request)
        if self._limiter is None:
            import anyio

            self._limiter = anyio.CapacityLimiter(self.limit)
        async with self._limiter:
            return await self._counted(request)

    async def _counted(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.inner.handle_async_request(request)
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        await self.inner.aclose()


def make_transport(kind: str, *, max_connections: int | None = POOL_SIZE) -> CountingTransport:
    """``httpx``: httpcore's pool (what httpx.AsyncClient builds); ``aiohttp``: httpx-aiohttp;
    ``shards``: the library's default on trio (``ShardedPool`` of ``POOL_SIZE`` connections),
    at most ``POLL_CAP`` requests in flight, as the library's polls: what a request costs
    there, without the extra CPU of a pool with many requests in flight (nor its queue).

    ``max_connections=None`` means httpx's own defaults (100 connections, 20 kept
    alive) -- what a plain ``httpx.AsyncClient()`` uses.
    """
    if kind == "shards":
        from novita_async._pool import ShardedPool

        return CountingTransport(ShardedPool(max_connections=POOL_SIZE), limit=POLL_CAP)
    limits = (
        httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        if max_connections is not None
        else httpx.Limits(max_connections=100, max_keepalive_connections=20)
    )
    inner: httpx.AsyncBaseTransport
    if kind == "httpx":
        inner = httpx.AsyncHTTPTransport(limits=limits)
    elif kind == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        inner = AiohttpTransport(limits=limits)
    else:
        raise ValueError(f"unknown transport {kind!r}")
    return CountingTransport(inner)


class Meter:
    """CPU seconds, wall seconds and peak RSS of this process around a block.

    Entering prints ``{"event": "measuring"}`` on stdout, so that the parent can
    sample the emulator's CPU time at the same moment.
    """

    def __enter__(self) -> Meter:
        sys.stdout.write(json.dumps({"event": "measuring"}) + "\n")
        sys.stdout.flush()
        self.rss_before_mb = _rss_mb()
        self._cpu = time.process_time()
        self._wall = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self._cpu
        self.wall = time.monotonic() - self._wall

    def as_dict(self) -> dict[str, Any]:
        # ru_maxrss is in KiB on Linux (bytes on macOS).
        scale = 1024 * 1024 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
        return {
            "cpu_s": self.cpu,
            "wall_s": self.wall,
            "rss_before_mb": self.rss_before_mb,
            "peak_rss_mb": peak,
        }


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / (1024 * 1024)


def jsonable_stats(stats: Any) -> dict[str, Any]:
    """The scheduler's counters as JSON (without the live per-task map)."""
    import attrs

    if not attrs.has(type(stats)):
        return {"repr": repr(stats)}
    out = attrs.asdict(stats)
    out.pop("polls_by_task", None)
    return dict(json.loads(json.dumps(out, default=str)))


def transport_name(client: Any) -> str:
    """The transport an ``AsyncNovita`` ended up with (``"httpx-aiohttp"``, ``"httpx"``, ...)."""
    return str(client.transport_name)
