"""How long tasks take: the duration learner behind the poll scheduler.

The scheduler feeds it one sample per finished task (submission to completion on
the local clock, from Novita's ``debug_info`` timestamps or from a probe's
``eta``) and asks it when to poll a task first and, after an unfinished answer
without ``eta``, when to poll next. It keeps two bounded windows (seconds, and
seconds per unit of request cost) and predicts with the one whose relative
spread is smaller. :class:`Peers` holds a finished task's duration back until
(nearly) every task submitted before it has finished too, so a burst's first
finishers do not pass for all its durations. Pure computation: no I/O, no clock
of its own.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque

from ._results import TaskResult

__all__ = ["MAX_SECONDS", "Learner", "Peers", "Window"]

#: The latency guard keeps this fraction of first polls at most ``latency_budget`` late.
_GUARD_QUANTILE = 0.05
#: A task slower than this fraction of the samples is polled with a plain backoff.
_TAIL = 0.98
#: Extrapolation beyond the samples uses the mean of this many edge spacings.
_EDGE_SPACINGS = 3
#: The cost model must cut the relative spread of durations below this fraction of the raw one.
_COST_MODEL_GAIN = 0.8
#: A duration is learnt once at most this fraction of the running tasks are older.
_STRAGGLERS = 0.02
#: Longest duration / eta taken at face value (larger ones are not seconds).
MAX_SECONDS = 86_400.0
#: Recent ``server submit time - local submit time`` values (server clock offset).
_CLOCK_SAMPLES = 32
#: A server-stamped duration may exceed what was observed locally by this much (jitter).
_CLOCK_TOLERANCE = 0.05


def _stderr(q: float, n: int) -> float:
    """Standard error of an empirical ``q``-quantile's coverage from ``n`` samples."""
    return math.sqrt(q * (1 - q) / n)


class Window:
    """The last ``size`` samples of one quantity, also kept sorted (for quantiles)."""

    __slots__ = ("_floor", "_sorted", "_values")

    def __init__(self, size: int, *, floor: float = 0.0) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._sorted: list[float] = []
        self._floor = floor  # extrapolation below the samples stops here

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
            return max(self._floor, ordered[0] + pos * (ordered[k] - ordered[0]) / k)
        if pos > last:
            return ordered[last] + (pos - last) * (ordered[last] - ordered[last - k]) / k
        i = int(pos)
        if i == last:
            return ordered[last]
        return ordered[i] + (ordered[i + 1] - ordered[i]) * (pos - i)

    def fraction_below(self, value: float) -> float:
        """Empirical CDF at ``value`` (plotting positions, as :meth:`quantile`)."""
        return bisect.bisect_right(self._sorted, value) / (len(self._sorted) + 1)

    def replace(self, values: list[float]) -> None:
        """Hold exactly ``values`` (the newest last)."""
        self._values.clear()
        self._values.extend(values)
        self._sorted = sorted(self._values)


class _Model:
    """One way to predict a duration: ``shift + scale * quantile of window``."""

    __slots__ = ("scale", "shift", "window")

    def __init__(self, window: Window, scale: float, shift: float) -> None:
        self.window, self.scale, self.shift = window, scale, shift

    def at(self, q: float) -> float:
        return self.shift + self.scale * self.window.quantile(q)

    def done_by(self, seconds: float) -> float:
        return self.window.fraction_below((seconds - self.shift) / self.scale)


