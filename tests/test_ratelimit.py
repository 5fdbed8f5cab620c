"""WeightedRateLimiter: sliding-window image quota, FIFO fairness, 429 slow-down and recovery.

Timing tests run on trio's MockClock (virtual time: a minute of pacing takes no
wall time); the rest run on asyncio and trio.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import trio
from trio.testing import MockClock

from novita_async import Txt2ImgRequest, WeightedRateLimiter
from novita_async._ratelimit import UNPACE_AFTER, WINDOW, Admission


def virtual(fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``fn`` on trio with a virtual clock that jumps whenever everyone sleeps."""
    return trio.run(fn, clock=MockClock(autojump_threshold=0))


def max_window_load(admissions: list[Admission]) -> float:
    """The largest admitted weight inside any half-open 60 s window."""
    best = 0.0
    for first in admissions:
        load = sum(a.weight for a in admissions if first.at <= a.at < first.at + WINDOW)
        best = max(best, load)
    return best


def test_rejects_bad_arguments() -> None:
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            WeightedRateLimiter(bad)
    with pytest.raises(ValueError):
        WeightedRateLimiter(20, burst=0)
    with pytest.raises(ValueError):
        WeightedRateLimiter(20, min_per_minute=0)


def test_repr_works_outside_an_event_loop() -> None:
    """Regression: the repr read the event loop's clock, so ``repr(limiter)`` (a REPL, a
    log line, the Submitter's repr) raised outside a running event loop."""
    limiter = WeightedRateLimiter(20)
    assert repr(limiter) == "<WeightedRateLimiter 20/min rate_limited=0>"
    assert repr(WeightedRateLimiter()) == "<WeightedRateLimiter unlimited rate_limited=0>"


@pytest.mark.anyio
async def test_rejects_bad_weight() -> None:
    limiter = WeightedRateLimiter(20)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            await limiter.acquire(bad)


@pytest.mark.anyio
async def test_unlimited_admits_everything_at_once() -> None:
    limiter = WeightedRateLimiter(None)
    start = anyio.current_time()
    admissions = [await limiter.acquire(8) for _ in range(100)]
    assert [a.seq for a in admissions] == list(range(1, 101))
    assert limiter.admitted == 800
    assert limiter.per_minute is None
    assert anyio.current_time() - start < 5  # no pacing (generous bound, not a timing goal)


def test_images_per_minute_over_a_sliding_window() -> None:
    async def main() -> list[float]:
        limiter = WeightedRateLimiter(20)
        start = trio.current_time()
        return [(await limiter.acquire(1)).at - start for _ in range(50)]

    times = virtual(main)
    assert times[:20] == [0.0] * 20  # the first minute's quota at once
    assert all(t == pytest.approx(60.0) for t in times[20:40])
    assert all(t == pytest.approx(120.0) for t in times[40:])


def test_weight_counts_images_and_heavy_requests_are_not_starved() -> None:
    async def main() -> list[tuple[int, float]]:
        limiter = WeightedRateLimiter(20)
        order: list[tuple[int, float]] = []
        weights = [8, 8, 8, 1, 1, 8, 1]

        async def one(i: int, weight: int) -> None:
            admission = await limiter.acquire(weight)
            order.append((i, admission.at))

        async with trio.open_nursery() as nursery:
            for i, weight in enumerate(weights):
                nursery.start_soon(one, i, weight)
                await trio.sleep(0.001)  # queue them in this order
        return order

    order = virtual(main)
    # first come, first served: the light requests queued behind an 8 wait for it
    assert [i for i, _ in order] == list(range(7))
    at = dict(order)
    assert at[1] - at[0] < 1  # 8 + 8 = 16 <= 20
    assert at[2] - at[0] == pytest.approx(60.0, abs=0.01)  # 24 > 20: the window must slide
    assert at[3] >= at[2]  # a 1 never overtakes the waiting 8


def test_random_weights_never_exceed_the_quota_in_any_minute() -> None:
    rng = random.Random(3)

    async def main() -> list[Admission]:
        limiter = WeightedRateLimiter(20)
        admissions: list[Admission] = []

        async def one(weight: int) -> None:
            admissions.append(await limiter.acquire(weight))

        async with trio.open_nursery() as nursery:
            for _ in range(60):
                nursery.start_soon(one, rng.randint(1, 8))
                await trio.sleep(rng.uniform(0, 5))
        return admissions

    admissions = virtual(main)
    assert len(admissions) == 60
    assert max_window_load(admissions) <= 20


def test_weight_above_the_limit_is_capped_so_it_still_passes() -> None:
    async def main() -> tuple[float, float]:
        limiter = WeightedRateLimiter(5)
        big = await limiter.acquire(8)  # needs the whole window, and gets it
        small = await limiter.acquire(1)
        return big.at, small.at

    big, small = virtual(main)
    assert small - big == pytest.approx(60.0)


