"""The shared polling scheduler behind :meth:`AsyncNovita.wait`.

One :class:`PollScheduler` per client holds the table of tracked tasks (one
*entry* per task_id, shared by all its waiters, so two waiters share one poll
sequence), a heap of their next poll times, one :class:`anyio.CapacityLimiter`
for in-flight polls, one duration learner and one rate-limit pause.

Tick model. At any time exactly one waiter (of any task) is the *driver*; it
runs the scheduler's tick loop inside its own :meth:`~PollScheduler.wait`
call, in a task group it owns, so the client owns no background task and
works with or without ``async with``. Each tick pops every entry due within
``tick_coalesce`` from the heap (O(due · log n)) and starts one poll per due
entry in that task group, all concurrent under the limiter, never two for one
entry; then the driver sleeps until the next due time, or until woken (an
entry became due earlier, its own task finished). The other waiters sleep on
their own event until their task is done, their deadline, or their election.

Hand-off. When the driver's task finishes (or its deadline is ``handoff_grace``
away and a later-deadline waiter exists) it elects the waiter with the latest
deadline (newest first) and wakes it: that one ticks on at once. The old
driver gives its in-flight polls ``handoff_grace`` to finish, cancels the rest
and the not-yet-started ones (GETs are idempotent; those entries become due
now). A driver cancelled from outside elects its heir synchronously in
``finally`` and its polls are cancelled the same way. When the last waiter of
a task leaves, its entry is dropped at once: its in-flight poll is cancelled,
no more polls.

Timing of one task (see :class:`PollPolicy`): the first poll comes at
submission + a quantile of the durations learned from finished tasks (Novita's
``debug_info`` timestamps, or the ``eta`` of a few early *probe* polls while
nothing is known yet), scaled by the request's cost when that predicts better;
after an unfinished answer, the server's ``eta``, else the learned durations
of slower tasks, else a backoff.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
import anyio.lowlevel
import attrs
from anyio.abc import TaskGroup

from ._errors import (
    APIConnectionError,
    InvalidRequestError,
    MalformedResponseError,
    NotFoundError,
    RateLimitError,
    ServerError,
    TaskFailedError,
    TaskTimeoutError,
)
from ._models import Task, TaskResult, TaskStatus

__all__ = ["PollHint", "PollPolicy", "PollScheduler", "PollStats"]

logger = logging.getLogger("novita_async")

#: Errors that survived the transport's retries but say nothing about the task.
_TRANSIENT = (APIConnectionError, ServerError, RateLimitError, MalformedResponseError)
#: The latency guard keeps this fraction of first polls at most ``latency_budget`` late.
_GUARD_QUANTILE = 0.05
#: A task slower than this fraction of the samples is polled with a plain backoff.
_TAIL = 0.98
#: Extrapolation beyond the samples uses the mean of this many edge spacings.
_EDGE_SPACINGS = 3
#: The cost model must cut the relative spread of durations below this fraction of the raw one.
_COST_MODEL_GAIN = 0.8
#: Longest duration / eta taken at face value (larger ones are not seconds).
_MAX_SECONDS = 86_400.0
#: An election looks past at most this many waiters whose task is being polled.
_MAX_SKIPPED_HEIRS = 256
#: Recent ``server submit time - local submit time`` values (server clock offset).
_CLOCK_SAMPLES = 32

_nonneg = attrs.validators.ge(0.0)
_positive = attrs.validators.gt(0.0)
_fraction = attrs.validators.and_(attrs.validators.gt(0.0), attrs.validators.lt(1.0))


def _optional_nonneg(_: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"{attribute.name} must be None or >= 0, got {value!r}")


Plan = Literal["now", "probe", "probed", "cold", "learned"]


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
      may come that much early). A driver handing the tick loop over gives its
      in-flight polls ``handoff_grace`` to finish before cancelling them.
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
    handoff_grace: float = attrs.field(default=0.25, validator=_nonneg)

    def __attrs_post_init__(self) -> None:
        if self.min_interval > self.max_interval:
            raise ValueError("min_interval must not exceed max_interval")
        if self.warmup_samples > self.learning_window:
            raise ValueError("warmup_samples must not exceed learning_window")


@attrs.frozen(kw_only=True)
class PollHint:
    """What the caller knows about a task it waits for.

    ``submitted_at``: ``anyio.current_time()`` taken just before the POST;
    ``cost``: :attr:`Txt2ImgRequest.cost` (relative GPU work).
    """

    submitted_at: float | None = None
    cost: float | None = None


@attrs.define(kw_only=True, eq=False)
class PollStats:
    """Live counters of a :class:`PollScheduler` (read them, don't write them).

    ``polls_total`` counts GETs sent, ``polls_cancelled`` those cut short (a
    dropped task, a hand-off); ``polls_by_task`` counts answered polls of the
    tasks being tracked right now; ``poll_histogram`` maps "answered polls a
    finished task needed" to a task count. ``ticks`` counts driver ticks that
    started polls (``max_polls_per_tick``: the most one tick started);
    ``handoffs`` counts driver elections after the first driver left.
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
    handoffs: int = 0
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


# --------------------------------------------------------------------------- learning


def _stderr(q: float, n: int) -> float:
    """Standard error of an empirical ``q``-quantile's coverage from ``n`` samples."""
    return math.sqrt(q * (1 - q) / n)


class _Window:
    """The last ``size`` samples of one quantity, also kept sorted (for quantiles)."""

    __slots__ = ("_sorted", "_values")

    def __init__(self, size: int) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: float) -> None:
        if len(self._values) == self._values.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, self._values[0])]
        self._values.append(value)
        bisect.insort(self._sorted, value)

    def quantile(self, q: float) -> float:
        """Quantile at plotting position q(n+1); beyond the samples, extrapolated."""
        ordered = self._sorted
        last = len(ordered) - 1
        if last == 0:
            return ordered[0]
        pos = q * (last + 2) - 1
        k = min(_EDGE_SPACINGS, last)
        if pos < 0:  # the smallest sample overstates a low quantile: step below it
            return max(0.0, ordered[0] + pos * (ordered[k] - ordered[0]) / k)
        if pos > last:
            return ordered[last] + (pos - last) * (ordered[last] - ordered[last - k]) / k
        i = int(pos)
        if i == last:
            return ordered[last]
        return ordered[i] + (ordered[i + 1] - ordered[i]) * (pos - i)

    def fraction_below(self, value: float) -> float:
        """Empirical CDF at ``value`` (plotting positions, as :meth:`quantile`)."""
        return bisect.bisect_right(self._sorted, value) / (len(self._sorted) + 1)

    def spread(self, lo: float, hi: float) -> float:
        """log(hi-quantile / lo-quantile): relative dispersion, scale-free."""
        low = self.quantile(lo)
        return math.log(self.quantile(hi) / low) if low > 0 else math.inf


