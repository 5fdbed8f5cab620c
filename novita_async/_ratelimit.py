"""A weighted, adaptive rate limiter for paid submissions.

Novita's quota counts *images* per minute (a txt2img request with ``image_num=8``
uses 8 of the default 20), so each admission carries a weight. The limiter keeps
a log of admissions over a sliding 60 s window and admits new work only while the
window's total stays within the limit. That is never more than the quota in any
60 s span, which also satisfies a fixed-minute or a token-bucket counter on the
server side. ``burst`` optionally smooths admissions (a token bucket refilled at
the same rate) for servers that count over shorter spans.

On a 429 the caller reports :meth:`WeightedRateLimiter.on_rate_limited`: the
refused admission is refunded and everyone pauses (``Retry-After`` if given, else
one image's share of the window). The limit drops at most once per slow-down
period, not once per refused answer:

* it drops from unlimited to the number of images Novita accepted just before the
  refusal (Novita's default 20 if none), otherwise to half (never below
  ``min_per_minute``);
* a 429 does not lower it again if it refuses work admitted before the last
  slow-down, or arrives before that slow-down's *hold-off* ends: the end of the
  pause it caused plus one ``recovery_period``. So a storm of refusals (one
  overshoot, or a burst of transient 429s and their retries) costs one slow-down
  per Retry-After period, not one per answer.

Recovery is quick once answers are clean: every ``recovery_period`` (default 5 s)
without a 429, counted from the end of the last pause, doubles the limit, up to
the configured ``per_minute``. An unpaced limiter (``per_minute=None``) becomes
unpaced again after ``UNPACE_AFTER`` clean periods (20 s by default). A limit
that is really too high meets its next 429 within a period or two and halves
again, so the rate hunts around the real quota; refused work is refunded and
costs nothing but the retry.

Waiters are served first come, first served, so a heavy request is never starved
by light ones. Time is ``anyio.current_time()`` (trio's ``MockClock`` works).
"""

from __future__ import annotations

import math
from collections import deque

import anyio
import anyio.lowlevel

__all__ = ["Admission", "WeightedRateLimiter"]

#: Length of the quota window, in seconds.
WINDOW = 60.0
#: Novita's default txt2img quota (images per minute): the first guess when a 429
#: arrives before anything was accepted.
DEFAULT_QUOTA = 20.0
#: Clean recovery periods after which an unpaced limiter is unpaced again.
UNPACE_AFTER = 4


class Admission:
    """One admitted unit of work; hand it back to :meth:`~WeightedRateLimiter.on_rate_limited`."""

    __slots__ = ("at", "refunded", "seq", "weight")

    def __init__(self, at: float, weight: float, seq: int) -> None:
        self.at = at
        self.weight = weight
        self.seq = seq
        self.refunded = False

    def __repr__(self) -> str:
        return f"<Admission #{self.seq} weight={self.weight:g} at={self.at:.3f}>"


