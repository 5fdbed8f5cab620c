"""Webhook delivery: the emulator POSTs ``ASYNC_TASK_RESULT`` events when tasks end.

Like Novita: when a task whose body had ``extra.webhook.url`` ends (SUCCEED or
FAILED), ``{"event_type": "ASYNC_TASK_RESULT", "payload": <task-result>}`` is
POSTed to that URL; a non-2xx answer, an error or no answer within ``timeout``
(5 s) is retried, up to ``retries`` (5) times. Knobs make it realistic: a
delay after the task ends (``fixed + uniform(0, random)``), duplicated and
lost deliveries (seeded), and forgeries (:meth:`WebhookSender.forge`).

Deliveries need a running task, so they run in a task group owned by
``async with emu.webhooks(...) as hooks:`` (or by ``emu.serve(webhooks={...})``).
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import anyio
import anyio.abc
import attrs
import httpx

from .._results import TaskStatus
from ._wire import IMAGE_BASE_URL

if TYPE_CHECKING:
    from ._tasks import EmulatedTask

__all__ = ["Deliver", "WebhookSender", "WebhookSource", "WebhookStats"]

#: ``async deliver(url, body) -> HTTP status``: how a delivery reaches the receiver.
Deliver: TypeAlias = Callable[[str, bytes], Awaitable[int]]

#: The sender re-reads the emulator clock at least this often (for a ManualClock).
_RECHECK = 0.05


@attrs.define(kw_only=True)
class WebhookStats:
    """Webhook counters of one emulator (shared by all its senders)."""

    #: POST attempts made for genuine deliveries (first tries, retries and duplicates).
    sent: int = 0
    #: Attempts answered 2xx.
    acknowledged: int = 0
    #: Re-sends after a non-2xx answer, an error or a timeout.
    retries: int = 0
    #: Deliveries given up after ``1 + retries`` failed attempts.
    abandoned: int = 0
    #: Extra deliveries of a task already delivered (``duplicate_rate``).
    duplicates: int = 0
    #: Tasks whose delivery was dropped (``loss_rate``): nothing was POSTed.
    lost: int = 0
    #: Forged deliveries posted (:meth:`WebhookSender.forge`).
    forgeries: int = 0
    #: Genuine POST attempts per task id.
    per_task: Counter[str] = attrs.Factory(Counter)


class WebhookSource(Protocol):
    """What a :class:`WebhookSender` needs from its emulator (a ``NovitaEmulator``).

    The sender depends on this, not on the emulator's class, so imports point
    one way: the emulator imports the sender, never the reverse.
    """

    @property
    def clock(self) -> Callable[[], float]: ...

    @property
    def tasks(self) -> Mapping[str, EmulatedTask]: ...

    @property
    def webhook_stats(self) -> WebhookStats: ...

    # Called with each new task; a running sender adds its ``_schedule`` here.
    @property
    def _on_create(self) -> list[Callable[[EmulatedTask], None]]: ...

    # The running senders, newest last (``post_forgery`` uses the last).
    @property
    def _senders(self) -> list[WebhookSender]: ...

    def result_json(self, task_id: str, *, image_base_url: str = ...) -> dict[str, Any]: ...

    def webhook_event(self, task_id: str, *, image_base_url: str = ...) -> dict[str, Any]: ...


@attrs.define(order=True)
class _Due:
    due: float
    order: int
    task_id: str = attrs.field(order=False)
    duplicate: bool = attrs.field(order=False)


class WebhookSender:
    """Delivers webhooks while ``async with`` lasts; see :meth:`NovitaEmulator.webhooks`.

    Attributes:
        stats: the emulator's :class:`WebhookStats`.
    """

    def __init__(
        self,
        emulator: WebhookSource,
        *,
        deliver: Deliver | None = None,
        delay: float | tuple[float, float] = (0.05, 0.2),
        duplicate_rate: float = 0.0,
        loss_rate: float = 0.0,
        retries: int = 5,
        retry_delay: float = 1.0,
        timeout: float = 5.0,
        seed: int = 0,
        image_base_url: str = IMAGE_BASE_URL,
    ) -> None:
        fixed, spread = (delay, 0.0) if isinstance(delay, (int, float)) else delay
        delays = (fixed, spread, retry_delay, timeout)
        if not all(math.isfinite(d) for d in delays):
            raise ValueError("delays and timeout must be finite")
        if min(fixed, spread, retry_delay) < 0 or timeout <= 0 or retries < 0:
            raise ValueError("delays and retries must be >= 0 and timeout > 0")
        for name, rate in (("duplicate_rate", duplicate_rate), ("loss_rate", loss_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        self.emulator = emulator
        self.stats = emulator.webhook_stats
        self.delay = (float(fixed), float(spread))
        self.duplicate_rate = duplicate_rate
        self.loss_rate = loss_rate
        self.retries = retries
        self.retry_delay = retry_delay
        self.timeout = timeout
        self.image_base_url = image_base_url
        self._deliver = deliver
        # Streams of their own: never the emulator's (a "random" id must not be a real one).
        self._rng = random.Random(f"novita-emulator-webhooks:{seed}")
        self._forge_rng = random.Random(f"novita-emulator-forgeries:{seed}")
        self._order = itertools.count()
        self._queue: list[_Due] = []
        self._seen: set[str] = set()
        self._wakeup = anyio.Event()
        self._http: httpx.AsyncClient | None = None
        self._group: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        state = "running" if self._group is not None else "stopped"
        return f"<WebhookSender {state} queued={len(self._queue)} stats={self.stats}>"

    # ------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> WebhookSender:
        if self._group is not None:
            raise RuntimeError("this WebhookSender is already running")
        if self._deliver is None:
            self._http = httpx.AsyncClient(timeout=self.timeout)
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group
        self.emulator._on_create.append(self._schedule)
        self.emulator._senders.append(self)
        for task in list(self.emulator.tasks.values()):
            self._schedule(task)
        group.start_soon(self._run, group)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._group = self._group, None
        self.emulator._on_create.remove(self._schedule)
        self.emulator._senders.remove(self)
        try:
            if group is not None:
                group.cancel_scope.cancel()
                await group.__aexit__(None, None, None)
        finally:
            if self._http is not None:
                with anyio.CancelScope(shield=True):
                    await self._http.aclose()
                self._http = None

    # ------------------------------------------------------------- scheduling

    def _draw_delay(self) -> float:
        fixed, spread = self.delay
        return fixed + (self._rng.uniform(0.0, spread) if spread else 0.0)

    def _schedule(self, task: EmulatedTask) -> None:
        if task.webhook_url is None or task.task_id in self._seen:
            return
        self._seen.add(task.task_id)
        if self.loss_rate and self._rng.random() < self.loss_rate:
            self.stats.lost += 1
            return
        due = task.completed_at + self._draw_delay()
        heapq.heappush(self._queue, _Due(due, next(self._order), task.task_id, False))
        if self.duplicate_rate and self._rng.random() < self.duplicate_rate:
            self.stats.duplicates += 1
            again = due + self._draw_delay()
            heapq.heappush(self._queue, _Due(again, next(self._order), task.task_id, True))
        self._wakeup.set()

    async def _run(self, group: anyio.abc.TaskGroup) -> None:
        while True:
            now = self.emulator.clock()
            while self._queue and self._queue[0].due <= now:
                group.start_soon(self._send, heapq.heappop(self._queue).task_id)
            wait = self._queue[0].due - now if self._queue else math.inf
            with anyio.move_on_after(min(wait, _RECHECK)):
                await self._wakeup.wait()
            self._wakeup = anyio.Event()

    # ------------------------------------------------------------- sending

    async def _post(self, url: str, body: bytes) -> int | None:
        """One attempt: the status, or None for an error or no answer within ``timeout``."""
        with anyio.move_on_after(self.timeout):
            try:
                if self._deliver is not None:
                    return int(await self._deliver(url, body))
                assert self._http is not None
                headers = {"content-type": "application/json"}
                response = await self._http.post(url, content=body, headers=headers)
                return response.status_code
            except Exception:  # a receiver's error is a failed attempt, like a 5xx
                return None
        return None

    async def _send(self, task_id: str) -> None:
        task = self.emulator.tasks[task_id]
        url = task.webhook_url
        assert url is not None
        body = json.dumps(
            self.emulator.webhook_event(task_id, image_base_url=self.image_base_url),
            separators=(",", ":"),
        ).encode()
        for attempt in range(1 + self.retries):
            if attempt:
                self.stats.retries += 1
                await anyio.sleep(self.retry_delay)
            self.stats.sent += 1
            self.stats.per_task[task_id] += 1
            status = await self._post(url, body)
            if status is not None and 200 <= status < 300:
                self.stats.acknowledged += 1
                return
        self.stats.abandoned += 1

    async def forge(
        self,
        url: str,
        task_id: str | None = None,
        *,
        status: str = "TASK_STATUS_SUCCEED",
        reason: str = "",
        images: list[dict[str, Any]] | None = None,
        seed: str | None = None,
    ) -> int | None:
        """POST one forged ``ASYNC_TASK_RESULT`` delivery to ``url`` now (no retry).

        For a known ``task_id`` the payload starts from the task's real
        task-result and lies where told (``status``, ``reason``, ``images``,
        ``seed``); for an unknown or missing id (a random one is made up)
        everything is fabricated. ``images`` defaults to one image on a host
        that is not the emulator's. Returns the receiver's status, or None.
        """
        if self._group is None:
            raise RuntimeError("forge() needs the sender running: use it inside `async with`")
        task_id = task_id or str(uuid.UUID(int=self._forge_rng.getrandbits(128), version=4))
        if task_id in self.emulator.tasks:
            payload = self.emulator.result_json(task_id, image_base_url=self.image_base_url)
        else:
            payload = {
                "extra": {"seed": "0", "enable_nsfw_detection": False, "debug_info": {}},
                "task": {"task_id": task_id, "task_type": "TXT_TO_IMG", "eta": 0},
                "videos": [],
                "audios": [],
            }
        forged_images = images
        if forged_images is None and status == TaskStatus.SUCCEED.value:
            forged_images = [
                {
                    "image_url": f"https://forged.invalid/{task_id}/0.png",
                    "image_url_ttl": "3600",
                    "image_type": "png",
                    "nsfw_detection_result": None,
                }
            ]
        payload["task"].update(status=status, reason=reason, progress_percent=0)
        payload["images"] = forged_images or []
        if seed is not None:
            payload["extra"]["seed"] = seed
        payload["extra"]["webhook"] = {"url": url}
        body = json.dumps(
            {"event_type": "ASYNC_TASK_RESULT", "payload": payload}, separators=(",", ":")
        ).encode()
        self.stats.forgeries += 1
        return await self._post(url, body)