class _Learner:
    """Learns how long tasks take, from submission to completion (local clock).

    Samples come from Novita's ``debug_info`` timestamps of finished tasks
    (shifted onto the local clock by the smallest recent offset between the two
    clocks, so the submission lag is included) or from the ``eta`` of probe
    polls. Two windows are kept: seconds, and seconds per unit of cost; the one
    with the smaller relative spread predicts. Memory is bounded by the windows.
    """

    def __init__(self, policy: PollPolicy) -> None:
        self.policy = policy
        self.raw = _Window(policy.learning_window)
        self.per_cost = _Window(policy.learning_window)
        self._offsets: deque[float] = deque(maxlen=_CLOCK_SAMPLES)
        self.probes_out = 0
        self.eta_supported: bool | None = None

    @property
    def warm(self) -> bool:
        return len(self.raw) >= self.policy.warmup_samples

    def _model(self, cost: float | None) -> tuple[_Window, float, float, float]:
        """(window, scale, low quantile, high quantile) that predict a task of ``cost``.

        Quantiles are widened by one standard error while samples are few.
        Durations are scaled by ``cost`` when that clearly shrinks their
        relative spread (i.e. when cost predicts the duration).
        """
        policy = self.policy
        n = len(self.raw)
        hi = min(0.99, policy.first_poll_quantile + _stderr(policy.first_poll_quantile, n))
        lo = max(0.0, _GUARD_QUANTILE - _stderr(_GUARD_QUANTILE, n))
        if (
            cost is not None
            and len(self.per_cost) >= policy.warmup_samples
            and self.per_cost.spread(lo, hi) < _COST_MODEL_GAIN * self.raw.spread(lo, hi)
        ):
            return self.per_cost, cost, lo, hi
        return self.raw, 1.0, lo, hi

    def first_poll(self, cost: float | None) -> float | None:
        """Seconds after submission to poll first, or ``None`` while nothing is known.

        The ``first_poll_quantile`` of the durations, but at most
        ``latency_budget`` after their 5 % quantile.
        """
        if not self.warm:
            return None
        window, scale, lo, hi = self._model(cost)
        offset = scale * window.quantile(hi)
        if self.policy.latency_budget is not None:
            offset = min(offset, scale * window.quantile(lo) + self.policy.latency_budget)
        return max(offset, 0.0)

    def next_poll(self, elapsed: float, cost: float | None) -> float | None:
        """After an unfinished answer without eta, ``elapsed`` s after submission:
        seconds after submission to poll next, from the durations of the tasks
        that took longer. ``None`` when nothing is known or the task is slower
        than almost every sample.
        """
        if not self.warm:
            return None
        window, scale, _, _ = self._model(cost)
        done = window.fraction_below(elapsed / scale)
        if done >= _TAIL:
            return None
        return scale * window.quantile(done + (1 - done) * self.policy.first_poll_quantile)

    def wants_probe(self) -> bool:
        return (
            self.eta_supported is not False
            and self.probes_out + len(self.raw) < self.policy.warmup_samples
        )

    def from_timestamps(self, result: TaskResult, submitted_at: float | None) -> float | None:
        """Submission-to-completion seconds from the server's timestamps, if any."""
        info = result.extra.debug_info
        if info is None or not info.submit_time_ms or not info.complete_time_ms:
            return None
        submitted = info.submit_time_ms / 1000
        duration = info.complete_time_ms / 1000 - submitted
        if not 0 <= duration <= _MAX_SECONDS:
            return None
        if submitted_at is None:
            return duration
        self._offsets.append(submitted - submitted_at)
        return duration + self._offsets[-1] - min(self._offsets)

    def add(self, seconds: float, cost: float | None, stats: PollStats) -> bool:
        """Learn one duration; ``True`` when it made the learner warm."""
        if not 0 <= seconds <= _MAX_SECONDS:
            return False
        was_warm = self.warm
        self.raw.add(seconds)
        if cost is not None:
            self.per_cost.add(seconds / cost)
            stats.seconds_per_cost_p50 = self.per_cost.quantile(0.5)
        stats.duration_samples += 1
        stats.duration_p50 = self.raw.quantile(0.5)
        return self.warm and not was_warm