class Learner:
    """Learns how long tasks take, from submission to completion (local clock).

    Samples come from Novita's ``debug_info`` timestamps of finished tasks
    (shifted onto the local clock by the smallest recent offset between the two
    clocks, so the submission lag is included) or from the ``eta`` of probe
    polls. Three models compete, and for each request the one whose
    prediction interval is narrowest at its cost predicts:

    * ``raw``: the durations themselves (cost tells nothing);
    * ``per_cost``: seconds per unit of cost (time proportional to the work);
    * ``affine``: ``a + b * cost`` fitted by least squares, plus the quantiles of
      the residuals (a fixed part, model load, VAE, upload, queueing, plus a
      per-cost part: what real GPUs do).

    Memory is bounded by the windows; the affine fit is redone every few samples.
    """

    def __init__(
        self,
        *,
        window: int,
        warmup: int,
        quantile: float,
        latency_budget: float | None,
    ) -> None:
        self.warmup = warmup
        self.quantile = quantile
        self.latency_budget = latency_budget
        self.raw = Window(window)
        self.per_cost = Window(window)
        self._pairs: deque[tuple[float, float]] = deque(maxlen=window)  # (cost, seconds)
        self._residuals = Window(window, floor=-math.inf)
        self._line: tuple[float, float] | None = None  # (intercept, slope) of the affine fit
        self._unfitted = 0
        #: What :meth:`early` fits to the pairs (line, its lowest and highest residual,
        #: dearest cost), until the next pair.
        self._early_fit: tuple[tuple[float, float] | None, float, float, float] | None = None
        self._offsets: deque[float] = deque(maxlen=_CLOCK_SAMPLES)
        self.probes_out = 0
        self.eta_supported: bool | None = None

    @property
    def warm(self) -> bool:
        return len(self.raw) >= self.warmup

    def _model(self, cost: float | None) -> tuple[_Model, float, float]:
        """(model, low quantile, high quantile) that predict a task of ``cost``.

        Quantiles are widened by one standard error while samples are few. A
        cost model must beat the raw durations' interval by a clear margin.
        """
        n = len(self.raw)
        hi = min(0.99, self.quantile + _stderr(self.quantile, n))
        lo = max(0.0, _GUARD_QUANTILE - _stderr(_GUARD_QUANTILE, n))
        best = _Model(self.raw, 1.0, 0.0)
        if cost is None:
            return best, lo, hi
        width = _COST_MODEL_GAIN * (best.at(hi) - best.at(lo))
        candidates = []
        if len(self.per_cost) >= self.warmup:
            candidates.append(_Model(self.per_cost, cost, 0.0))
        if self._line is not None:
            intercept, slope = self._line
            candidates.append(_Model(self._residuals, 1.0, intercept + slope * cost))
        for model in candidates:
            if model.at(hi) - model.at(lo) < width:
                best, width = model, model.at(hi) - model.at(lo)
        return best, lo, hi

    def first_poll(self, cost: float | None) -> float | None:
        """Seconds after submission to poll first, or ``None`` while nothing is known.

        The ``first_poll_quantile`` of the durations, but at most
        ``latency_budget`` after their 5 % quantile.
        """
        if not self.warm:
            return None
        model, lo, hi = self._model(cost)
        offset = model.at(hi)
        if self.latency_budget is not None:
            offset = min(offset, model.at(lo) + self.latency_budget)
        return max(offset, 0.0)

    def next_poll(self, elapsed: float, cost: float | None, *, tail: bool = True) -> float | None:
        """After an unfinished answer without eta, ``elapsed`` s after submission:
        seconds after submission to poll next, from the durations of the tasks
        that took longer: their ``first_poll_quantile``, but at most
        ``latency_budget`` after their 5 % quantile (and after now). Slower than
        almost every sample: the end of the samples (extrapolated by one spacing)
        with ``tail``, ``None`` once past it (and when nothing is known). A task
        polled before the learner was warm passes ``tail=False``: the first
        samples are the tasks that finished first, so their end is no end.
        """
        if not self.warm:
            return None
        model, _, _ = self._model(cost)
        done = model.done_by(elapsed)
        end = model.at(1.0)
        # Slower than nearly every sample (or past their end, which with fewer than 49
        # samples is below the 98 %): once more at their end, if ahead.
        if done >= _TAIL or elapsed >= end:
            return end if tail and end > elapsed else None
        offset = model.at(done + (1 - done) * self.quantile)
        if self.latency_budget is not None:
            soonest = max(model.at(done + (1 - done) * _GUARD_QUANTILE), elapsed)
            offset = min(offset, soonest + self.latency_budget)
        return offset

    def early(self, cost: float | None = None, *, scales: bool = False) -> float | None:
        """The 5 % quantile of the durations known (``None`` before any): the first
        finishers, what a cold first poll goes by until the learner is warm.

        For a task of ``cost``, at least the 5 % quantile of seconds per cost times
        that cost, or the first finishers' line at that cost plus their smallest
        residual if lower (a fixed part makes seconds per cost overstate dear
        tasks). Unless ``scales`` (durations seen to grow with cost), the cost is
        capped at the largest one sampled: durations unrelated to cost must not put
        a dear task's first poll late. With ``scales`` and a line: the line at the
        task's cost plus the first finishers' *largest* residual. They are the
        fastest k of their cohort, so that is about the k/n quantile of what the
        line leaves unexplained, where the smallest is only the fastest task's
        (with a fixed part that varies from task to task, most first polls came
        before the task's end).
        """
        if not len(self.raw):
            return None
        early = self.raw.quantile(_GUARD_QUANTILE)
        pairs = self._pairs
        if cost is None or not pairs:
            return early
        if self._early_fit is None:  # once per pair learnt, not per cold task
            line = _least_squares(pairs)
            residuals = [0.0] if line is None else [s - line[0] - line[1] * c for c, s in pairs]
            self._early_fit = (line, min(residuals), max(residuals), max(c for c, _ in pairs))
        line, lowest, highest, dearest = self._early_fit
        if scales and line is not None:
            return max(early, line[0] + line[1] * cost + highest)
        cost = cost if scales else min(cost, dearest)
        scaled = self.per_cost.quantile(_GUARD_QUANTILE) * cost
        if line is not None:
            scaled = min(scaled, line[0] + line[1] * cost + lowest)
        return max(early, scaled)

    def wants_probe(self) -> bool:
        return self.eta_supported is not False and self.probes_out + len(self.raw) < self.warmup

    def from_timestamps(
        self, result: TaskResult, submitted_at: float | None, observed: float | None = None
    ) -> float | None:
        """Submission-to-completion seconds from the server's timestamps, if any.

        ``observed``: seconds from submission to the answer that showed the task
        finished. The server's clock is not trusted beyond what was seen: a
        duration longer than that (or negative) is not a sample.
        """
        info = result.extra.debug_info
        if info is None or not info.submit_time_ms or not info.complete_time_ms:
            return None
        try:
            submitted = info.submit_time_ms / 1000
            duration = info.complete_time_ms / 1000 - submitted
        except OverflowError:  # an int beyond any float: no epoch milliseconds
            return None
        if not 0 <= duration <= MAX_SECONDS:
            return None
        if submitted_at is not None:
            self._offsets.append(submitted - submitted_at)
            duration += self._offsets[-1] - min(self._offsets)
        if observed is not None and duration > observed + _CLOCK_TOLERANCE:
            return None
        return duration

    def local(self, stamp_ms: int | None) -> float | None:
        """A server stamp (epoch milliseconds) on the local clock, by the smallest
        recent offset between the clocks; ``None`` before any offset is known."""
        if not stamp_ms or not self._offsets:
            return None
        try:
            return stamp_ms / 1000 - min(self._offsets)
        except OverflowError:  # an int beyond any float: no epoch milliseconds
            return None

    def add(self, seconds: float, cost: float | None) -> bool:
        """Learn one duration; ``True`` when it made the learner warm."""
        if not 0 <= seconds <= MAX_SECONDS:
            return False
        was_warm = self.warm
        self.raw.add(seconds)
        if cost is not None:
            self.per_cost.add(seconds / cost)
            self._pairs.append((cost, seconds))
            self._early_fit = None
            self._unfitted += 1
            if self._unfitted >= (1 if len(self._pairs) < 64 else 8):
                self._fit()
        return self.warm and not was_warm

    def _fit(self) -> None:
        """Least squares ``seconds = a + b * cost``; kept only with a slope >= 0 fitted on
        costs that vary, and then the residuals of every pair."""
        self._unfitted = 0
        pairs = self._pairs
        if len(pairs) < self.warmup:
            return
        self._line = _least_squares(pairs)
        if self._line is not None:
            intercept, slope = self._line
            self._residuals.replace([s - intercept - slope * c for c, s in pairs])