def test_burst_smooths_admissions() -> None:
    async def main() -> list[float]:
        limiter = WeightedRateLimiter(20, burst=2)
        start = trio.current_time()
        return [(await limiter.acquire(1)).at - start for _ in range(6)]

    times = virtual(main)
    assert times[:2] == [0.0, 0.0]
    # then one image every 3 s (20/min), instead of the whole quota at once
    assert times[2:] == pytest.approx([3.0, 6.0, 9.0, 12.0])


def test_first_429_when_unlimited_learns_the_quota_then_halves() -> None:
    async def main() -> None:
        limiter = WeightedRateLimiter(None)
        admissions = [await limiter.acquire(1) for _ in range(25)]
        # Novita accepted 20, refused the 21st and (stale) the ones sent with it
        limiter.on_rate_limited(retry_after=2.0, admission=admissions[20])
        assert limiter.per_minute == 20
        assert limiter.paused_until == pytest.approx(trio.current_time() + 2.0)
        for stale in admissions[21:]:
            limiter.on_rate_limited(retry_after=2.0, admission=stale)
        assert limiter.per_minute == 20  # one overshoot counts once
        assert limiter.rate_limited == 5
        assert limiter.admitted == 20  # refused work was refunded
        # clean time counts from the end of the pause (t=2): the limit doubles at t=7
        later = await limiter.acquire(1)
        assert trio.current_time() == pytest.approx(7.0)  # woke when the limit grew
        assert limiter.per_minute == 40
        await trio.sleep(1)  # t=8: past the hold-off (pause end 2 + recovery_period 5)
        assert limiter.per_minute == 40
        limiter.on_rate_limited(admission=later)  # fresh work, after the hold-off: halves
        assert limiter.per_minute == 20

    virtual(main)


def test_429_pauses_everyone_until_retry_after() -> None:
    async def main() -> float:
        limiter = WeightedRateLimiter(1000)
        first = await limiter.acquire(1)
        limiter.on_rate_limited(retry_after=7.0, admission=first)
        return (await limiter.acquire(1)).at - first.at

    assert virtual(main) == pytest.approx(7.0)


def test_recovers_by_doubling_per_clean_period_up_to_the_configured_rate() -> None:
    async def main() -> None:
        limiter = WeightedRateLimiter(80, recovery_period=5.0)
        limiter.on_rate_limited(retry_after=0)
        assert limiter.per_minute == 40
        await trio.sleep(4.9)
        assert limiter.per_minute == 40
        await trio.sleep(0.2)
        assert limiter.per_minute == 80  # doubled after one clean period; never above 80
        await trio.sleep(60)
        assert limiter.per_minute == 80
        floored = WeightedRateLimiter(10, min_per_minute=8)
        floored.on_rate_limited(retry_after=0)
        assert floored.per_minute == 8  # the floor

    virtual(main)


def test_slowed_down_limiter_paces_at_the_new_rate() -> None:
    async def main() -> list[Admission]:
        limiter = WeightedRateLimiter(20, recovery_period=3600)
        limiter.on_rate_limited(retry_after=0)  # 10/min now (and for the next hour)
        return [await limiter.acquire(1) for _ in range(30)]

    admissions = virtual(main)
    assert max_window_load(admissions) <= 10
    assert admissions[-1].at >= 120


def test_a_waiter_woken_at_a_recovery_boundary_still_waits_for_the_window() -> None:
    """Regression: a waiter for a full window wakes at each recovery period's start; where
    rounding put that instant a hair before the start ((33.3 - 13.3) / 5 < 4), the time to
    the next period came out as 0, which means "admit now": 10 images went in one minute
    of a 4/min limiter, everyone queued at once."""

    async def main() -> list[Admission]:
        await trio.sleep(13.3)
        limiter = WeightedRateLimiter(4, recovery_period=5.0)
        limiter.on_rate_limited(retry_after=0)  # 2/min, 4/min again after a clean period
        return [await limiter.acquire(1) for _ in range(12)]

    admissions = virtual(main)
    assert max_window_load(admissions) <= 4


def test_cancelled_waiter_gets_nothing_and_blocks_nobody() -> None:
    async def main() -> None:
        limiter = WeightedRateLimiter(2)
        await limiter.acquire(2)  # the window is full for 60 s
        with trio.move_on_after(10) as scope:
            await limiter.acquire(1)
        assert scope.cancelled_caught
        assert limiter.admitted == 2
        nxt = await limiter.acquire(1)
        assert nxt.at == pytest.approx(60.0)

    virtual(main)


@pytest.mark.anyio
async def test_acquire_in_a_cancelled_scope_never_admits() -> None:
    limiter = WeightedRateLimiter(None)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await limiter.acquire(1)
    assert scope.cancelled_caught
    assert limiter.admitted == 0