# --------------------------------------------------------------------------- entries


class _Waiter:
    """One :meth:`PollScheduler.wait` call."""

    __slots__ = ("active", "deadline", "entry", "wake")

    def __init__(self, entry: _Entry, deadline: float) -> None:
        self.entry = entry
        self.deadline = deadline
        self.active = True
        self.wake = anyio.Event()


class _Entry:
    """One tracked task, shared by all its waiters."""

    __slots__ = (
        "answered",
        "backoff",
        "cost",
        "created_at",
        "done",
        "dropped",
        "error",
        "errors",
        "fetching",
        "heap_seq",
        "last",
        "next_at",
        "plan",
        "polling",
        "polls",
        "result",
        "sampled",
        "scope",
        "sent",
        "submitted_at",
        "task_id",
        "waiters",
    )

    def __init__(self, task_id: str, now: float, backoff: float) -> None:
        self.task_id = task_id
        self.created_at = now
        self.submitted_at: float | None = None
        self.cost: float | None = None
        self.waiters: dict[_Waiter, None] = {}
        self.plan: Plan = "now"
        self.next_at = now
        self.heap_seq = -1  # seq of this entry's one valid heap item, -1: none
        self.polling = False  # a poll task exists (queued on the limiter or fetching)
        self.fetching = False
        self.scope: anyio.CancelScope | None = None  # the poll task's scope
        self.sent = 0
        self.polls = 0
        self.answered = False
        self.sampled = False
        self.backoff = backoff
        self.errors = 0
        self.last: TaskResult | None = None
        self.done = False
        self.dropped = False
        self.result: TaskResult | None = None
        self.error: Exception | None = None

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


