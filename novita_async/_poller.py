"""The shared polling scheduler behind :meth:`AsyncNovita.wait`.

One :class:`PollScheduler` per client holds the table of tracked tasks (one
*entry* per task_id, shared by all its waiters, so two waiters share one poll
sequence), a heap of their next poll times, a pool of ``max_concurrent_polls``
poll workers, one duration learner (:mod:`._learn`) and one rate-limit pause.

It runs as ONE loop task in the client's task group (:meth:`PollScheduler.run`).
Each tick pops every entry due within ``tick_coalesce`` from the heap
(O(due · log n)) and hands it to the workers over a memory object stream; then
the loop sleeps until the next due time or until an entry becomes due earlier.
A waiter only registers its task and sleeps on the entry's event: O(log n) per
wait, whatever the number of tasks tracked. When the last waiter of a task
leaves (deadline, cancellation), its entry is dropped at once and its poll in
flight cancelled: no more polls.

Timing of one task (see :class:`PollPolicy`): the first poll comes at
submission + a quantile of the durations learned from finished tasks (Novita's
``debug_info`` timestamps, or the ``eta`` of a few early *probe* polls while
nothing is known yet), scaled by the request's cost when that predicts better;
after an unfinished answer, the server's ``eta``, else the learned durations
of slower tasks, else a backoff.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import (
    APIConnectionError,
    InvalidRequestError,
    MalformedResponseError,
    NotFoundError,
    NovitaError,
    RateLimitError,
    ServerError,
    TaskFailedError,
    TaskTimeoutError,
)
from ._learn import MAX_SECONDS, Learner
from ._models import Task, TaskResult, TaskStatus

__all__ = ["PollHint", "PollPolicy", "PollScheduler", "PollStats"]

logger = logging.getLogger("novita_async")

#: Whole-second etas in a row (and no fraction ever) that make etas "rounded up".
_WHOLE_ETAS = 5
#: Errors that survived the transport's retries but say nothing about the task.
_TRANSIENT = (APIConnectionError, ServerError, RateLimitError, MalformedResponseError)

_nonneg = attrs.validators.ge(0.0)
_positive = attrs.validators.gt(0.0)
_fraction = attrs.validators.and_(attrs.validators.gt(0.0), attrs.validators.lt(1.0))


def _optional_nonneg(_: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"{attribute.name} must be None or >= 0, got {value!r}")


Plan = Literal["now", "probe", "probed", "cold", "learned", "webhook"]


@attrs.frozen(kw_only=True)
class PollPolicy:
    """Tunables of the polling scheduler (durations in seconds).

    * After an unfinished answer the next poll comes ``eta + eta_margin`` later
      when the server gives an ``eta``; else where the learned durations of
      slower tasks put it (at most ``latency_budget`` later); else after a
      backoff that starts at ``backoff_initial`` and grows by
      ``backoff_factor``. All are clamped to [``min_interval``,
      ``max_interval``]. Errors that survived the transport's retries back off
      the same way, until the caller's deadline.
    * The first poll of a submitted task comes at the ``first_poll_quantile`` of
      the learned durations, but at most ``latency_budget`` after the
      ``5 %`` quantile (``None`` disables that guard). Learning keeps the last
      ``learning_window`` durations; until ``warmup_samples`` are known, a few
      tasks are *probed* ``probe_delay`` after submission (their ``eta`` is a
      sample) and the others wait ``first_poll_delay``.
    * ``TASK_NOT_FOUND`` is retried for ``not_found_grace`` after submission;
      a 429 pauses every poll for its ``Retry-After``, at most ``max_pause``.
    * One tick polls every task due within ``tick_coalesce`` of it (so a poll
      may come that much early). A task whose answers stay malformed (the
      transport's retries included) ``max_malformed`` polls in a row ends with
      :class:`~novita_async.MalformedResponseError`.
    * With webhooks (``AsyncNovita(webhook_url=...)``) a task is not polled
      until its delivery is clearly late: at ``1.25 x`` the learned 99 %
      quantile of submission-to-delivery times plus ``webhook_grace``
      (``webhook_cold_delay`` after submission while nothing is learned).
    """

    min_interval: float = attrs.field(default=0.2, validator=_nonneg)
    max_interval: float = attrs.field(default=5.0, validator=_positive)
    backoff_initial: float = attrs.field(default=0.5, validator=_positive)
    backoff_factor: float = attrs.field(default=1.5, validator=attrs.validators.ge(1.0))
    eta_margin: float = attrs.field(default=0.05, validator=_nonneg)
    first_poll_delay: float = attrs.field(default=1.0, validator=_nonneg)
    first_poll_quantile: float = attrs.field(default=0.8, validator=_fraction)
    latency_budget: float | None = attrs.field(default=0.4, validator=_optional_nonneg)
    probe_delay: float = attrs.field(default=0.25, validator=_nonneg)
    warmup_samples: int = attrs.field(default=20, validator=attrs.validators.ge(1))
    learning_window: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    not_found_grace: float = attrs.field(default=10.0, validator=_nonneg)
    max_pause: float = attrs.field(default=60.0, validator=_nonneg)
    tick_coalesce: float = attrs.field(default=0.02, validator=_nonneg)
    max_malformed: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    webhook_grace: float = attrs.field(default=1.0, validator=_nonneg)
    webhook_cold_delay: float = attrs.field(default=20.0, validator=_nonneg)

    def __attrs_post_init__(self) -> None:
        if self.min_interval > self.max_interval:
            raise ValueError("min_interval must not exceed max_interval")
        if self.warmup_samples > self.learning_window:
            raise ValueError("warmup_samples must not exceed learning_window")


@attrs.define(kw_only=True, eq=False)
class PollStats:
    """Live counters of a :class:`PollScheduler` (read them, don't write them).

    ``polls_total`` counts GETs sent, ``polls_cancelled`` those cut short (a
    dropped task, a hand-off); ``polls_by_task`` counts answered polls of the
    tasks being tracked right now; ``poll_histogram`` maps "answered polls a
    finished task needed" to a task count. ``ticks`` counts scheduler ticks
    that started polls (``max_polls_per_tick``: the most one tick started).
    ``waits`` counts :meth:`PollScheduler.wait` calls and ``heap_pushes`` the
    scheduling operations: both grow with tasks and polls, never with the
    number of tasks already tracked.
    """

    polls_total: int = 0
    polls_by_task: dict[str, int] = attrs.field(factory=dict)
    poll_histogram: dict[int, int] = attrs.field(factory=dict)
    tasks_succeeded: int = 0
    tasks_failed: int = 0
    tasks_errored: int = 0
    tasks_abandoned: int = 0
    timeouts: int = 0
    transient_errors: int = 0
    not_found_retries: int = 0
    rate_limit_pauses: int = 0
    polls_cancelled: int = 0
    ticks: int = 0
    max_polls_per_tick: int = 0
    waits: int = 0
    heap_pushes: int = 0
    webhooks_received: int = 0
    webhooks_confirmed: int = 0
    webhooks_unknown: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    probes: int = 0
    first_poll_hits: int = 0
    first_poll_misses: int = 0
    duration_samples: int = 0
    duration_p50: float | None = None
    seconds_per_cost_p50: float | None = None

    @property
    def tasks_completed(self) -> int:
        """Tasks seen finished (SUCCEED or FAILED)."""
        return self.tasks_succeeded + self.tasks_failed

    @property
    def mean_polls_per_task(self) -> float:
        """Mean polls over finished tasks (0.0 before any)."""
        tasks = sum(self.poll_histogram.values())
        polls = sum(n * count for n, count in self.poll_histogram.items())
        return polls / tasks if tasks else 0.0


@attrs.frozen(kw_only=True)
class PollHint:
    """What the caller knows about a task it waits for.

    ``submitted_at``: ``anyio.current_time()`` taken just before the POST;
    ``cost``: :attr:`Txt2ImgRequest.cost` (relative GPU work); ``webhook``:
    the task was submitted with a webhook, so polls are held back.
    """

    submitted_at: float | None = None
    cost: float | None = None
    webhook: bool = False


# --------------------------------------------------------------------------- entries


class _Entry:
    """One tracked task, shared by all its waiters."""

    __slots__ = (
        "answered",
        "backoff",
        "confirming",
        "cost",
        "created_at",
        "done",
        "dropped",
        "error",
        "errors",
        "event",
        "finish_by",
        "heap_seq",
        "last",
        "malformed",
        "next_at",
        "plan",
        "polling",
        "polls",
        "recheck",
        "result",
        "resume_at",
        "sampled",
        "scope",
        "sent",
        "split",
        "submitted_at",
        "task_id",
        "waiters",
        "webhook",
    )

    def __init__(self, task_id: str, now: float, backoff: float) -> None:
        self.task_id = task_id
        self.created_at = now
        self.submitted_at: float | None = None
        self.cost: float | None = None
        self.waiters = 0
        self.event = anyio.Event()  # set when done (or dropped)
        self.plan: Plan = "now"
        self.next_at = now
        self.heap_seq = -1  # seq of this entry's one valid heap item, -1: none
        self.polling = False  # handed to the workers, answer not applied yet
        self.scope: anyio.CancelScope | None = None  # the poll in flight
        self.sent = 0
        self.polls = 0
        self.answered = False
        self.sampled = False
        self.backoff = backoff
        self.errors = 0
        self.malformed: tuple[int, str] = (0, "")  # identical malformed answers in a row
        self.finish_by: float | None = None  # a whole-second eta's upper bound
        self.split = False  # the last second of a whole-second eta was split once
        self.last: TaskResult | None = None
        self.done = False
        self.dropped = False
        self.result: TaskResult | None = None
        self.error: Exception | None = None
        self.webhook = False  # submitted with a webhook: polls held back
        self.confirming: anyio.Event | None = None  # a delivery waits for a poll's answer
        self.recheck = False  # a delivery came while a GET was on the wire: poll once more
        self.resume_at: float | None = None  # the plan a delivery's poll interrupted

    @property
    def live(self) -> bool:
        return not (self.done or self.dropped)

    def absorb(self, hint: PollHint, now: float) -> None:
        """Take what ``hint`` knows and this entry does not (for learning)."""
        submitted, cost = hint.submitted_at, hint.cost
        if self.submitted_at is None and submitted is not None and math.isfinite(submitted):
            self.submitted_at = min(submitted, now)
        if self.cost is None and cost is not None and math.isfinite(cost) and cost > 0:
            self.cost = float(cost)
        self.webhook = self.webhook or hint.webhook


def _eta(result: TaskResult) -> float | None:
    eta = result.task.eta
    if eta is None or not 0 < eta <= MAX_SECONDS:
        return None
    return float(eta)


# --------------------------------------------------------------------------- scheduler


class PollScheduler:
    """Resolves :meth:`wait` calls with shared, deduplicated, rate-limited polls.

    ``fetch(task_id)`` performs one ``GET /v3/async/task-result`` (already
    retried on transient failures). :meth:`run` is its one loop task, started
    in the client's task group; :meth:`wait` needs it running.
    """

    def __init__(
        self,
        fetch: Callable[[str], Awaitable[TaskResult]],
        *,
        max_concurrent_polls: int,
        policy: PollPolicy,
    ) -> None:
        if max_concurrent_polls < 1:
            raise ValueError("max_concurrent_polls must be >= 1")
        self._fetch = fetch
        self.max_concurrent_polls = max_concurrent_polls
        self.policy = policy
        self._entries: dict[str, _Entry] = {}
        self._learner = Learner(
            window=policy.learning_window,
            warmup=policy.warmup_samples,
            quantile=policy.first_poll_quantile,
            latency_budget=policy.latency_budget,
        )
        #: Submission-to-delivery times of webhooks (when a delivery is late).
        self._deliveries = Learner(
            window=policy.learning_window, warmup=5, quantile=0.99, latency_budget=None
        )
        self._paused_until = -math.inf
        self._whole_etas = 0  # whole-second etas seen in a row (-1: a fraction was seen)
        self._stats = PollStats()
        self._seq = 0
        #: (next_at, seq, entry): lazy deletion, an item is valid iff entry.heap_seq == seq.
        self._heap: list[tuple[float, int, _Entry]] = []
        self._send: MemoryObjectSendStream[_Entry] | None = None  # set while running
        self._wake = anyio.Event()
        self._wake_at = -math.inf  # when the sleeping loop wakes up by itself
        self._closed_error: NovitaError | None = None

    def __repr__(self) -> str:
        return (
            f"<PollScheduler tracking={len(self._entries)} "
            f"max_concurrent_polls={self.max_concurrent_polls}>"
        )

    @property
    def stats(self) -> PollStats:
        """Live counters (polls, outcomes, learner estimates)."""
        return self._stats

    @property
    def tracked(self) -> int:
        """Tasks being polled for at least one waiter right now."""
        return len(self._entries)

    @property
    def running(self) -> bool:
        return self._send is not None

    def is_tracking(self, task_id: str) -> bool:
        """Someone here waits on ``task_id`` (and its result is not known yet)."""
        entry = self._entries.get(task_id)
        return entry is not None and entry.live

    def predict_first_poll(self, cost: float | None = None) -> float | None:
        """Seconds after submission the first poll would come now (``None``: not learned yet)."""
        return self._learner.first_poll(cost if cost is not None and cost > 0 else None)

    # ------------------------------------------------------------------ the loop task

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The scheduler's loop: ticks and ``max_concurrent_polls`` workers, until cancelled.

        When it ends, every task still waited on ends with a :class:`NovitaError`
        saying the client closed.
        """
        if self._send is not None:
            raise RuntimeError("this PollScheduler is already running")
        send, receive = anyio.create_memory_object_stream[_Entry](math.inf)
        self._closed_error = None
        try:
            async with anyio.create_task_group() as tg, send, receive:
                for _ in range(self.max_concurrent_polls):
                    tg.start_soon(self._worker, receive.clone())
                self._send = send
                task_status.started()
                await self._loop()
        finally:
            self._send = None
            self._close_entries()

    async def _loop(self) -> None:
        coalesce = self.policy.tick_coalesce
        while True:
            now = anyio.current_time()
            if now >= self._paused_until:
                self._tick(now + coalesce)
            wake_at = self._next_due()
            wake = self._wake
            if not wake.is_set():
                self._wake_at = wake_at
                with anyio.move_on_after(wake_at - anyio.current_time()):
                    await wake.wait()
                self._wake_at = -math.inf
            if wake.is_set():
                self._wake = anyio.Event()

    def _tick(self, horizon: float) -> None:
        """Hand every entry due by ``horizon`` to the workers."""
        heap, send = self._heap, self._send
        assert send is not None
        started = 0
        while heap and heap[0][0] <= horizon:
            _, seq, entry = heapq.heappop(heap)
            if entry.heap_seq != seq:
                continue  # stale: rescheduled, polling, done or dropped
            entry.heap_seq = -1
            if self._replan(entry) > horizon:
                self._push(entry)
                continue
            entry.polling = True
            send.send_nowait(entry)
            started += 1
        if started:
            stats = self._stats
            stats.ticks += 1
            stats.max_polls_per_tick = max(stats.max_polls_per_tick, started)

    async def _worker(self, receive: MemoryObjectReceiveStream[_Entry]) -> None:
        async with receive:
            async for entry in receive:
                answered = False
                if entry.live and anyio.current_time() >= self._paused_until:
                    with anyio.CancelScope() as scope:
                        entry.scope = scope
                        answered = await self._poll(entry)
                entry.scope, entry.polling = None, False
                if answered and entry.confirming is not None:
                    self._confirmed(entry)
                if entry.live:
                    if not answered:  # paused before an answer: due again when the pause ends
                        entry.next_at = min(entry.next_at, anyio.current_time())
                    self._schedule(entry)

    def _close_entries(self) -> None:
        """The loop stopped (client closing): no waiter may hang."""
        for entry in list(self._entries.values()):
            error = NovitaError(
                f"the AsyncNovita client was closed while waiting for task {entry.task_id}"
            )
            self._finish(entry, error=error)
        self._heap.clear()

    # ------------------------------------------------------------------ waiting

    async def wait(
        self, task_id: str, *, timeout: float | None = None, hint: PollHint | None = None
    ) -> TaskResult:
        """Wait for ``task_id`` to finish; polls are shared with every other waiter.

        Raises :class:`TaskFailedError` if it fails, :class:`TaskTimeoutError`
        after ``timeout`` seconds (its polling stops unless others still wait),
        and whatever non-transient error a poll raised (e.g. authentication).
        """
        if timeout is not None and not timeout >= 0:
            raise InvalidRequestError(f"timeout must be None or >= 0, got {timeout!r}")
        if self._send is None:
            raise RuntimeError("the poll scheduler is not running (enter the client first)")
        now = anyio.current_time()
        self._stats.waits += 1
        entry = self._entries.get(task_id)
        if entry is None:
            entry = self._track(task_id, hint, now)
        elif hint is not None:
            entry.absorb(hint, now)
        entry.waiters += 1
        try:
            with anyio.move_on_after(math.inf if timeout is None else timeout):
                await entry.event.wait()
        finally:
            self._leave(entry)
        if entry.done:
            return self._outcome(entry)
        await anyio.lowlevel.checkpoint_if_cancelled()  # an outer cancel wins over our deadline
        self._stats.timeouts += 1
        raise TaskTimeoutError(task_id, entry.last, timeout if timeout is not None else 0.0)

    def _track(self, task_id: str, hint: PollHint | None, now: float) -> _Entry:
        entry = _Entry(task_id, now, self.policy.backoff_initial)
        if hint is not None:
            entry.absorb(hint, now)
        submitted = entry.submitted_at
        learner = self._learner
        if submitted is not None and entry.webhook:
            entry.plan, entry.next_at = "webhook", submitted + self._safety_offset(entry.cost)
        elif submitted is not None:
            offset = learner.first_poll(entry.cost)
            if offset is not None:
                entry.plan, entry.next_at = "learned", submitted + offset
            elif learner.wants_probe():
                learner.probes_out += 1
                self._stats.probes += 1
                entry.plan, entry.next_at = "probe", submitted + self.policy.probe_delay
            else:
                entry.plan, entry.next_at = "cold", submitted + self.policy.first_poll_delay
        self._entries[task_id] = entry
        self._stats.polls_by_task[task_id] = 0
        self._schedule(entry)
        return entry

    def _leave(self, entry: _Entry) -> None:
        entry.waiters -= 1
        if entry.waiters == 0 and not entry.done:
            entry.dropped = True
            if entry.scope is not None:
                entry.scope.cancel()  # its poll in flight: cancelled, the answer ignored
            if entry.confirming is not None:
                self._confirmed(entry)
            self._settle_probe(entry)
            self._forget(entry)
            self._stats.tasks_abandoned += 1

    async def confirm(self, task_id: str) -> TaskResult | None:
        """A webhook says ``task_id`` ended: poll it now (once, whatever the number of
        deliveries) and return its result if that poll finds it finished.

        A task nobody here waits on costs no request (``None``). A poll that
        finds the task still running (a forged or early delivery) returns
        ``None`` and the task keeps its schedule.
        """
        entry = self._entries.get(task_id)
        stats = self._stats
        if entry is None or not entry.live or self._send is None:
            stats.webhooks_unknown += 1
            return None
        stats.webhooks_received += 1
        arrived = anyio.current_time()
        if entry.confirming is None:
            entry.confirming = anyio.Event()
            entry.resume_at = entry.next_at
            if entry.scope is not None:  # a GET on the wire may predate the delivery
                entry.recheck = True
            elif not entry.polling:
                entry.next_at = arrived
                self._schedule(entry)
        await entry.confirming.wait()
        if not entry.done or entry.result is None:
            return None
        if entry.webhook and entry.submitted_at is not None:
            self._deliveries.add(arrived - entry.submitted_at, entry.cost)
        return entry.result

    def _confirmed(self, entry: _Entry) -> None:
        """After a poll's answer: settle the delivery waiting for it (or poll once more)."""
        if entry.recheck and entry.live:
            entry.recheck = False
            entry.next_at = anyio.current_time()
            return
        event, entry.confirming = entry.confirming, None
        entry.recheck = False
        if entry.live and entry.resume_at is not None:
            entry.next_at = max(entry.next_at, entry.resume_at)  # a forgery moves nothing
        entry.resume_at = None
        if event is not None:
            self._stats.webhooks_confirmed += 1
            event.set()

    @staticmethod
    def _outcome(entry: _Entry) -> TaskResult:
        if entry.error is not None:
            raise entry.error
        result = entry.result
        assert result is not None
        if result.status is TaskStatus.FAILED:
            raise TaskFailedError(entry.task_id, result.task.reason, result)
        return result

    # ------------------------------------------------------------------ scheduling

    def _safety_offset(self, cost: float | None) -> float:
        """Seconds after submission when a webhook task's delivery is clearly late."""
        late = self._deliveries.first_poll(cost)
        if late is None:
            return self.policy.webhook_cold_delay
        return 1.25 * late + self.policy.webhook_grace

    def _replan(self, entry: _Entry) -> float:
        """Re-plan a first poll with what was learned since; return when it is due.

        A cold plan moves either way, a learned one only later; a webhook task's
        safety poll follows what is known of deliveries.
        """
        if entry.plan == "webhook":
            if entry.sent == 0 and entry.submitted_at is not None and entry.confirming is None:
                entry.next_at = entry.submitted_at + self._safety_offset(entry.cost)
            return entry.next_at
        if entry.sent == 0 and entry.plan in ("cold", "learned") and self._learner.warm:
            offset = self._learner.first_poll(entry.cost)
            if offset is not None and entry.submitted_at is not None:
                planned = entry.submitted_at + offset
                if entry.plan == "cold" or planned > entry.next_at:
                    entry.plan, entry.next_at = "learned", planned
        return entry.next_at

    def _replan_cold(self) -> None:
        """The learner just got warm: move every cold first poll to its learned time."""
        for entry in self._entries.values():
            if entry.plan == "cold" and entry.sent == 0 and not entry.polling:
                self._replan(entry)
                self._schedule(entry)

    def _next_due(self) -> float:
        heap = self._heap
        while heap and heap[0][2].heap_seq != heap[0][1]:
            heapq.heappop(heap)
        if not heap:
            return math.inf
        return max(heap[0][0], self._paused_until)

    def _push(self, entry: _Entry) -> None:
        self._seq += 1
        self._stats.heap_pushes += 1
        entry.heap_seq = self._seq
        heap = self._heap
        if len(heap) > 64 + 4 * len(self._entries):  # too many stale items: compact
            heap[:] = [item for item in heap if item[2].heap_seq == item[1]]
            heapq.heapify(heap)
        heapq.heappush(heap, (entry.next_at, self._seq, entry))

    def _schedule(self, entry: _Entry) -> None:
        """(Re)insert a live, idle entry at ``next_at``; wake the loop if that is sooner."""
        self._push(entry)
        if max(entry.next_at, self._paused_until) < self._wake_at:
            self._wake.set()

    async def _poll(self, entry: _Entry) -> bool:
        """Send one GET and apply its answer; ``False`` if the entry left meanwhile."""
        stats = self._stats
        entry.sent += 1
        stats.polls_total += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        sent = anyio.current_time()
        try:
            result = await self._fetch(entry.task_id)
        except Exception as exc:  # cancellation is a BaseException: never caught here
            if not entry.live:
                return False
            self._answered(entry)
            self._on_error(entry, exc)
            return True
        except BaseException:
            stats.polls_cancelled += 1
            raise
        finally:
            stats.in_flight -= 1
        if not entry.live:
            return False  # every waiter left while it was in flight: ignore the answer
        self._answered(entry)
        self._on_result(entry, result, sent)
        return True

    def _answered(self, entry: _Entry) -> None:
        entry.polls += 1
        self._stats.polls_by_task[entry.task_id] = entry.polls

    # ------------------------------------------------------------------ outcomes

    def _on_result(self, entry: _Entry, result: TaskResult, sent: float) -> None:
        now = anyio.current_time()
        policy, learner, stats = self.policy, self._learner, self._stats
        status = result.status
        eta = _eta(result)
        first, entry.answered = not entry.answered, True
        entry.last, entry.errors, entry.malformed = result, 0, (0, "")
        if first and entry.submitted_at is not None:
            if entry.plan == "probe":
                if not status.is_terminal:
                    if eta is not None:
                        learner.eta_supported = True
                        self._sample(entry, now - entry.submitted_at + eta)
                    elif learner.eta_supported is None:
                        learner.eta_supported = False
                elif status is TaskStatus.SUCCEED:
                    stamped = learner.from_timestamps(
                        result, entry.submitted_at, now - entry.submitted_at
                    )
                    self._sample(entry, sent - entry.submitted_at if stamped is None else stamped)
                self._settle_probe(entry)
            elif entry.plan != "now" and status is not TaskStatus.FAILED:
                if status.is_terminal:
                    stats.first_poll_hits += 1
                else:
                    stats.first_poll_misses += 1
        if status.is_terminal:
            if status is TaskStatus.SUCCEED and not entry.sampled:
                observed = None if entry.submitted_at is None else now - entry.submitted_at
                stamped = learner.from_timestamps(result, entry.submitted_at, observed)
                if stamped is not None:
                    self._sample(entry, stamped)
            self._finish(entry, result=result)
            return
        delay: float | None
        if eta is not None:
            delay = self._eta_delay(entry, eta, now)
            entry.backoff = policy.backoff_initial
        else:  # no eta: what slower tasks took, or back off
            delay = self._learned_delay(entry, now)
            if delay is None:
                delay = entry.backoff
                entry.backoff = min(entry.backoff * policy.backoff_factor, policy.max_interval)
        entry.next_at = now + min(max(delay, policy.min_interval), policy.max_interval)

    def _eta_delay(self, entry: _Entry, eta: float, now: float) -> float:
        """When to poll after an answer with ``eta`` seconds left.

        A server whose etas are whole seconds (five in a row, never a fraction)
        rounds up: the task ends within the last second, ``(eta - 1, eta]``.
        Polling at the end of that second costs one poll and up to a second of
        latency; the first time, it is split: a poll at its middle, then (if
        needed) one at its end. Exact etas are polled at ``eta + eta_margin``.
        """
        margin = self.policy.eta_margin
        if eta != int(eta):
            self._whole_etas = -1  # a fraction: this server's etas are exact
        elif self._whole_etas >= 0:
            self._whole_etas += 1
        if self._whole_etas < _WHOLE_ETAS:
            return eta + margin
        bound = now + eta
        if entry.finish_by is not None and now < entry.finish_by < bound:
            bound = entry.finish_by
        entry.finish_by = bound
        if entry.split or bound - now <= 0.6 or bound - now > self.policy.max_interval + 0.5:
            return bound - now + margin
        entry.split = True
        return bound - 0.5 - now

    def _learned_delay(self, entry: _Entry, now: float) -> float | None:
        if entry.submitted_at is None:
            return None
        offset = self._learner.next_poll(now - entry.submitted_at, entry.cost)
        if offset is None:
            return None
        delay = entry.submitted_at + offset - now
        budget = self.policy.latency_budget
        return delay if budget is None else min(delay, budget)

    def _on_error(self, entry: _Entry, exc: Exception) -> None:
        now = anyio.current_time()
        policy, stats = self.policy, self._stats
        if isinstance(exc, NotFoundError) and exc.reason == "TASK_NOT_FOUND":
            since = entry.submitted_at if entry.submitted_at is not None else entry.created_at
            if now - since < policy.not_found_grace:
                stats.not_found_retries += 1
                entry.next_at = now + self._error_delay(entry)
                return
        elif isinstance(exc, ServerError) and exc.reason == "TASK_FAILED":
            reason = exc.message or exc.reason
            task = Task(task_id=entry.task_id, status=TaskStatus.FAILED, reason=reason)
            self._finish(entry, result=TaskResult(task=task))
            return
        elif isinstance(exc, _TRANSIENT):
            if isinstance(exc, MalformedResponseError) and self._malformed_again(entry, exc):
                self._finish(entry, error=exc)
                return
            delay = self._error_delay(entry)
            stats.transient_errors += 1
            if isinstance(exc, RateLimitError):  # account-wide: pause every poll
                pause = exc.retry_after if exc.retry_after is not None else delay
                pause = min(pause, policy.max_pause)
                self._paused_until = max(self._paused_until, now + pause)
                stats.rate_limit_pauses += 1
                delay = max(delay, pause)
            logger.warning(
                "polling task %s failed (%s: %s); next poll in %.2fs",
                entry.task_id,
                type(exc).__name__,
                exc,
                delay,
            )
            entry.next_at = now + delay
            return
        self._finish(entry, error=exc)

    def _malformed_again(self, entry: _Entry, exc: MalformedResponseError) -> bool:
        """Count identical malformed answers in a row; True once there are too many."""
        count, body = entry.malformed
        count = count + 1 if body == exc.body else 1
        entry.malformed = (count, exc.body)
        return count >= self.policy.max_malformed

    def _error_delay(self, entry: _Entry) -> float:
        policy = self.policy
        entry.errors += 1
        delay = policy.backoff_initial * policy.backoff_factor ** min(entry.errors - 1, 64)
        return min(max(delay, policy.min_interval), policy.max_interval)

    def _sample(self, entry: _Entry, seconds: float) -> None:
        entry.sampled = True
        learner, stats = self._learner, self._stats
        warmed = learner.add(seconds, entry.cost)
        stats.duration_samples = len(learner.raw)
        stats.duration_p50 = learner.raw.quantile(0.5) if len(learner.raw) else None
        if len(learner.per_cost):
            stats.seconds_per_cost_p50 = learner.per_cost.quantile(0.5)
        if warmed:
            self._replan_cold()

    def _settle_probe(self, entry: _Entry) -> None:
        if entry.plan == "probe":
            entry.plan = "probed"
            self._learner.probes_out -= 1

    def _finish(
        self, entry: _Entry, *, result: TaskResult | None = None, error: Exception | None = None
    ) -> None:
        stats = self._stats
        entry.done, entry.result, entry.error = True, result, error
        self._settle_probe(entry)
        self._forget(entry)
        if result is None:
            stats.tasks_errored += 1
        else:
            if result.status is TaskStatus.SUCCEED:
                stats.tasks_succeeded += 1
            else:
                stats.tasks_failed += 1
            stats.poll_histogram[entry.polls] = stats.poll_histogram.get(entry.polls, 0) + 1
        entry.event.set()
        if entry.confirming is not None:
            self._confirmed(entry)

    def _forget(self, entry: _Entry) -> None:
        entry.heap_seq = -1  # its heap items are stale now
        if self._entries.get(entry.task_id) is entry:
            del self._entries[entry.task_id]
            self._stats.polls_by_task.pop(entry.task_id, None)