@pytest.mark.anyio
async def test_refund_frees_the_window() -> None:
    limiter = WeightedRateLimiter(2)
    first = await limiter.acquire(2)
    limiter.refund(first)
    limiter.refund(first)  # idempotent
    with anyio.fail_after(5):
        await limiter.acquire(2)  # would wait a minute without the refund
    assert limiter.admitted == 2


# --------------------------------------------------------------------------- 429 storms (#10)


def test_429s_within_the_hold_off_lower_the_limit_once() -> None:
    async def main() -> None:
        limiter = WeightedRateLimiter(100, recovery_period=5.0)
        first = await limiter.acquire(1)
        limiter.on_rate_limited(retry_after=1.0, admission=first)
        assert limiter.per_minute == 50
        await trio.sleep(1.5)  # the pause is over; the retries go out and are refused again
        for _ in range(3):  # at t = 1.5, 2.9, 4.3: each waits for the pause of the one before
            retry = await limiter.acquire(1)
            assert trio.current_time() < 1.0 + 5.0  # the hold-off: pause end + recovery_period
            limiter.on_rate_limited(retry_after=1.0, admission=retry)
            assert limiter.per_minute == 50  # no new slow-down
            await trio.sleep(0.4)
        assert limiter.rate_limited == 4
        # answers are clean from here on: back to the configured rate within seconds
        await trio.sleep(limiter.paused_until - trio.current_time() + 5.0)
        assert limiter.per_minute == 100
        # a 429 after the hold-off is a new slow-down
        late = await limiter.acquire(1)
        limiter.on_rate_limited(retry_after=1.0, admission=late)
        assert limiter.per_minute == 50

    virtual(main)


def test_unpaced_limiter_is_unpaced_again_after_a_clean_stretch() -> None:
    async def main() -> None:
        limiter = WeightedRateLimiter(None, recovery_period=5.0)
        limiter.on_rate_limited(retry_after=2.0)
        assert limiter.per_minute == 20
        await trio.sleep(2.0 + 5.0 * UNPACE_AFTER - 0.1)
        assert limiter.per_minute == 20 * 2 ** (UNPACE_AFTER - 1)
        await trio.sleep(0.2)
        assert limiter.per_minute is None

    virtual(main)


def test_200_prompts_after_20_transient_429s_keep_their_pace() -> None:
    """Regression: twenty transient 429s drove an unpaced limiter to 1 image/min, and 200
    prompts took 861 s instead of under a second."""
    prompts, transient, concurrency = 200, 20, 8

    async def main() -> tuple[float, float | None]:
        limiter = WeightedRateLimiter(None)
        refusals = transient
        queue = list(range(prompts))
        done: list[int] = []

        async def worker() -> None:
            nonlocal refusals
            while queue:
                prompt = queue.pop()
                while True:
                    admission = await limiter.acquire(1)
                    await trio.sleep(0.02)  # the POST's round trip
                    if refusals > 0:  # the server's hiccup: the next 20 POSTs get a 429
                        refusals -= 1
                        limiter.on_rate_limited(retry_after=1.0, admission=admission)
                        continue
                    done.append(prompt)
                    break

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        assert sorted(done) == list(range(prompts))
        elapsed = trio.current_time() - start
        await trio.sleep(5.0 * UNPACE_AFTER)
        return elapsed, limiter.per_minute

    elapsed, after = virtual(main)
    # 861 s before the fix; now seconds of pauses and recovery: 23-34 s over 100 runs, as
    # trio's random scheduling order changes which POSTs meet the 429s (30 s was flaky).
    assert elapsed < 60
    assert after is None  # and the limiter is unpaced again


# --------------------------------------------------------------------------- the Submitter


@pytest.mark.anyio
async def test_a_journal_failing_before_the_post_refunds_its_admission(tmp_path: Any) -> None:
    """Regression: when the journal failed to record ``submitting`` (so nothing was sent),
    the admission stayed taken: a limiter shared with other runs (the client's) lost the
    prompt's images for a minute, though the Submitter's rule is "never sent: refunded"."""
    from novita_async._journal import as_async_journal
    from novita_async.testing import NovitaEmulator

    inner, _ = as_async_journal(tmp_path / "batch.db")

    class FailsOnSubmitting:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        async def mark_submitting(self, index: int) -> None:
            raise OSError("disk full")

    emu = NovitaEmulator(durations=0.01)
    limiter = WeightedRateLimiter(20)
    with anyio.fail_after(10):
        async with emu.client(rate_limiter=limiter) as client:
            with pytest.raises(Exception, match="disk full"):
                await client.txt2img_all(
                    [Txt2ImgRequest(model_name="m.safetensors", prompt="a cat", image_num=4)],
                    journal=FailsOnSubmitting(),  # type: ignore[arg-type]
                )
    assert emu.submissions == 0
    assert limiter.admitted == 0
