"""The shared polling scheduler behind :meth:`AsyncNovita.wait`.

One :class:`PollScheduler` per client holds the table of tracked tasks (one
*entry* per task_id, shared by all its waiters, so two waiters share one poll
sequence), a heap of their next poll times, a pool of ``max_concurrent_polls``
poll workers, and the :class:`~._plan.Planner` that decides when each task is
polled (under a :class:`~._policy.PollPolicy`; it holds the duration learner and the
rate-limit pause).

It runs as ONE loop task in the client's task group (:meth:`PollScheduler.run`).
Each tick pops every entry due within ``tick_coalesce`` from the heap
(O(due · log n)) and hands it to the workers over a memory object stream; then
the loop sleeps until the next due time or until an entry becomes due earlier.
A waiter only registers its task and sleeps on the entry's event: O(log n) per
wait, whatever the number of tasks tracked. When the last waiter of a task
leaves (deadline, cancellation), its entry is dropped at once and its poll in
flight cancelled: no more polls.

With webhooks, :meth:`PollScheduler.confirm` polls a task at once when a
delivery says it ended (once, whatever the number of deliveries), in the
delivery's own task, beside the workers (``max_concurrent_polls`` bounds the
scheduled polls; the transport's cap on requests in flight bounds both).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._entry import Entry
from ._errors import InvalidRequestError, NovitaError
from ._plan import Outcome, Planner
from ._policy import PollHint, PollPolicy, PollStats
from ._results import TaskResult, TaskStatus
from ._task_errors import TaskFailedError, TaskTimeoutError

__all__ = ["PollScheduler", "check_timeout"]


def check_timeout(timeout: float | None) -> None:
    """A wait's deadline must be None or a number >= 0 (raised before any POST)."""
    if timeout is not None and not timeout >= 0:
        raise InvalidRequestError(f"timeout must be None or >= 0, got {timeout!r}")


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
        self._entries: dict[str, Entry] = {}
        self._stats = PollStats()
        self._planner = Planner(policy, self._stats)
        self._seq = 0
        #: (next_at, seq, entry): lazy deletion, an item is valid iff entry.heap_seq == seq.
        self._heap: list[tuple[float, int, Entry]] = []
        self._send: MemoryObjectSendStream[Entry] | None = None  # set while running
        self._wake = anyio.Event()
        self._wake_at = -math.inf  # when the sleeping loop wakes up by itself

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
        return self._planner.learner.first_poll(cost if cost is not None and cost > 0 else None)

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
        send, receive = anyio.create_memory_object_stream[Entry](math.inf)
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
            if now >= self._planner.paused_until:
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
            if self._planner.replan(entry) > horizon:
                self._push(entry)
                continue
            entry.polling = True
            send.send_nowait(entry)
            started += 1
        if started:
            stats = self._stats
            stats.ticks += 1
            stats.max_polls_per_tick = max(stats.max_polls_per_tick, started)

    async def _worker(self, receive: MemoryObjectReceiveStream[Entry]) -> None:
        async with receive:
            async for entry in receive:
                await self._poll_once(entry)

    async def _poll_once(self, entry: Entry) -> None:
        """Poll an entry marked ``polling`` (unless it left or polls are paused), settle
        a delivery waiting for the answer, and schedule the entry's next poll."""
        answered = False
        try:
            if entry.live and anyio.current_time() >= self._planner.paused_until:
                with anyio.CancelScope() as scope:
                    entry.scope = scope
                    answered = await self._poll(entry)
        finally:
            entry.scope, entry.polling = None, False
            if answered and entry.confirming is not None:
                self._confirmed(entry)
            if entry.live:
                if not answered:  # paused or cancelled before an answer: due again at once
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
        check_timeout(timeout)
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

    def _track(self, task_id: str, hint: PollHint | None, now: float) -> Entry:
        entry = Entry(task_id, now, self.policy.backoff_initial)
        if hint is not None:
            entry.absorb(hint, now)
        self._planner.first(entry)
        self._entries[task_id] = entry
        self._stats.polls_by_task[task_id] = 0
        self._schedule(entry)
        return entry

    def _leave(self, entry: Entry) -> None:
        entry.waiters -= 1
        if entry.waiters == 0 and not entry.done:
            entry.dropped = True
            if entry.scope is not None:
                entry.scope.cancel()  # its poll in flight: cancelled, the answer ignored
            if entry.confirming is not None:
                self._confirmed(entry)
            self._planner.settle_probe(entry)
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
        event = entry.confirming
        first = event is None  # the delivery whose GET confirms: the one learned from
        if event is None:
            event = entry.confirming = anyio.Event()
            entry.resume_at = entry.next_at
            if entry.scope is not None:  # a GET on the wire may predate the delivery
                entry.recheck = True
            elif not entry.polling:
                await self._confirm_now(entry)
        await event.wait()
        if not entry.done or entry.result is None:
            return None
        if first:
            self._planner.delivered(entry, arrived)
        return entry.result

    async def _confirm_now(self, entry: Entry) -> None:
        """Poll an idle ``entry`` in this (the delivery's) task, beside the workers: a
        burst of deliveries is confirmed as fast as it comes (bounded by the transport's
        requests in flight, ``max_connections``), not ``max_concurrent_polls`` at a time
        behind the scheduled polls. Paused by a 429, or cancelled before an answer: the
        workers poll it as soon as they may."""
        entry.polling, entry.heap_seq = True, -1  # its heap item is stale now
        await self._poll_once(entry)

    def _confirmed(self, entry: Entry) -> None:
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
            if entry.done and entry.result is not None:
                self._stats.webhooks_confirmed += 1
            event.set()

    @staticmethod
    def _outcome(entry: Entry) -> TaskResult:
        if entry.error is not None:
            raise entry.error
        result = entry.result
        assert result is not None
        if result.status is TaskStatus.FAILED:
            raise TaskFailedError(entry.task_id, result.task.reason, result)
        return result

    # ------------------------------------------------------------------ scheduling

    def _replan_cold(self) -> None:
        """The learner has its first duration, learnt one while cold or just got warm,
        or the last probe that cold first polls waited for ended: re-plan every cold
        first poll (those that moved go back on the heap)."""
        for entry in self._entries.values():
            if entry.plan == "cold" and entry.sent == 0 and not entry.polling:
                before = entry.next_at
                if self._planner.replan(entry) != before:
                    self._schedule(entry)

    def _next_due(self) -> float:
        heap = self._heap
        while heap and heap[0][2].heap_seq != heap[0][1]:
            heapq.heappop(heap)
        if not heap:
            return math.inf
        return max(heap[0][0], self._planner.paused_until)

    def _push(self, entry: Entry) -> None:
        self._seq += 1
        self._stats.heap_pushes += 1
        entry.heap_seq = self._seq
        heap = self._heap
        if len(heap) > 64 + 4 * len(self._entries):  # too many stale items: compact
            heap[:] = [item for item in heap if item[2].heap_seq == item[1]]
            heapq.heapify(heap)
        heapq.heappush(heap, (entry.next_at, self._seq, entry))

    def _schedule(self, entry: Entry) -> None:
        """(Re)insert a live, idle entry at ``next_at``; wake the loop if that is sooner."""
        self._push(entry)
        if max(entry.next_at, self._planner.paused_until) < self._wake_at:
            self._wake.set()

    async def _poll(self, entry: Entry) -> bool:
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
            self._apply(entry, self._planner.failed(entry, exc))
            return True
        except BaseException:
            stats.polls_cancelled += 1
            raise
        finally:
            stats.in_flight -= 1
        if not entry.live:
            return False  # every waiter left while it was in flight: ignore the answer
        self._answered(entry)
        self._apply(entry, self._planner.answered(entry, result, sent))
        return True

    def _answered(self, entry: Entry) -> None:
        entry.polls += 1
        self._stats.polls_by_task[entry.task_id] = entry.polls

    def _apply(self, entry: Entry, outcome: Outcome) -> None:
        if outcome.finished:
            self._finish(entry, result=outcome.result, error=outcome.error)
        if outcome.warmed:
            self._replan_cold()

    # ------------------------------------------------------------------ outcomes

    def _finish(
        self, entry: Entry, *, result: TaskResult | None = None, error: Exception | None = None
    ) -> None:
        stats = self._stats
        entry.done, entry.result, entry.error = True, result, error
        self._planner.settle_probe(entry)
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

    def _forget(self, entry: Entry) -> None:
        entry.heap_seq = -1  # its heap items are stale now
        released = self._planner.forget(entry)
        if self._entries.get(entry.task_id) is entry:
            del self._entries[entry.task_id]
            self._stats.polls_by_task.pop(entry.task_id, None)
        if released:
            self._replan_cold()
