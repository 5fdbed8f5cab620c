"""The shared polling scheduler behind :meth:`AsyncNovita.wait`.

One :class:`PollScheduler` per client holds the table of tracked tasks (one
*entry* per task_id, shared by all its waiters, so two waiters share one poll
sequence), one :class:`anyio.CapacityLimiter` for in-flight polls, one duration
learner and one rate-limit pause.

It owns no background task. Each entry is *driven* by exactly one of its
waiters: that waiter sleeps until the entry is due and polls it in its own task,
so every due task is polled concurrently (up to ``max_concurrent_polls``), the
client works with or without ``async with``, and nothing can outlive its caller.
The other waiters of the entry sleep on an event. When the driver leaves (its
deadline, cancellation) the waiter with the latest deadline takes over at once;
an interrupted poll is simply repeated (GETs are idempotent). When the last
waiter leaves, the entry is dropped: no more polls for it.

Timing of one task (see :class:`PollPolicy`): the first poll comes at
submission + a quantile of the durations learned from finished tasks (Novita's
``debug_info`` timestamps, or the ``eta`` of a few early *probe* polls while
nothing is known yet), scaled by the request's cost when that predicts better;
after an unfinished answer, the server's ``eta``, else the learned durations
of slower tasks, else a backoff.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
import anyio.lowlevel
import attrs

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

    ``polls_by_task`` covers the tasks being tracked right now;
    ``poll_histogram`` maps "polls a finished task needed" to a task count.
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
        self._warmed: anyio.Event | None = None

    @property
    def warm(self) -> bool:
        return len(self.raw) >= self.policy.warmup_samples

    def warmed(self) -> anyio.Event:
        if self._warmed is None:
            self._warmed = anyio.Event()
        return self._warmed

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

    def add(self, seconds: float, cost: float | None, stats: PollStats) -> None:
        if not 0 <= seconds <= _MAX_SECONDS:
            return
        was_warm = self.warm
        self.raw.add(seconds)
        if cost is not None:
            self.per_cost.add(seconds / cost)
            stats.seconds_per_cost_p50 = self.per_cost.quantile(0.5)
        stats.duration_samples += 1
        stats.duration_p50 = self.raw.quantile(0.5)
        if self.warm and not was_warm and self._warmed is not None:
            self._warmed.set()


# --------------------------------------------------------------------------- entries


class _Waiter:
    __slots__ = ("deadline", "wake")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.wake = anyio.Event()


def _deadline(waiter: _Waiter) -> float:
    return waiter.deadline


class _Entry:
    """One tracked task, shared by all its waiters."""

    __slots__ = (
        "answered",
        "backoff",
        "cost",
        "created_at",
        "done",
        "driver",
        "error",
        "errors",
        "last",
        "next_at",
        "plan",
        "polls",
        "result",
        "sampled",
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
        self.driver: _Waiter | None = None
        self.plan: Plan = "now"
        self.next_at = now
        self.polls = 0
        self.answered = False
        self.sampled = False
        self.backoff = backoff
        self.errors = 0
        self.last: TaskResult | None = None
        self.done = False
        self.result: TaskResult | None = None
        self.error: Exception | None = None

    def absorb(self, hint: PollHint, now: float) -> None:
        """Take what ``hint`` knows and this entry does not (for learning)."""
        submitted, cost = hint.submitted_at, hint.cost
        if self.submitted_at is None and submitted is not None and math.isfinite(submitted):
            self.submitted_at = min(submitted, now)
        if self.cost is None and cost is not None and math.isfinite(cost) and cost > 0:
            self.cost = float(cost)


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
    loop (e.g. FastAPI requests); it never spawns a task.
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
        me = _Waiter(now + timeout if timeout is not None else math.inf)
        entry.waiters[me] = None
        if entry.driver is None:
            entry.driver = me
        try:
            with anyio.CancelScope(deadline=me.deadline):
                while not entry.done:
                    if entry.driver is me:
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
        return entry

    def _leave(self, entry: _Entry, me: _Waiter) -> None:
        del entry.waiters[me]
        if entry.driver is me:
            entry.driver = None
            if not entry.done and entry.waiters:
                heir = max(entry.waiters, key=_deadline)
                entry.driver = heir
                heir.wake.set()
        if not entry.waiters and not entry.done:
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

    # ------------------------------------------------------------------ driving

    async def _drive(self, entry: _Entry, me: _Waiter) -> None:
        """Poll ``entry`` whenever due, until it is done or ``me`` hands it over."""
        while not entry.done and entry.driver is me:
            heir = max(entry.waiters, key=_deadline)
            if heir.deadline > me.deadline:  # let the longest-lived waiter drive
                entry.driver = heir
                heir.wake.set()
                return
            due = self._due(entry)
            if due > anyio.current_time():
                await self._sleep(entry, due)
                continue
            async with self._limiter:
                if self._due(entry) > anyio.current_time():
                    continue  # a rate-limit pause began, or the plan moved
                await self._poll(entry)

    def _due(self, entry: _Entry) -> float:
        if entry.polls == 0 and entry.plan in ("cold", "learned") and self._learner.warm:
            # Re-plan a first poll with what was learned since: a cold plan moves
            # either way, a learned one only later (never polls before its plan).
            offset = self._learner.first_poll(entry.cost)
            if offset is not None and entry.submitted_at is not None:
                planned = entry.submitted_at + offset
                if entry.plan == "cold" or planned > entry.next_at:
                    entry.plan, entry.next_at = "learned", planned
        return max(entry.next_at, self._paused_until)

    async def _sleep(self, entry: _Entry, due: float) -> None:
        if entry.plan == "cold" and entry.polls == 0 and not self._learner.warm:
            # Nothing learned yet: wake early if the first samples arrive.
            with anyio.CancelScope(deadline=due):
                await self._learner.warmed().wait()
        else:
            await anyio.sleep_until(due)

    async def _poll(self, entry: _Entry) -> None:
        stats = self._stats
        entry.polls += 1
        stats.polls_total += 1
        stats.polls_by_task[entry.task_id] = entry.polls
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        sent = anyio.current_time()
        try:
            result = await self._fetch(entry.task_id)
        except Exception as exc:  # cancellation is a BaseException: never caught here
            self._on_error(entry, exc)
            return
        finally:
            stats.in_flight -= 1
        self._on_result(entry, result, sent)

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
        self._learner.add(seconds, entry.cost, self._stats)

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
        if self._entries.get(entry.task_id) is entry:
            del self._entries[entry.task_id]
            self._stats.polls_by_task.pop(entry.task_id, None)
