"""RedisRateLimiter against a real redis-server: one quota and one slow-down for every
process on a key, FIFO by arrival at Redis, 429s (one slow-down per pause period, quick
recovery), refunds, cancellation, Redis outages, and three OS processes against the
emulator's enforced quota.

Time: short windows keep this module fast. Asserts on time are lower bounds ("not
admitted before the window frees up"), which a slow machine cannot break; upper bounds
are only "within a few seconds" where failing would take ten times longer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import redis.asyncio as aioredis
import trio
from _redis_server import HOLD_REDIS, RedisServer

from novita_async.redis import RedisAdmission, RedisRateLimiter, RedisUnavailableError
from novita_async.testing import NovitaEmulator

WORKER = Path(__file__).with_name("_redis_quota_worker.py")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client is asyncio-only (see test_trio_is_refused_clearly)


def test_rejects_bad_arguments(redis_url: str) -> None:
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            RedisRateLimiter(redis_url, bad)
    for kwargs in ({"burst": 0}, {"min_per_minute": 0}, {"window": 0}, {"margin": -1}):
        with pytest.raises(ValueError):
            RedisRateLimiter(redis_url, 20, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RedisRateLimiter(object(), 20)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_quota_per_window_shared_by_two_clients(redis_url: str, redis_key: str) -> None:
    window = 0.6
    first = RedisRateLimiter(redis_url, 5, key=redis_key, window=window, margin=0)
    second = RedisRateLimiter(redis_url, 5, key=redis_key, window=window, margin=0)
    async with first, second:
        start = anyio.current_time()
        admissions = [await (first if i % 2 else second).acquire(1) for i in range(12)]
        assert [a.seq for a in admissions] == sorted(a.seq for a in admissions)
        assert all(a.at - start >= window for a in admissions[5:])  # the 6th waits a window
        assert all(a.at - start >= 2 * window for a in admissions[10:])
        assert first.admitted + second.admitted == 12
        assert first.per_minute == second.per_minute == 5
        with pytest.raises(ValueError):
            await first.acquire(-1)


@pytest.mark.anyio
async def test_first_come_first_served_a_heavy_request_is_not_starved(
    redis_url: str, redis_key: str
) -> None:
    window = 0.5
    order: list[tuple[str, int]] = []
    async with RedisRateLimiter(redis_url, 4, key=redis_key, window=window, margin=0) as lim:
        await lim.acquire(4)  # the window is full

        async def take(name: str, weight: float) -> None:
            admission = await lim.acquire(weight)
            order.append((name, admission.seq))

        async with anyio.create_task_group() as tg:
            tg.start_soon(take, "heavy", 9)  # capped to the limit (4): a whole window
            await anyio.sleep(0.05)
            for i in range(3):
                tg.start_soon(take, f"light{i}", 1)
                await anyio.sleep(0.01)
    # Reserved in arrival order (the lights share one instant, so they may wake in any order).
    assert [name for name, _ in sorted(order, key=lambda x: x[1])] == [
        "heavy", "light0", "light1", "light2"
    ]  # fmt: skip
    assert order[0][0] == "heavy"
    assert lim.admitted == 4 + 4 + 3


@pytest.mark.anyio
async def test_burst_smooths_admissions(redis_url: str, redis_key: str) -> None:
    window = 1.0
    async with RedisRateLimiter(redis_url, 10, burst=2, key=redis_key, window=window) as lim:
        start = anyio.current_time()
        admissions = [await lim.acquire(1) for _ in range(4)]
    # Two at once, then one per window/10 (the refill rate), not the whole quota at once.
    assert admissions[2].at - start >= window / 10 * 0.99
    assert admissions[3].at - start >= 2 * window / 10 * 0.99


@pytest.mark.anyio
async def test_429s_slow_everyone_down_once_per_pause(redis_url: str, redis_key: str) -> None:
    make = RedisRateLimiter
    options: dict[str, Any] = {"key": redis_key, "window": 1.0, "recovery_period": 60.0}
    async with make(redis_url, 20, **options) as lim, make(redis_url, 20, **options) as other:
        admissions = [await lim.acquire(1) for _ in range(3)]
        for admission in admissions:  # three 429s for one overshoot: one slow-down
            lim.on_rate_limited(0.3, admission)
        assert lim.rate_limited == 3
        assert lim.admitted == 0
        assert lim.paused_until > anyio.current_time()  # known locally before any flush
        await lim.flush()
        assert lim.per_minute == 10
        await other.flush()
        assert other.per_minute == 10  # shared by every process on the key
        start = anyio.current_time()
        late = await other.acquire(1)  # nobody is admitted during the pause
        assert late.at - start >= 0.2
        await anyio.sleep(0.35)  # the pause period is over: a new 429 is a new overshoot
        lim.on_rate_limited(0.3, late)  # refunds an admission of another instance: fine
        lim.on_rate_limited(None, None)
        await lim.flush()
        assert lim.per_minute == 5


@pytest.mark.anyio
async def test_recovery_within_seconds_once_answers_are_clean(
    redis_url: str, redis_key: str
) -> None:
    async with RedisRateLimiter(
        redis_url, 40, key=redis_key, window=1.0, recovery_period=0.2, min_per_minute=3
    ) as lim:
        for _ in range(5):  # five overshoots in a row, each after the previous pause
            lim.on_rate_limited(0.05, await lim.acquire(1))
            await lim.flush()
            assert lim.per_minute is not None
            assert lim.per_minute < 40
            await anyio.sleep(0.06)
        with anyio.fail_after(5):  # 3 -> 40 takes four doublings of 0.2 s
            while lim.per_minute != 40:
                await anyio.sleep(0.1)
                await lim.flush()


@pytest.mark.anyio
async def test_unlimited_learns_the_quota_from_the_first_429(
    redis_url: str, redis_key: str
) -> None:
    async with RedisRateLimiter(redis_url, None, key=redis_key, recovery_period=60) as lim:
        admissions = [await lim.acquire(2) for _ in range(6)]  # 12 images accepted
        assert lim.per_minute is None
        lim.on_rate_limited(0.01, await lim.acquire(2))
        await lim.flush()
        assert lim.per_minute == 12
        assert len(admissions) == 6


@pytest.mark.anyio
async def test_a_429_moves_waiting_reservations_behind_the_pause(
    redis_url: str, redis_key: str
) -> None:
    async with RedisRateLimiter(redis_url, 2, key=redis_key, window=0.5, margin=0) as lim:
        first = await lim.acquire(2)
        start = anyio.current_time()
        waited: list[float] = []

        async def waiter() -> None:
            await lim.acquire(1)  # reserved for ~0.5 s from now
            waited.append(anyio.current_time() - start)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.1)
            lim.on_rate_limited(1.5, first)  # applied by the waiter's own check at ~0.5 s
        assert waited[0] >= 1.5 - 0.1


@pytest.mark.anyio
async def test_refunds_and_cancelled_waiters_give_capacity_back(
    redis_url: str, redis_key: str
) -> None:
    async with RedisRateLimiter(redis_url, 2, key=redis_key, window=30, margin=0) as lim:
        a = await lim.acquire(1)
        await lim.acquire(1)
        with anyio.move_on_after(0.2) as scope:
            await lim.acquire(1)  # would wait 30 s: cancelled, its reservation given back
        assert scope.cancelled_caught
        lim.refund(a)
        lim.refund(a)  # idempotent
        assert lim.admitted == 1
        with anyio.fail_after(5):  # without the refund (or with the cancelled one kept): 30 s
            b = await lim.acquire(1)
        assert isinstance(b, RedisAdmission)
        with pytest.raises(TypeError):
            lim.refund(type(a).__mro__[1](0.0, 1, 1))  # a plain Admission


@pytest.mark.anyio
async def test_an_acquire_cancelled_while_its_reservation_is_in_flight_gives_it_back(
    redis_url: str, redis_key: str
) -> None:
    # Cancelled after its script was sent, before the answer: Redis still runs the script.
    # The reservation it made was kept (its member unknown to the caller): a whole window
    # of capacity lost, although the caller got no admission.
    other = aioredis.Redis.from_url(redis_url)
    try:
        async with RedisRateLimiter(redis_url, 1, key=redis_key, window=30, margin=0) as lim:
            await lim.flush()  # script loaded, connection open
            async with anyio.create_task_group() as tg:
                tg.start_soon(other.eval, HOLD_REDIS, 0, "0.5")  # type: ignore[arg-type]
                await anyio.sleep(0.1)
                with anyio.move_on_after(0.1) as scope:
                    await lim.acquire(1)  # sent, answered only once Redis is free again
                assert scope.cancelled_caught
            with anyio.fail_after(5):  # with the reservation kept: 30 s
                await lim.acquire(1)
    finally:
        await other.aclose()


@pytest.mark.anyio
async def test_redis_outage_waits_then_raises_and_a_lost_reservation_is_renewed(
    tmp_path: Path, redis_key: str
) -> None:
    server = RedisServer(tmp_path / "r")  # nothing persisted: a restart forgets everything
    server.start()
    try:
        async with RedisRateLimiter(
            server.url, 1, key=redis_key, window=1.0, margin=0, outage_timeout=0.3
        ) as lim:
            await lim.acquire(1)
            async with anyio.create_task_group() as tg:
                waited: list[float] = []

                async def waiter() -> None:
                    waited.append((await lim.acquire(1)).at)

                tg.start_soon(waiter)  # reserved for ~1 s from now
                await anyio.sleep(0.2)
                server.restart()  # the reservation is gone: the waiter queues again
            assert len(waited) == 1
            server.stop()
            with pytest.raises(RedisUnavailableError, match=r"unreachable for 0\.3 s"):
                await lim.acquire(1)
    finally:
        server.stop()


class _ReplyDropper:
    """A TCP proxy in front of Redis. Once ``armed``, it passes the next command on but
    drops the reply and the connection: Redis ran the command, the client never heard."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("redis://").split("/")[0].split(":")
        self.upstream = (host, int(port))
        self.armed = False
        self.dropped = 0
        self.url = ""

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self.url = f"redis://127.0.0.1:{port}/0"
        async with listener:
            task_status.started()
            await listener.serve(self._relay)

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        try:
            async with client:
                upstream = await anyio.connect_tcp(*self.upstream)
                async with upstream, anyio.create_task_group() as tg:

                    async def forward() -> None:
                        async for chunk in client:
                            await upstream.send(chunk)
                        tg.cancel_scope.cancel()

                    tg.start_soon(forward)
                    async for chunk in upstream:
                        if self.armed:  # the reply of the command just passed on
                            self.armed = False
                            self.dropped += 1
                            break
                        await client.send(chunk)
                    tg.cancel_scope.cancel()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


