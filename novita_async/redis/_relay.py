"""Webhook deliveries shared between replicas over Redis pub/sub.

Novita posts a task's webhook to whichever replica the load balancer picks; the
task's waiter may be on another. A replica that gets a delivery for a task it is
not waiting on hands it to :meth:`RedisWebhookRelay.publish`; every replica runs
:meth:`RedisWebhookRelay.serve` for its lifetime, which hands each delivery
published by the *other* replicas to ``deliver(task_id, body)`` (the client's
``receive_webhook``, which confirms it with one GET, or ignores it if nobody there
waits for that task). Bodies are relayed as received: never trusted, like any
delivery.

Pub/sub is fire-and-forget: a replica that is not subscribed at that moment (starting,
reconnecting after a Redis restart) misses the message. The client's safety-net poll
still ends every task, just later.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ._common import UNAVAILABLE, RedisConnection, RedisLike, require_asyncio, text
from ._ratelimit import RedisUnavailableError

__all__ = ["RedisWebhookRelay"]

logger = logging.getLogger("novita_async.redis")

_MAGIC = b"nvr1"
_MAX_TASK_ID = 256

Deliver = Callable[[str, bytes], Awaitable[Any]]


class RedisWebhookRelay:
    """Relay webhook deliveries between the replicas sharing ``channel`` (asyncio only).

    ``url_or_client``: a ``redis://`` URL (owned: closed by :meth:`aclose`) or a
    ``redis.asyncio.Redis``. ``max_concurrency``: deliveries handled at once by
    :meth:`serve` (each may send a confirming GET).
    """

    def __init__(
        self,
        url_or_client: RedisLike,
        channel: str = "novita:webhooks",
        *,
        max_concurrency: int = 64,
    ) -> None:
        if not channel:
            raise ValueError("channel must be a non-empty str")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self._redis = RedisConnection(url_or_client)
        self.channel = channel
        self.max_concurrency = max_concurrency
        #: This instance's id; its own messages are not delivered back to it.
        self.id = secrets.token_hex(8)
        #: Deliveries published / received from other replicas / failed in ``deliver``.
        self.published = 0
        self.received = 0
        self.failed = 0

    def __repr__(self) -> str:
        return f"<RedisWebhookRelay {self.channel!r} on {self._redis.describe()} id={self.id}>"

    async def __aenter__(self) -> RedisWebhookRelay:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client if the relay owns it."""
        await self._redis.aclose()

    async def publish(self, task_id: str, body: bytes) -> int:
        """Hand a delivery to the other replicas; returns how many relays were listening.

        Raises :class:`~novita_async.redis.RedisUnavailableError` if Redis cannot be
        reached: let the webhook route fail (non-2xx) so that Novita delivers again.
        """
        require_asyncio("RedisWebhookRelay")
        raw_id = task_id.encode()
        if not raw_id or len(raw_id) > _MAX_TASK_ID or any(b <= 32 or b >= 127 for b in raw_id):
            raise ValueError(f"not a task id: {task_id[:64]!r}")
        if isinstance(body, str):
            body = body.encode()
        message = b" ".join((_MAGIC, self.id.encode(), raw_id)) + b"\n" + bytes(body)
        try:
            listeners = await self._redis.client.publish(self.channel, message)
        except UNAVAILABLE as exc:
            raise RedisUnavailableError(
                f"webhook relay: Redis at {self._redis.describe()} is unreachable: {exc}"
            ) from exc
        self.published += 1
        return int(listeners)

    async def serve(
        self, deliver: Deliver, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Hand every delivery the other replicas publish to ``deliver``, until cancelled.

        Run it in a task group (``await tg.start(relay.serve, deliver)`` returns once
        subscribed). Reconnects after a Redis outage (messages published meanwhile are
        missed). An exception from ``deliver`` is logged and counted in :attr:`failed`;
        it does not stop the relay.
        """
        require_asyncio("RedisWebhookRelay")
        gate = anyio.Semaphore(self.max_concurrency)
        delay = 0.1
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    await self._listen(deliver, gate, tg, task_status)
                except UNAVAILABLE as exc:
                    logger.warning("webhook relay: Redis unreachable (%s), reconnecting", exc)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                else:  # pragma: no cover - listen() only returns on a closed connection
                    delay = 0.1
                task_status = anyio.TASK_STATUS_IGNORED

    async def _listen(
        self, deliver: Deliver, gate: anyio.Semaphore, tg: Any, task_status: TaskStatus[None]
    ) -> None:
        pubsub = self._redis.client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            async for message in pubsub.listen():
                kind = text(message.get("type", ""))
                if kind == "subscribe":
                    task_status.started()
                    continue
                if kind != "message":
                    continue
                parsed = self._parse(message.get("data"))
                if parsed is None:
                    continue
                self.received += 1
                await gate.acquire()
                tg.start_soon(self._deliver, deliver, *parsed, gate)
        finally:
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _parse(self, data: Any) -> tuple[str, bytes] | None:
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, bytes):
            return None
        head, newline, body = data.partition(b"\n")
        parts = head.split(b" ")
        if not newline or len(parts) != 3 or parts[0] != _MAGIC:
            logger.debug("webhook relay: ignored a foreign message on %r", self.channel)
            return None
        if parts[1].decode(errors="replace") == self.id:
            return None
        return parts[2].decode(errors="replace"), body

    async def _deliver(
        self, deliver: Deliver, task_id: str, body: bytes, gate: anyio.Semaphore
    ) -> None:
        try:
            await deliver(task_id, body)
        except Exception:
            self.failed += 1
            logger.warning("webhook relay: delivery of task %s failed", task_id, exc_info=True)
        finally:
            gate.release()