class WeightedRateLimiter:
    """Admit weighted work (images) at most ``per_minute`` per sliding minute.

    ``per_minute=None`` admits everything until the first 429 and adapts from
    there. Share one instance between batches (``images_per_minute=limiter``)
    to keep them within one account-wide quota.
    """

    def __init__(
        self,
        per_minute: float | None = None,
        *,
        burst: float | None = None,
        min_per_minute: float = 1.0,
        recovery_period: float = 5.0,
        max_pause: float = 60.0,
    ) -> None:
        for name, value in (("per_minute", per_minute), ("burst", burst)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        if not min_per_minute > 0:
            raise ValueError(f"min_per_minute must be > 0, got {min_per_minute!r}")
        if not recovery_period > 0 or not max_pause >= 0:
            raise ValueError("recovery_period must be > 0 and max_pause >= 0")
        self._ceiling = per_minute
        self._min = min(min_per_minute, per_minute) if per_minute is not None else min_per_minute
        self._burst = burst
        self._recovery_period = recovery_period
        self._max_pause = max_pause
        # Current (reduced) limit; None = unlimited. Recovery is computed lazily.
        self._limit: float | None = per_minute
        self._quiet_since = 0.0
        self._decrease_seq = -1
        self._hold_until = -math.inf
        self._paused_until = -math.inf
        self._log: deque[Admission] = deque()
        self._total = 0.0
        self._tokens = burst if burst is not None else 0.0
        self._tokens_at: float | None = None
        self._seq = 0
        self._lock = anyio.Lock()
        self._changed = anyio.Event()
        #: 429s reported so far.
        self.rate_limited = 0
        #: Total weight admitted (refunds excluded).
        self.admitted = 0.0

    def __repr__(self) -> str:
        try:
            limit = self.per_minute
        except RuntimeError:  # no event loop running (so no clock): the last limit set
            limit = self._limit
        shown = "unlimited" if limit is None else f"{limit:g}/min"
        return f"<WeightedRateLimiter {shown} rate_limited={self.rate_limited}>"

    # ----------------------------------------------------------------- inspection

    @property
    def per_minute(self) -> float | None:
        """The effective limit now (images per minute; None = unlimited)."""
        return self._limit_at(anyio.current_time())

    @property
    def paused_until(self) -> float:
        """``anyio.current_time()`` until which nobody is admitted (after a 429)."""
        return self._paused_until

    def _limit_at(self, now: float) -> float | None:
        if self._limit is None:
            return None
        if self._ceiling is not None and self._limit >= self._ceiling:
            return self._ceiling
        periods = self._clean_periods(now)
        if self._ceiling is None and periods >= UNPACE_AFTER:
            return None
        limit = self._limit * 2.0 ** min(periods, 60)
        return limit if self._ceiling is None else min(limit, self._ceiling)

    def _clean_periods(self, now: float) -> int:
        period = self._recovery_period
        periods = math.floor(max(now - self._quiet_since, 0.0) / period)
        # Rounding can put the quotient just below a whole number at the very instant a
        # period starts (a waiter woken for it): that period has begun, else the time to
        # the next one (``_next_recovery``) would be 0, which admits at once.
        if self._quiet_since + (periods + 1) * period <= now:
            periods += 1
        return periods

    def _next_recovery(self, now: float) -> float:
        """Seconds until the limit next grows (inf if it cannot grow)."""
        if self._limit is None or (self._ceiling is not None and self._limit >= self._ceiling):
            return math.inf
        if now < self._quiet_since:
            return self._quiet_since - now + self._recovery_period
        step = (self._clean_periods(now) + 1) * self._recovery_period
        return max(self._quiet_since + step - now, 0.0)

    def _purge(self, now: float) -> None:
        log = self._log
        while log and log[0].at <= now - WINDOW:
            entry = log.popleft()
            if not entry.refunded:
                self._total -= entry.weight

    # ----------------------------------------------------------------- admission

    def _delay(self, now: float, weight: float) -> float:
        """Seconds until ``weight`` may be admitted (0 = now)."""
        delay = self._paused_until - now
        limit = self._limit_at(now)
        if limit is None:
            return max(delay, 0.0)
        weight = min(weight, limit)
        self._purge(now)
        if self._total + weight > limit + 1e-9:
            # Wait until enough of the oldest admissions leave the window.
            excess = self._total + weight - limit
            for entry in self._log:
                if not entry.refunded:
                    excess -= entry.weight
                if excess <= 1e-9:
                    delay = max(delay, entry.at + WINDOW - now)
                    break
        if self._burst is not None:
            rate = limit / WINDOW
            need = min(weight, self._burst)
            tokens = self._tokens_now(now, rate)
            if tokens + 1e-9 < need:
                delay = max(delay, (need - tokens) / rate)
        if delay > 0:  # a growing limit may admit sooner: look again when it grows
            pause = max(self._paused_until - now, 0.0)
            delay = min(delay, max(pause, self._next_recovery(now)))
        return max(delay, 0.0)

    def _tokens_now(self, now: float, rate: float) -> float:
        assert self._burst is not None
        if self._tokens_at is None:
            return self._burst
        return min(self._burst, self._tokens + (now - self._tokens_at) * rate)

    async def acquire(self, weight: float = 1) -> Admission:
        """Wait (first come, first served) until ``weight`` images may be sent.

        A weight above the limit is capped to it, so a big request still passes
        once the window is empty. Always checkpoints first: a cancelled caller
        never gets an admission.
        """
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        await anyio.lowlevel.checkpoint_if_cancelled()
        async with self._lock:
            while True:
                now = anyio.current_time()
                delay = self._delay(now, weight)
                if delay <= 0:
                    return self._admit(now, weight)
                changed = self._changed
                with anyio.move_on_after(delay):
                    await changed.wait()

    def _admit(self, now: float, weight: float) -> Admission:
        limit = self._limit_at(now)
        if limit is not None:
            weight = min(weight, limit)
            if self._burst is not None:
                tokens = self._tokens_now(now, limit / WINDOW)
                self._tokens = max(tokens - min(weight, self._burst), 0.0)
                self._tokens_at = now
        self._seq += 1
        admission = Admission(now, weight, self._seq)
        self._log.append(admission)
        self._total += weight
        self.admitted += weight
        self._purge(now)
        return admission

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def refund(self, admission: Admission) -> None:
        """Forget an admission whose work was certainly not counted by the server."""
        if admission.refunded:
            return
        admission.refunded = True
        if admission in self._log:
            self._total -= admission.weight
        self.admitted -= admission.weight
        self._notify()

    def on_rate_limited(
        self, retry_after: float | None = None, admission: Admission | None = None
    ) -> None:
        """Report a 429: refund ``admission``, pause everyone, slow down once per period.

        The limit is lowered only by a refusal of work admitted after the last
        slow-down that arrives after that slow-down's hold-off (its pause plus one
        ``recovery_period``); see the module docstring.
        """
        now = anyio.current_time()
        self.rate_limited += 1
        if admission is not None:
            self.refund(admission)
        current = self._limit_at(now)
        fresh = (admission is None or admission.seq > self._decrease_seq) and (
            now >= self._hold_until
        )
        if fresh:
            if current is None:
                # First 429 while unlimited: what Novita accepted just before is the quota.
                self._purge(now)
                accepted = sum(
                    entry.weight
                    for entry in self._log
                    if not entry.refunded and (admission is None or entry.seq < admission.seq)
                )
                new = max(self._min, accepted if accepted > 0 else DEFAULT_QUOTA)
            else:
                new = max(self._min, current / 2)
            self._limit = new
            self._decrease_seq = self._seq
        else:
            self._limit = current
        limit = self._limit if self._limit is not None else self._min
        pause = retry_after if retry_after is not None else max(1.0, WINDOW / limit)
        pause = min(max(pause, 0.0), self._max_pause)
        self._paused_until = max(self._paused_until, now + pause)
        # Clean time (for recovery) starts when the pause ends.
        self._quiet_since = max(now, self._paused_until)
        if fresh:
            self._hold_until = self._paused_until + self._recovery_period
        self._notify()
