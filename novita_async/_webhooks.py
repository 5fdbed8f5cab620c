"""Webhooks: parse Novita's deliveries and confirm them against the API.

With ``AsyncNovita(webhook_url=...)`` the client's own waits are driven by
deliveries: :func:`receive_webhook` (behind ``client.receive_webhook``) hands a
delivery for a task this client waits on to the poll scheduler, whose one GET
confirms it for every waiter; a delivery for any other task costs no request
(with a :class:`WebhookRelay` it is passed to the replica that waits on it).

Novita POSTs ``{"event_type": "ASYNC_TASK_RESULT", "payload": <task-result>}``
when a task finishes and retries (up to 5 times) on timeouts or non-2xx. The
deliveries are not signed, so :class:`WebhookVerifier` never trusts the body:
it re-fetches the task with ``GET /v3/async/task-result`` and returns the API's
answer, once per task (retries and concurrent duplicates return ``None``).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import anyio

from ._convert import decode_json, webhook_event
from ._errors import MalformedResponseError, NotFoundError, WebhookVerificationError
from ._results import TaskResult, WebhookEvent

if TYPE_CHECKING:
    from ._poller import PollScheduler

__all__ = [
    "ASYNC_TASK_RESULT",
    "WebhookRelay",
    "WebhookVerifier",
    "parse_webhook",
    "raw_body",
    "receive_webhook",
]

logger = logging.getLogger("novita_async")


class _TaskResults(Protocol):
    """What :class:`WebhookVerifier` needs of its client (an ``AsyncNovita``)."""

    async def get_task_result(self, task_id: str) -> TaskResult: ...


#: The only event type Novita documents; every other one is to be ignored.
ASYNC_TASK_RESULT = "ASYNC_TASK_RESULT"

WebhookBody: TypeAlias = bytes | bytearray | memoryview | str | Mapping[str, Any]


def parse_webhook(body: WebhookBody) -> WebhookEvent:
    """Parse a delivery (raw bytes, text or decoded JSON) into a :class:`WebhookEvent`.

    ``payload`` is a :class:`TaskResult` for ``ASYNC_TASK_RESULT`` events and
    ``None`` for any other type. Raises :class:`MalformedResponseError` on
    anything that is not such a JSON object. This only parses: nothing in the
    body is authenticated (see :class:`WebhookVerifier`).
    """
    if isinstance(body, Mapping):
        return webhook_event(body)
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedResponseError("webhook body is not UTF-8") from exc
    elif isinstance(body, str):
        text = body
    else:
        raise TypeError(f"webhook body must be bytes, str or a mapping, not {type(body).__name__}")
    return webhook_event(decode_json(text, what="webhook"))  # (too deep: malformed too)


class WebhookVerifier:
    """Confirm webhook deliveries with the API and drop duplicates.

    ``await verifier.confirm(body)`` returns:

    - the task's :class:`TaskResult` *as the API reports it* (SUCCEED or FAILED;
      check ``.status``) the first time a task is confirmed;
    - ``None`` for an event type other than ``ASYNC_TASK_RESULT`` and for a
      task already confirmed within ``ttl`` seconds (Novita's retries, or two
      deliveries racing: exactly one of them gets the result).

    It raises :class:`MalformedResponseError` for a body that is not a
    webhook, and :class:`WebhookVerificationError` when the API does not know
    the task (a forged delivery, or a Test Mode one: those are simulated) or
    does not report it finished; answer those with a 4xx. API or network
    errors propagate as usual; answer them with a 5xx so Novita redelivers.

    If processing a confirmed result fails, call :meth:`forget` so that
    Novita's redelivery is confirmed again instead of being dropped.
    Memory is bounded: at most ``max_entries`` task ids are remembered.
    """

    def __init__(
        self, client: _TaskResults, *, ttl: float = 24 * 3600.0, max_entries: int = 100_000
    ) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("ttl must be > 0 and max_entries >= 1")
        self._client = client
        self.ttl = ttl
        self.max_entries = max_entries
        self._confirmed: OrderedDict[str, float] = OrderedDict()  # task_id -> expiry
        self._pending: dict[str, anyio.Event] = {}
        self.confirmations = 0
        self.duplicates = 0
        self.ignored = 0

    def __repr__(self) -> str:
        return (
            f"<WebhookVerifier confirmed={self.confirmations} duplicates={self.duplicates} "
            f"ignored={self.ignored} remembered={len(self._confirmed)}>"
        )

    def forget(self, task_id: str) -> None:
        """Drop ``task_id`` so its next delivery is confirmed (and returned) again."""
        self._confirmed.pop(task_id, None)

    async def confirm(self, event: WebhookEvent | WebhookBody) -> TaskResult | None:
        """Confirm one delivery; see the class docstring for the outcomes."""
        parsed = event if isinstance(event, WebhookEvent) else parse_webhook(event)
        if parsed.event_type != ASYNC_TASK_RESULT:
            self.ignored += 1
            return None
        if parsed.payload is None or not parsed.payload.task_id:
            raise MalformedResponseError("ASYNC_TASK_RESULT webhook without a task id")
        task_id = parsed.payload.task_id

        while True:
            self._expire()
            if task_id in self._confirmed:
                self.duplicates += 1
                return None
            pending = self._pending.get(task_id)
            if pending is None:
                break
            await pending.wait()  # another delivery is confirming it; then re-check

        done = self._pending[task_id] = anyio.Event()
        try:
            result = await self._fetch(task_id)
            self._remember(task_id)
            self.confirmations += 1
            return result
        finally:
            del self._pending[task_id]
            done.set()

    async def _fetch(self, task_id: str) -> TaskResult:
        try:
            result = await self._client.get_task_result(task_id)
        except NotFoundError as exc:
            raise WebhookVerificationError(
                f"webhook for unknown task {task_id!r}: the API does not know it "
                "(forged, or a simulated Test Mode delivery)",
                task_id=task_id,
            ) from exc
        if not result.is_finished:
            raise WebhookVerificationError(
                f"webhook for task {task_id!r}, which the API reports as "
                f"{result.status.name}, not finished",
                task_id=task_id,
            )
        return result

    def _remember(self, task_id: str) -> None:
        self._confirmed[task_id] = anyio.current_time() + self.ttl
        self._confirmed.move_to_end(task_id)
        while len(self._confirmed) > self.max_entries:
            self._confirmed.popitem(last=False)

    def _expire(self) -> None:
        now = anyio.current_time()
        while self._confirmed:
            task_id, expiry = next(iter(self._confirmed.items()))
            if expiry > now:
                break
            del self._confirmed[task_id]


# --------------------------------------------------------------------------- webhook-driven waits


class WebhookRelay(Protocol):
    """Passes deliveries between replicas (e.g. ``novita_async.redis.RedisWebhookRelay``).

    A replica that gets a delivery for a task it does not wait on publishes it;
    every replica's client runs :meth:`serve` in its task group and is handed
    the deliveries the others published.
    """

    async def publish(self, task_id: str, body: bytes) -> object: ...

    async def serve(self, deliver: Callable[[str, bytes], Awaitable[None]]) -> None: ...


def raw_body(body: WebhookBody) -> bytes:
    """The delivery as bytes (what a relay passes on)."""
    if isinstance(body, Mapping):
        return json.dumps(body, separators=(",", ":")).encode()
    if isinstance(body, str):
        return body.encode()
    return bytes(body)


async def receive_webhook(
    scheduler: PollScheduler, relay: WebhookRelay | None, body: WebhookBody
) -> TaskResult | None:
    """Route one delivery; see :meth:`AsyncNovita.receive_webhook`."""
    try:
        event = parse_webhook(body)
    except MalformedResponseError as exc:
        logger.info("ignored a webhook delivery that is not one: %s", exc)
        return None
    if event.event_type != ASYNC_TASK_RESULT or event.payload is None:
        return None
    task_id = event.payload.task_id
    if not scheduler.is_tracking(task_id):
        scheduler.stats.webhooks_unknown += 1
        if relay is not None:
            await relay.publish(task_id, raw_body(body))
        return None
    return await scheduler.confirm(task_id)