class _Session:
    """The polls one driver started (they live in its task group)."""

    __slots__ = ("closing", "entries", "idle")

    def __init__(self) -> None:
        self.entries: set[_Entry] = set()
        self.closing = False
        self.idle = anyio.Event()

    def discard(self, entry: _Entry) -> None:
        self.entries.discard(entry)
        if self.closing and not self.entries:
            self.idle.set()


def _eta(result: TaskResult) -> float | None:
    eta = result.task.eta
    if eta is None or not 0 < eta <= _MAX_SECONDS:
        return None
    return float(eta)


# --------------------------------------------------------------------------- scheduler


class PollScheduler:
    """Resolves :meth:`wait` calls with shared, deduplicated, rate-limited polls.

    ``fetch(task_id)`` performs one ``GET /v3/async/task-result`` (already
    retried on transient failures). Safe to share across tasks of one event
    loop (e.g. FastAPI requests). It owns no background task: one waiter at a
    time drives the tick loop, its polls running in a task group inside that
    waiter's :meth:`wait` call.
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
        self._limiter = anyio.CapacityLimiter(max_concurrent_polls)
        self.max_concurrent_polls = max_concurrent_polls
        self.policy = policy
        self._entries: dict[str, _Entry] = {}
        self._learner = _Learner(policy)
        self._paused_until = -math.inf
        self._stats = PollStats()
        self._seq = 0
        #: (next_at, seq, entry): lazy deletion, an item is valid iff entry.heap_seq == seq.
        self._heap: list[tuple[float, int, _Entry]] = []
        #: (-deadline, -seq, waiter): election order, lazy deletion of waiters that left.
        self._candidates: list[tuple[float, int, _Waiter]] = []
        self._waiting = 0
        self._driver: _Waiter | None = None
        self._wake_at = -math.inf  # when the sleeping driver wakes up by itself

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

    def predict_first_poll(self, cost: float | None = None) -> float | None:
        """Seconds after submission the first poll would come now (``None``: not learned yet)."""
        return self._learner.first_poll(cost if cost is not None and cost > 0 else None)

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
        now = anyio.current_time()
        entry = self._entries.get(task_id)
        if entry is None:
            entry = self._track(task_id, hint, now)
        elif hint is not None:
            entry.absorb(hint, now)
        me = self._join(entry, now + timeout if timeout is not None else math.inf)
        try:
            with anyio.CancelScope(deadline=me.deadline):
                while not entry.done:
                    if self._driver is me:
                        await self._drive(entry, me)
                    else:
                        await me.wake.wait()
                        me.wake = anyio.Event()
        finally:
            self._leave(entry, me)
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
        if submitted is not None:
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

    def _join(self, entry: _Entry, deadline: float) -> _Waiter:
        me = _Waiter(entry, deadline)
        entry.waiters[me] = None
        self._seq += 1
        self._waiting += 1
        candidates = self._candidates
        if len(candidates) > 64 + 2 * self._waiting:  # drop the waiters that left
            candidates[:] = [c for c in candidates if c[2].active and c[2].entry.live]
            heapq.heapify(candidates)
        heapq.heappush(candidates, (-deadline, -self._seq, me))
        if self._driver is None:
            self._driver = me
        return me

    def _leave(self, entry: _Entry, me: _Waiter) -> None:
        me.active = False
        del entry.waiters[me]
        self._waiting -= 1
        self._resign(me)
        if not entry.waiters and not entry.done:
            entry.dropped = True
            if entry.scope is not None:
                entry.scope.cancel()  # its poll in flight: cancelled, the answer ignored
            self._settle_probe(entry)
            self._forget(entry)
            self._stats.tasks_abandoned += 1

    @staticmethod
    def _outcome(entry: _Entry) -> TaskResult:
        if entry.error is not None:
            raise entry.error
        result = entry.result
        assert result is not None
        if result.status is TaskStatus.FAILED:
            raise TaskFailedError(entry.task_id, result.task.reason, result)
        return result

    # ------------------------------------------------------------------ election

    def _top_waiter(self) -> _Waiter | None:
        """The waiter with the latest deadline (newest first) whose task is not done."""
        candidates = self._candidates
        while candidates:
            waiter = candidates[0][2]
            if waiter.active and not waiter.entry.done:
                return waiter
            heapq.heappop(candidates)
        return None

    def _elect(self, me: _Waiter) -> _Waiter | None:
        """The next driver after ``me``: the latest deadline (newest first), preferring
        a waiter whose task is not being polled right now (it may be done in a moment).
        An abdicating ``me`` (still active) needs an heir with a later deadline."""
        candidates = self._candidates
        floor = me.deadline if me.active else -math.inf
        skipped: list[tuple[float, int, _Waiter]] = []
        heir: _Waiter | None = None
        while candidates:
            waiter = candidates[0][2]
            if not waiter.active or waiter.entry.done:
                heapq.heappop(candidates)
            elif waiter.deadline <= floor:
                break
            elif waiter.entry.polling and len(skipped) < _MAX_SKIPPED_HEIRS:
                skipped.append(heapq.heappop(candidates))
            else:
                heir = waiter
                break
        if heir is None and skipped:
            heir = skipped[0][2]
        for item in skipped:
            heapq.heappush(candidates, item)
        return heir

    def _resign(self, me: _Waiter) -> None:
        """If ``me`` drives, elect and wake the next driver (synchronous)."""
        if self._driver is not me:
            return
        self._driver = None
        self._wake_at = -math.inf  # the heir is not asleep on a timer: kick it for anything
        heir = self._elect(me)
        if heir is not None:
            assert heir is not me
            self._driver = heir
            self._stats.handoffs += 1
            heir.wake.set()

    # ------------------------------------------------------------------ driving

    async def _drive(self, entry: _Entry, me: _Waiter) -> None:
        """Run the tick loop until ``me``'s task is done or ``me`` hands over."""
        session = _Session()
        async with anyio.create_task_group() as tg:
            try:
                await self._tick_loop(entry, me, session, tg)
            except BaseException:  # cancelled (deadline, caller): the heir takes over now
                me.active = False
                self._resign(me)
                raise
            if entry.done:
                me.active = False
            self._resign(me)
            await self._release(session, tg)

    async def _tick_loop(
        self, entry: _Entry, me: _Waiter, session: _Session, tg: TaskGroup
    ) -> None:
        grace = self.policy.handoff_grace
        while not entry.done and self._driver is me:
            now = anyio.current_time()
            soft_deadline = me.deadline - grace
            if now >= soft_deadline:
                heir = self._top_waiter()
                if heir is not None and heir.deadline > me.deadline:
                    return  # our deadline is near: let a longer-lived waiter drive
            self._tick(now, session, tg)
            wake_at = self._next_due()
            if soft_deadline > now:
                wake_at = min(wake_at, soft_deadline)
            if not me.wake.is_set():
                self._wake_at = wake_at
                try:
                    with anyio.CancelScope(deadline=wake_at):
                        await me.wake.wait()
                finally:
                    self._wake_at = -math.inf
            if me.wake.is_set():
                me.wake = anyio.Event()

    def _tick(self, now: float, session: _Session, tg: TaskGroup) -> None:
        """Start one poll for every entry due by ``now + tick_coalesce``."""
        if now < self._paused_until:
            return
        heap = self._heap
        horizon = now + self.policy.tick_coalesce
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
            session.entries.add(entry)
            tg.start_soon(self._run_poll, entry, session)
            started += 1
        if started:
            stats = self._stats
            stats.ticks += 1
            stats.max_polls_per_tick = max(stats.max_polls_per_tick, started)

    def _replan(self, entry: _Entry) -> float:
        """Re-plan a first poll with what was learned since; return when it is due.

        A cold plan moves either way, a learned one only later.
        """
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
        entry.heap_seq = self._seq
        heap = self._heap
        if len(heap) > 64 + 4 * len(self._entries):  # too many stale items: compact
            heap[:] = [item for item in heap if item[2].heap_seq == item[1]]
            heapq.heapify(heap)
        heapq.heappush(heap, (entry.next_at, self._seq, entry))

    def _schedule(self, entry: _Entry) -> None:
        """(Re)insert a live, idle entry at ``next_at``; wake the driver if that is sooner."""
        self._push(entry)
        driver = self._driver
        if driver is not None and (
            self._wake_at == -math.inf or max(entry.next_at, self._paused_until) < self._wake_at
        ):
            driver.wake.set()

    async def _release(self, session: _Session, tg: TaskGroup) -> None:
        """After a hand-off: polls not sent yet go to the new driver at once, polls
        in flight get ``handoff_grace`` to finish, the rest are cancelled."""
        session.closing = True
        for entry in list(session.entries):
            if not entry.fetching and entry.scope is not None:
                entry.scope.cancel()
        if session.entries:
            with anyio.move_on_after(self.policy.handoff_grace):
                await session.idle.wait()
        tg.cancel_scope.cancel()

    async def _run_poll(self, entry: _Entry, session: _Session) -> None:
        """One poll of ``entry`` (a task in the driver's task group)."""
        scope = entry.scope = anyio.CancelScope()
        answered = False
        try:
            with scope:
                if entry.live and not session.closing:
                    async with self._limiter:
                        if (
                            entry.live
                            and not scope.cancel_called
                            and anyio.current_time() >= self._paused_until
                        ):
                            answered = await self._poll(entry)
        finally:  # synchronous: also runs when the driver's group is cancelled
            entry.scope, entry.polling, entry.fetching = None, False, False
            session.discard(entry)
            if entry.live:
                if not answered:  # cancelled or paused before an answer: due again now
                    entry.next_at = min(entry.next_at, anyio.current_time())
                self._schedule(entry)

    async def _poll(self, entry: _Entry) -> bool:
        """Send one GET and apply its answer; ``False`` if the entry left meanwhile."""
        stats = self._stats
        entry.fetching = True
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
            entry.fetching = False
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
        entry.last, entry.errors = result, 0
        if first and entry.submitted_at is not None:
            if entry.plan == "probe":
                if not status.is_terminal:
                    if eta is not None:
                        learner.eta_supported = True
                        self._sample(entry, now - entry.submitted_at + eta)
                    elif learner.eta_supported is None:
                        learner.eta_supported = False
                elif status is TaskStatus.SUCCEED:
                    stamped = learner.from_timestamps(result, entry.submitted_at)
                    self._sample(entry, sent - entry.submitted_at if stamped is None else stamped)
                self._settle_probe(entry)
            elif entry.plan != "now" and status is not TaskStatus.FAILED:
                if status.is_terminal:
                    stats.first_poll_hits += 1
                else:
                    stats.first_poll_misses += 1
        if status.is_terminal:
            if status is TaskStatus.SUCCEED and not entry.sampled:
                stamped = learner.from_timestamps(result, entry.submitted_at)
                if stamped is not None:
                    self._sample(entry, stamped)
            self._finish(entry, result=result)
            return
        delay: float | None
        if eta is not None:
            delay = eta + policy.eta_margin
            entry.backoff = policy.backoff_initial
        else:  # no eta: what slower tasks took, or back off
            delay = self._learned_delay(entry, now)
            if delay is None:
                delay = entry.backoff
                entry.backoff = min(entry.backoff * policy.backoff_factor, policy.max_interval)
        entry.next_at = now + min(max(delay, policy.min_interval), policy.max_interval)

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

    def _error_delay(self, entry: _Entry) -> float:
        policy = self.policy
        entry.errors += 1
        delay = policy.backoff_initial * policy.backoff_factor ** min(entry.errors - 1, 64)
        return min(max(delay, policy.min_interval), policy.max_interval)

    def _sample(self, entry: _Entry, seconds: float) -> None:
        entry.sampled = True
        if self._learner.add(seconds, entry.cost, self._stats):
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
        for waiter in entry.waiters:
            waiter.wake.set()

    def _forget(self, entry: _Entry) -> None:
        entry.heap_seq = -1  # its heap items are stale now
        if self._entries.get(entry.task_id) is entry:
            del self._entries[entry.task_id]
            self._stats.polls_by_task.pop(entry.task_id, None)