def _least_squares(pairs: deque[tuple[float, float]]) -> tuple[float, float] | None:
    """(intercept, slope) of ``seconds = a + b * cost`` over (cost, seconds) pairs; ``None``
    when costs barely vary (no slope to learn) or the slope is negative."""
    n = len(pairs)
    if n < 2:
        return None
    mean_c = sum(c for c, _ in pairs) / n
    mean_s = sum(s for _, s in pairs) / n
    var_c = sum((c - mean_c) ** 2 for c, _ in pairs)
    if var_c <= (0.05 * mean_c) ** 2 * n:
        return None
    slope = sum((c - mean_c) * (s - mean_s) for c, s in pairs) / var_c
    if slope < 0:
        return None
    return mean_s - slope * mean_c, slope


class Peers:
    """The running tasks' submission times, and durations held back until (nearly)
    every task submitted before theirs has finished too.

    A burst's first durations are its fastest tasks': learnt as they come, they
    would make every task still running look slower than all of them (the
    samples are censored). So a duration is learnt once at most ``2 %`` of the
    running tasks (at least one) were submitted before it or at the same instant
    (a coarse clock gives a burst's tasks one timestamp: Windows' before Python
    3.13 ticks every 15.6 ms): what is learnt is whole cohorts, whatever order
    their tasks finished in. At most ``limit`` durations are held (older tasks
    stuck for good must not stop all learning): past that, the oldest is learnt.
    """

    __slots__ = ("_held", "_limit", "_running")

    def __init__(self, limit: int) -> None:
        self._running: list[float] = []  # sorted
        self._held: list[tuple[float, float, float | None]] = []  # heap of (submitted, s, cost)
        self._limit = limit

    def __len__(self) -> int:
        return len(self._running)

    @property
    def held(self) -> int:
        return len(self._held)

    def add(self, submitted: float) -> None:
        bisect.insort(self._running, submitted)

    def as_old(self, submitted: float) -> int:
        """Running tasks submitted at or before ``submitted``."""
        return bisect.bisect_right(self._running, submitted)

    def offer(
        self, submitted: float, seconds: float, cost: float | None
    ) -> list[tuple[float, float | None]]:
        """A finished task's duration: the (seconds, cost) to learn now (it, unless too
        many older tasks still run; or the oldest held, past ``limit``). Its own task,
        still running, does not count."""
        if bisect.bisect_right(self._running, submitted) - 1 <= self._allowance():
            return [(seconds, cost)]
        held = self._held
        heapq.heappush(held, (submitted, seconds, cost))
        if len(held) > self._limit:
            _, seconds, cost = heapq.heappop(held)
            return [(seconds, cost)]
        return []

    def discard(self, submitted: float) -> list[tuple[float, float | None]]:
        """A task stopped running; returns the (seconds, cost) durations it released."""
        running = self._running
        i = bisect.bisect_left(running, submitted)
        if i < len(running) and running[i] == submitted:
            del running[i]
        held, released = self._held, []
        while held and bisect.bisect_right(running, held[0][0]) <= self._allowance():
            _, seconds, cost = heapq.heappop(held)
            released.append((seconds, cost))
        return released

    def _allowance(self) -> int:
        return max(1, int(_STRAGGLERS * len(self._running)))
