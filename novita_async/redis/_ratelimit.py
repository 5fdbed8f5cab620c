"""One images-per-minute quota and one slow-down shared by every process, kept in Redis.

:class:`RedisRateLimiter` has the interface of :class:`~novita_async.WeightedRateLimiter`
(weight = ``image_num``, a sliding window, optional ``burst`` smoothing, AIMD on 429),
but its log and its slow-down live in Redis and change only inside one Lua script
(EVALSHA), so every process using the same ``key`` on the same Redis shares them.

Scheduling is by reservation: ``acquire`` runs the script once; it reserves the
earliest instant at which the weight fits the window (never before the latest
reservation, nor during a pause) and answers how long to wait. The caller sleeps
that long (on ``anyio.current_time()``), asks once more whether its reservation
still stands (a 429 meanwhile moves every reservation not yet due behind the
pause, in order) and goes. No polling; window arithmetic uses the Redis server's
``TIME``, never local clocks, so machines with skewed clocks agree.

Fairness: first come, first served *by arrival of the reservation at Redis*,
across processes and within one, also for a heavy request among light ones, and
kept when a 429 reschedules. Not fair: who gets to Redis first (network distance,
event-loop load) is outside the limiter; capacity freed by a refund or a cancelled
waiter goes to later reservations, never pulls earlier ones forward; a process
killed while waiting keeps its reservation (capacity unused for one window).

429 handling (the semantics of issue #10): the refused admission is refunded and
everyone pauses (``Retry-After`` if given). The limit drops at most once per pause
period, not once per 429 answer: from unlimited to the number of images accepted
just before (Novita's default 20 if none; that becomes the ceiling), otherwise to
half. Once answers are clean it doubles back every ``recovery_period`` seconds
(default 5 s) up to the ceiling.

``refund`` and ``on_rate_limited`` are synchronous in the interface, so they are
queued in this instance and applied atomically with its next Redis call: the next
``acquire`` (or the next check of a sleeping one), or ``await limiter.flush()``.
Until then only this process knows; call ``flush()`` if no acquire follows soon.

A reservation carries a random token, so that a call whose reply was lost (the script
ran, then the connection dropped) and is sent again gets the same reservation back,
not a second one that would hold capacity nobody uses for a whole window.

Each admission is held for ``window + margin`` seconds: ``margin`` (0.5 s) covers
the difference between the moment of admission and the moment the POST reaches
Novita, which otherwise costs a 429 at window boundaries when requests travel at
uneven speeds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from types import TracebackType

import anyio
import anyio.lowlevel
import attrs

from .._errors import NovitaError
from .._ratelimit import DEFAULT_QUOTA, Admission
from ._common import UNAVAILABLE, RedisConnection, RedisLike, require_asyncio, tagged, text
from ._ratelimit_lua import LIMITER_LUA

__all__ = ["RedisAdmission", "RedisRateLimiter", "RedisUnavailableError"]

logger = logging.getLogger("novita_async.redis")

#: A reservation due within this many seconds counts as due (sleep granularity).
_DUE = 0.002
#: Seconds a cancelled acquire spends (shielded) giving its reservation back.
_CLEANUP_TIMEOUT = 2.0
#: Seconds a reservation's token is kept beyond ``outage_timeout``.
_TOKEN_SLACK = 30.0


class RedisUnavailableError(NovitaError):
    """Redis could not be reached for longer than the limiter's ``outage_timeout``."""


class RedisAdmission(Admission):
    """An :class:`~novita_async._ratelimit.Admission` with its Redis log member."""

    __slots__ = ("member",)

    def __init__(self, at: float, weight: float, seq: int, member: str) -> None:
        super().__init__(at, weight, seq)
        self.member = member


@attrs.frozen
class _Reply:
    wait: float
    member: str
    weight: float
    limit: float | None
    paused: float
    seq: int