@pytest.mark.anyio
async def test_a_reservation_whose_reply_was_lost_is_not_made_twice(
    redis_url: str, redis_key: str
) -> None:
    # Redis ran the reserve, then the connection dropped before its reply: the call is
    # sent again (by redis-py's retries or the limiter's own). Before reservation tokens,
    # the second run reserved again, and the first reservation held the only image of
    # the window (30 s here) for nobody.
    dropper = _ReplyDropper(redis_url)
    async with anyio.create_task_group() as tg:
        await tg.start(dropper.serve)
        async with (
            RedisRateLimiter(dropper.url, 1, key=redis_key, window=30, margin=0) as lim,
            RedisRateLimiter(redis_url, 1, key=redis_key, window=30, margin=0) as other,
        ):
            await lim.flush()  # script loaded, connection open
            dropper.armed = True
            with anyio.fail_after(5):  # a second reservation: due in 30 s
                admission = await lim.acquire(1)
            assert dropper.dropped == 1
            assert lim.admitted == 1
            # One image reserved in the shared log, not two: refunding it frees the window.
            with anyio.move_on_after(0.3) as scope:
                await other.acquire(1)
            assert scope.cancelled_caught  # the quota of 1 is taken
            lim.refund(admission)
            await lim.flush()
            with anyio.fail_after(5):  # with an orphan reservation left: 30 s
                await other.acquire(1)
        tg.cancel_scope.cancel()


