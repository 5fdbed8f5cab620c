"""What the Redis classes share: the client they talk through, the asyncio check, replies."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Union

try:
    import redis.asyncio as aioredis
    import redis.exceptions as redis_errors
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "novita_async.redis needs redis-py: pip install 'novita-async[redis]'"
    ) from exc

__all__ = [
    "UNAVAILABLE",
    "RedisConnection",
    "RedisLike",
    "aioredis",
    "redis_errors",
    "require_asyncio",
    "tagged",
    "text",
]

#: The errors that mean "Redis cannot be reached right now" (down, restarting, timing out).
UNAVAILABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)

RedisLike = Union[str, "aioredis.Redis"]


def require_asyncio(what: str) -> None:
    """Raise a clear error unless running under asyncio (redis-py's client is asyncio-only)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        library = "trio" if _in_trio() else "this event loop"
        raise RuntimeError(
            f"{what} needs asyncio: redis-py's asyncio client does not run under {library}. "
            "Run this program with anyio.run(..., backend='asyncio') (or asyncio.run) to use "
            "novita_async.redis; the rest of novita_async works on trio."
        ) from None


def _in_trio() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


class RedisConnection:
    """A redis-py asyncio client given as a URL (owned: closed by :meth:`aclose`) or a client."""

    def __init__(self, url_or_client: RedisLike) -> None:
        if isinstance(url_or_client, str):
            self.client: aioredis.Redis = aioredis.Redis.from_url(url_or_client)
            self.owned = True
        elif isinstance(url_or_client, aioredis.Redis):
            self.client = url_or_client
            self.owned = False
        else:
            raise TypeError(
                "url_or_client must be a redis:// URL or a redis.asyncio.Redis client, "
                f"got {type(url_or_client).__name__}"
            )

    def describe(self) -> str:
        """host:port/db of the server, never the password."""
        kwargs = self.client.connection_pool.connection_kwargs
        if "path" in kwargs:
            return f"unix:{kwargs['path']}"
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    async def aclose(self) -> None:
        if self.owned:
            await self.client.aclose()


def tagged(key: str) -> str:
    """``key`` with a Redis Cluster hash tag (all keys of one object in one slot)."""
    return key if "{" in key and "}" in key else f"{{{key}}}"


def text(value: Any) -> str:
    """A reply as str, whether the client decodes responses or not."""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)