class RedisRateLimiter:
    """Admit weighted work at most ``images_per_minute`` per sliding window, across processes.

    Args:
        url_or_client: a ``redis://`` URL (the limiter owns that client: close it
            with :meth:`aclose` or ``async with``) or a ``redis.asyncio.Redis``.
        images_per_minute: the account quota; ``None`` admits everything until the
            first 429 and learns the quota from it (shared with every process).
        burst: optional smoothing: at most this many images at once, refilled at
            the limit's rate.
        key: the Redis key prefix: processes with the same key share one quota.
            Without a ``{hash tag}`` the key is wrapped in one (Redis Cluster).
        window: the quota window in seconds (Novita counts per minute: 60; the
            limit is per window, tests shorten it to run fast).
        margin: extra seconds each admission is held, for the trip to Novita.
        outage_timeout: how long calls wait for an unreachable Redis before
            :class:`RedisUnavailableError`.

    asyncio only (redis-py): calls under trio raise :class:`RuntimeError`.
    """

    def __init__(
        self,
        url_or_client: RedisLike,
        images_per_minute: float | None = None,
        *,
        burst: float | None = None,
        key: str = "novita:ratelimit",
        min_per_minute: float = 1.0,
        recovery_period: float = 5.0,
        max_pause: float = 60.0,
        window: float = 60.0,
        margin: float = 0.5,
        outage_timeout: float = 30.0,
    ) -> None:
        for name, value in (("images_per_minute", images_per_minute), ("burst", burst)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        if not min_per_minute > 0:
            raise ValueError(f"min_per_minute must be > 0, got {min_per_minute!r}")
        if not (recovery_period > 0 and window > 0 and math.isfinite(window)):
            raise ValueError("recovery_period and window must be > 0")
        if not (max_pause >= 0 and margin >= 0 and outage_timeout >= 0):
            raise ValueError("max_pause, margin and outage_timeout must be >= 0")
        self._redis = RedisConnection(url_or_client)
        self.key = key
        parts = ("log", "state", "pending", "tokens", "token_times")
        self._keys = [f"{tagged(key)}:{part}" for part in parts]
        self._script = self._redis.client.register_script(LIMITER_LUA)
        minimum = min(min_per_minute, images_per_minute or min_per_minute)
        self._config = [
            _num(images_per_minute),
            _num(burst),
            _num(minimum),
            _num(recovery_period),
            _num(window),
            _num(margin),
            _num(max_pause),
            _num(DEFAULT_QUOTA),
            _num(_DUE),
            # a token is needed while its call may be sent again: the outage timeout
            _num(outage_timeout + _TOKEN_SLACK),
        ]
        self._max_pause = max_pause
        self._window = window
        self._outage_timeout = outage_timeout
        # Reports not yet in Redis: (kind, local time, retry_after, seq, member).
        self._pending: list[tuple[str, float, float | None, int | None, str]] = []
        self._limit = images_per_minute
        self._paused_until = -math.inf
        #: 429s reported to this instance.
        self.rate_limited = 0
        #: Total weight admitted by this instance (refunds excluded).
        self.admitted = 0.0

    def __repr__(self) -> str:
        shown = "unlimited" if self._limit is None else f"{self._limit:g}/min"
        return (
            f"<RedisRateLimiter {self.key!r} on {self._redis.describe()} {shown} "
            f"rate_limited={self.rate_limited}>"
        )

    async def __aenter__(self) -> RedisRateLimiter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Apply queued reports (best effort) and close the client if the limiter owns it."""
        try:
            if self._pending:
                with anyio.move_on_after(_CLEANUP_TIMEOUT):
                    await self.flush()
        except (RedisUnavailableError, *UNAVAILABLE):
            logger.warning("rate limiter %r: queued reports lost (Redis unreachable)", self.key)
        finally:
            await self._redis.aclose()

    # ----------------------------------------------------------------- inspection

    @property
    def per_minute(self) -> float | None:
        """The shared effective limit as of this instance's last Redis call (None = unlimited)."""
        return self._limit

    @property
    def paused_until(self) -> float:
        """``anyio.current_time()`` until which nobody is admitted (as last seen)."""
        return self._paused_until

    # ----------------------------------------------------------------- admission

    async def acquire(self, weight: float = 1) -> Admission:
        """Wait (first come, first served across processes) until ``weight`` images may go.

        A weight above the limit is capped to it. Always checkpoints first: a
        cancelled caller never gets an admission (its reservation is given back).
        """
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        require_asyncio("RedisRateLimiter")
        await anyio.lowlevel.checkpoint_if_cancelled()
        member = ""
        try:
            reserved = reply = await self._reserve(weight)
            member = reserved.member
            while reply.wait > _DUE:
                await anyio.sleep(reply.wait)
                reply = await self._call("check", member)
                if reply.wait < 0:  # gone: Redis restarted or lost the key; queue again
                    logger.warning("rate limiter %r: reservation lost, queueing again", self.key)
                    member = ""
                    reserved = reply = await self._reserve(weight)
                    member = reserved.member
        except BaseException:
            if member:
                self._pending.append(("refund", 0.0, None, None, member))
            if self._pending:
                with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                    try:
                        await self.flush()
                    except (RedisUnavailableError, *UNAVAILABLE):
                        pass
            raise
        self.admitted += reserved.weight
        return RedisAdmission(anyio.current_time(), reserved.weight, reserved.seq, member)

    async def _reserve(self, weight: float) -> _Reply:
        """Reserve ``weight``; if the caller is cancelled while the script is in flight, the
        reservation it made anyway (Redis runs what it was sent) is queued for refund.

        The script runs in a task of its own, shielded from the caller's cancellation, and a
        cancelled caller waits for its answer (at most ``_CLEANUP_TIMEOUT``) to learn the
        member to give back: otherwise that capacity was lost for a whole window.
        """
        token = secrets.token_hex(8)  # the same on every retry of this one call
        call = asyncio.ensure_future(self._call("reserve", _num(weight), token))
        try:
            return await asyncio.shield(call)
        except BaseException:
            if not call.done():
                with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                    await asyncio.wait([call])
            if not call.done():
                call.cancel()  # Redis too slow to answer: nothing more to do
            elif not call.cancelled() and call.exception() is None:
                self._pending.append(("refund", 0.0, None, None, call.result().member))
            raise

    def refund(self, admission: Admission) -> None:
        """Forget an admission the server certainly did not count (applied at the next call)."""
        if admission.refunded:
            return
        if not isinstance(admission, RedisAdmission):
            raise TypeError("refund() takes an Admission from this limiter's acquire()")
        admission.refunded = True
        self.admitted -= admission.weight
        self._pending.append(("refund", 0.0, None, None, admission.member))

    def on_rate_limited(
        self, retry_after: float | None = None, admission: Admission | None = None
    ) -> None:
        """Report a 429: refund ``admission``, pause everyone, slow down once per pause.

        Queued, like :meth:`refund`; the pause shows in :attr:`paused_until` at once.
        """
        now = anyio.current_time()
        self.rate_limited += 1
        seq = None
        if admission is not None:
            self.refund(admission)
            seq = admission.seq
        if retry_after is not None and not math.isfinite(retry_after):
            retry_after = None
        self._pending.append(("429", now, retry_after, seq, ""))
        pause = retry_after if retry_after is not None else self._window / 60
        self._paused_until = max(self._paused_until, now + min(max(pause, 0), self._max_pause))

    async def flush(self) -> None:
        """Apply the queued refunds and 429 reports now (and refresh ``per_minute``)."""
        require_asyncio("RedisRateLimiter")
        await self._call("peek", "")

    # ----------------------------------------------------------------- Redis

    async def _call(self, op: str, arg: str, token: str = "") -> _Reply:
        deadline: float | None = None
        delay = 0.05
        while True:
            reports, self._pending = self._pending, []
            now = anyio.current_time()
            args: list[str] = [*self._config, str(len(reports))]
            for kind, at, retry_after, admitted_seq, member in reports:
                if kind == "refund":
                    args += ["refund", member, "", ""]
                else:
                    age = _num(max(now - at, 0.0))
                    args += ["429", age, _num(retry_after), _num(admitted_seq)]
            args += [op, arg, token]
            try:
                raw = await self._script(keys=self._keys, args=args)
            except UNAVAILABLE as exc:
                self._pending[:0] = reports  # applying a report twice changes nothing
                now = anyio.current_time()
                if deadline is None:
                    deadline = now + self._outage_timeout
                    logger.warning(
                        "rate limiter %r: Redis unreachable (%s), retrying", self.key, exc
                    )
                if now >= deadline:
                    raise RedisUnavailableError(
                        f"rate limiter {self.key!r}: Redis at {self._redis.describe()} "
                        f"unreachable for {self._outage_timeout:g} s: {exc}"
                    ) from exc
                await anyio.sleep(min(delay, max(deadline - now, 0.0)))
                delay = min(delay * 2, 1.0)
                continue
            except BaseException:
                self._pending[:0] = reports
                raise
            wait, member, weight, limit, paused, last_seq = (text(value) for value in raw)
            self._limit = float(limit) if limit else None
            self._paused_until = anyio.current_time() + float(paused)
            return _Reply(
                wait=float(wait),
                member=member,
                weight=float(weight) if weight else 0.0,
                limit=self._limit,
                paused=float(paused),
                seq=int(member.split(":", 1)[0]) if member else int(last_seq),
            )


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))
