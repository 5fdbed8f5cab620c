"""httpx's own connection pool, split into shards of a few connections (trio's default).

httpcore's pool does its bookkeeping over every request and connection it
holds at each request's start and end, so its CPU per request grows with the
requests in flight. Measured on trio against the loopback emulator (3 s of
task-result GETs each, alternating, three rounds): one pool of 64 at 64 in
flight cost 1.5-1.9 ms per request, one of 24 at 24 in flight 1.35-1.6 ms, and
eight pools of 8 at 64 in flight 1.26-1.53 ms. Shards let the client keep as
many requests in flight as it has connections for the CPU of a small pool.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator

import httpx

__all__ = ["SHARD_CONNECTIONS", "ShardedPool"]

#: Connections per shard.
SHARD_CONNECTIONS = 8


class ShardedPool(httpx.AsyncBaseTransport):
    """``max_connections`` connections in shards of at most ``shard_connections``, each
    an :class:`httpx.AsyncHTTPTransport`; a request goes to the shard with the fewest
    requests in flight (a request is in flight until its response is closed). With at
    most ``max_connections`` requests in flight (the client's cap), none waits inside a
    shard for a connection."""

    def __init__(
        self,
        *,
        max_connections: int,
        verify: ssl.SSLContext | bool = True,
        shard_connections: int = SHARD_CONNECTIONS,
    ) -> None:
        if max_connections < 1 or shard_connections < 1:
            raise ValueError("max_connections and shard_connections must be >= 1")
        count = math.ceil(max_connections / shard_connections)
        size = math.ceil(max_connections / count)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self._shards = [
            httpx.AsyncHTTPTransport(verify=verify, limits=limits) for _ in range(count)
        ]
        self.load = [0] * count  # requests in flight per shard (read by tests)
        self.shard_connections = size

    def __repr__(self) -> str:
        return f"<ShardedPool shards={len(self._shards)} connections={self.shard_connections}>"

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        load = self.load
        shard = load.index(min(load))
        load[shard] += 1
        try:
            response = await self._shards[shard].handle_async_request(request)
        except BaseException:
            load[shard] -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Counted(response.stream, load, shard)
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


class _Counted(httpx.AsyncByteStream):
    """A response body that takes its request off its shard's load when closed."""

    __slots__ = ("_load", "_open", "_shard", "_stream")

    def __init__(self, stream: httpx.AsyncByteStream, load: list[int], shard: int) -> None:
        self._stream, self._load, self._shard, self._open = stream, load, shard, True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._load[self._shard] -= 1
        await self._stream.aclose()