def test_trio_is_refused_clearly(redis_url: str) -> None:
    async def main() -> None:
        await RedisRateLimiter(redis_url, 20).acquire(1)

    with pytest.raises(RuntimeError, match=r"needs asyncio.*trio"):
        trio.run(main)


# ------------------------------------------------------------------ three processes, one quota

QUOTA = 12  # images per window
WINDOW = 1.5  # real seconds; the emulator's clock runs SCALE times faster: its minute
SCALE = 60 / WINDOW
WEIGHTS = [1, 2, 3, 2, 1, 3, 2, 2]  # 16 images per process
PROCESSES = 3


@pytest.mark.anyio
async def test_three_processes_share_one_quota_against_the_emulator(
    redis_url: str, redis_key: str
) -> None:
    emu = NovitaEmulator(durations=0.0, clock=lambda: time.monotonic() * SCALE)
    emu.rate_limit(QUOTA)
    async with emu.serve() as server:
        command = [
            sys.executable, str(WORKER), redis_url, redis_key, server.base_url, emu.api_key,
            "--quota", str(QUOTA), "--window", str(WINDOW), "--scale", str(SCALE),
            "--weights", ",".join(map(str, WEIGHTS)), "--concurrency", "3",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
        workers = [spawn(command, env) for _ in range(PROCESSES)]
        try:
            for worker in workers:
                assert json.loads(await readline(worker)) == {"event": "ready"}
            for worker in workers:  # go, all at once
                assert worker.stdin is not None
                worker.stdin.write(b"go\n")
                worker.stdin.close()
            reports = [json.loads(await readline(worker)) for worker in workers]
        finally:
            for worker in workers:
                worker.kill()
                worker.wait()
                assert worker.stdout is not None
                worker.stdout.close()
    images = PROCESSES * sum(WEIGHTS)
    created = sorted(task.created_at for task in emu.tasks.values())
    assert len(created) == PROCESSES * len(WEIGHTS)
    assert sum(r["rate_limited"] for r in reports) == emu.rate_limited
    assert emu.rate_limited <= 3  # a handful at most, in total
    # Pace: what the quota allows for these requests in the order they were admitted.
    in_order = [task.image_num for task in sorted(emu.tasks.values(), key=lambda t: t.created_at)]
    assert sum(in_order) == images
    ideal = fifo_schedule_end(in_order, QUOTA, 60.0)
    assert ideal >= 3 * 60  # several windows
    elapsed = created[-1] - created[0]
    assert elapsed <= 1.35 * ideal, (elapsed, ideal, emu.rate_limited)
    print(f"pace {elapsed / ideal:.3f} x ideal, {emu.rate_limited} 429s")


def fifo_schedule_end(weights: list[int], quota: float, window: float) -> float:
    """When a perfect limiter (no latency, no margin) admits the last of ``weights``,
    first come first served in a sliding window."""
    log: list[tuple[float, int]] = []
    now = 0.0
    for weight in weights:
        while sum(w for at, w in log if at > now - window) + weight > quota:
            now = min(at for at, _ in log if at > now - window) + window
        log.append((now, weight))
    return now


def spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)


async def readline(process: subprocess.Popen[bytes]) -> bytes:
    assert process.stdout is not None
    with anyio.fail_after(60):
        line = await anyio.to_thread.run_sync(process.stdout.readline)
    assert line, f"worker exited with {process.poll()}"
    return line
