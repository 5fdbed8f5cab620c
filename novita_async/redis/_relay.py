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

Reconnection is the relay's own: :meth:`~RedisWebhookRelay.serve` keeps one redis-py
``PubSub`` for its whole life, so the only subscription it ever holds is the one it reads,
and it switches the retries of that pub/sub connection off while it holds it (restoring
them when it hands the connection back to the pool): after an outage each attempt is one
connect, then the relay's backoff (0.1 s doubling to 2 s), whatever the client's own
retry policy.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ._common import UNAVAILABLE, RedisConnection, RedisLike, require_asyncio, text
from ._ratelimit import RedisUnavailableError

if TYPE_CHECKING:
    from .._webhooks import WebhookRelay

__all__ = ["RedisWebhookRelay"]

logger = logging.getLogger("novita_async.redis")

_MAGIC = b"nvr1"
_MAX_TASK_ID = 256
_FIRST_DELAY = 0.1
_MAX_DELAY = 2.0

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
        # One PubSub for the relay's life. redis-py 8 reconnects a failed pub/sub read
        # inside the library and re-subscribes, then raises the error all the same; a relay
        # that dropped that PubSub for a new one left a subscription on the restarted
        # server that nobody read (a publish counted a listener that never got it). Here a
        # subscription redis-py restores is this one, which the loop below reads again.
        pubsub = self._redis.client.pubsub()
        own_retry: Any = None
        try:
            async with anyio.create_task_group() as tg:
                delay = _FIRST_DELAY
                while True:
                    try:
                        if pubsub.connection is None:
                            await pubsub.connect()  # type: ignore[no-untyped-call]
                            connection: Any = pubsub.connection
                            own_retry, connection.retry = connection.retry, Retry(NoBackoff(), 0)
                        if not pubsub.subscribed:
                            await pubsub.subscribe(self.channel)
                        while True:
                            message = await pubsub.get_message(timeout=None)
                            if message is None:
                                continue
                            if text(message.get("type", "")) == "subscribe":
                                delay = _FIRST_DELAY
                                task_status.started()
                                task_status = anyio.TASK_STATUS_IGNORED
                            else:
                                await self._hand_over(message, deliver, gate, tg)
                    except UNAVAILABLE as exc:
                        logger.warning("webhook relay: Redis unreachable (%s), reconnecting", exc)
                        await anyio.sleep(delay)
                        delay = min(delay * 2, _MAX_DELAY)
        finally:
            with anyio.CancelScope(shield=True):
                if own_retry is not None and pubsub.connection is not None:
                    pubsub.connection.retry = own_retry  # back to the pool as it came
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _hand_over(
        self, message: dict[str, Any], deliver: Deliver, gate: anyio.Semaphore, tg: Any
    ) -> None:
        if text(message.get("type", "")) != "message":
            return
        parsed = self._parse(message.get("data"))
        if parsed is None:
            return
        self.received += 1
        await gate.acquire()
        tg.start_soon(self._deliver, deliver, *parsed, gate)

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


if TYPE_CHECKING:

    def _is_a_webhook_relay(relay: RedisWebhookRelay) -> WebhookRelay:
        """mypy --strict novita_async checks that ``AsyncNovita(webhook_relay=relay)`` does."""
        return relay
