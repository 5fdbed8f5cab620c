"""The fan-out (``txt2img_many`` / ``txt2img_all``) against the in-process emulator.

Runs on asyncio and trio (``@pytest.mark.anyio``); rate-limit pacing runs on trio's
MockClock so minutes of quota take no wall time.
"""

from __future__ import annotations

import gc
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.lowlevel
import httpx
import pytest
import trio
from _support import req
from trio.testing import MockClock

from novita_async import (
    APIConnectionError,
    AsyncNovita,
    BadRequestError,
    BatchItem,
    BatchRun,
    InvalidRequestError,
    Journal,
    JournalMismatchError,
    NovitaError,
    PollPolicy,
    RetryPolicy,
    ServerError,
    SubmissionUncertainError,
    TaskFailedError,
    TaskStatus,
    TaskTimeoutError,
    Txt2ImgRequest,
    WeightedRateLimiter,
)
from novita_async._transport import RATE_LIMIT_ATTEMPTS
from novita_async.testing import NovitaEmulator

pytestmark = pytest.mark.anyio

TXT2IMG = "/v3/async/txt2img"
#: Poll quickly: the emulated tasks take tens of milliseconds.
FAST_POLLS = PollPolicy(
    min_interval=0.01,
    max_interval=0.1,
    backoff_initial=0.02,
    first_poll_delay=0.02,
    probe_delay=0.02,
    latency_budget=0.05,
)


def reqs(n: int, prefix: str = "prompt") -> list[Txt2ImgRequest]:
    return [req(f"{prefix} {i}") for i in range(n)]


def by_prompt(slow: float, fast: float = 0.02) -> Any:
    """Durations: prompts containing "slow" take ``slow`` seconds, the others ``fast``."""
    return lambda body: slow if "slow" in body["request"]["prompt"] else fast


class Counting(httpx.AsyncBaseTransport):
    """Counts requests in flight (all, and txt2img POSTs) and POSTs ever sent."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.in_flight = self.max_in_flight = 0
        self.posts_in_flight = self.max_posts_in_flight = 0
        self.posts_sent = 0
        self.refuse_connections = 0  # the next N POSTs fail to connect (never sent)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        post = request.method == "POST" and request.url.path == TXT2IMG
        if post and self.refuse_connections:
            self.refuse_connections -= 1
            raise httpx.ConnectError("emulated connection refused", request=request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if post:
            self.posts_sent += 1
            self.posts_in_flight += 1
            self.max_posts_in_flight = max(self.max_posts_in_flight, self.posts_in_flight)
        try:
            return await self.inner.handle_async_request(request)
        finally:
            self.in_flight -= 1
            if post:
                self.posts_in_flight -= 1

    async def aclose(self) -> None:
        await self.inner.aclose()


def client_for(emu: NovitaEmulator, **kwargs: Any) -> tuple[AsyncNovita, Counting]:
    counting = Counting(emu.transport())
    kwargs.setdefault("poll_policy", FAST_POLLS)
    return emu.client(transport=counting, **kwargs), counting


def assert_no_task_lost(emu: NovitaEmulator, delivered: list[BatchItem], pending: Any) -> None:
    """Every task Novita created is either handed out or listed as pending."""
    handed_out = {item.task_id for item in delivered if item.task_id is not None}
    assert handed_out.isdisjoint(pending)
    assert set(emu.tasks) == handed_out | set(pending)


async def consume(run: BatchRun, *, hosted: bool) -> list[BatchItem]:
    """Iterate ``run`` to the end, inside ``async with`` or bare."""
    if hosted:
        async with run:
            return [item async for item in run]
    return [item async for item in run]


# --------------------------------------------------------------------------- items


async def test_items_arrive_as_they_finish_with_every_field() -> None:
    emu = NovitaEmulator(durations=by_prompt(slow=0.6))
    requests = [req("slow first"), req("fast second"), req("fast third")]
    client, _ = client_for(emu)
    async with client, client.txt2img_many(requests) as run:
        items = [item async for item in run]
    assert [item.index for item in items][-1] == 0  # the slow one, submitted first, ends last
    assert sorted(item.index for item in items) == [0, 1, 2]
    for item in items:
        assert item.ok
        assert item.error is None
        assert not item.from_journal
        assert item.request is requests[item.index]
        assert item.task_id is not None
        assert item.task_id in emu.tasks
        assert item.result is not None
        assert item.result.task_id == item.task_id
        assert item.result.status is TaskStatus.SUCCEED
        assert len(item.result.images) == 1
        assert item.unwrap() is item.result
    assert emu.tasks_created == 3
    assert run.submitted == 3
    assert run.delivered == 3
    assert run.pending_task_ids == ()


async def test_a_failed_prompt_is_an_item_not_an_exception() -> None:
    emu = NovitaEmulator(durations=0.02)
    requests = [req("fine 0"), req("broken [fail]"), req("fine 2")]
    client, _ = client_for(emu)
    async with client:
        items = await client.txt2img_all(requests)
    assert [item.index for item in items] == [0, 1, 2]
    failed = items[1]
    assert not failed.ok
    assert failed.result is None
    assert isinstance(failed.error, TaskFailedError)
    assert failed.error.task_id == failed.task_id
    assert failed.error.reason == "emulated failure"
    with pytest.raises(TaskFailedError):
        failed.unwrap()
    assert items[0].ok
    assert items[2].ok


async def test_invalid_request_becomes_an_error_item() -> None:
    emu = NovitaEmulator(durations=0.02)
    bad = req("see-through", enable_transparent_background=True)  # needs png: no Extra given
    client, counting = client_for(emu)
    async with client:
        items = await client.txt2img_all([req("a"), bad, req("b")])
    assert isinstance(items[1].error, InvalidRequestError)
    assert items[1].task_id is None
    assert items[1].request is bad
    assert items[0].ok
    assert items[2].ok
    assert emu.tasks_created == 2
    assert counting.posts_sent == 2


async def test_wrong_types_raise_at_the_call() -> None:
    emu = NovitaEmulator(durations=0.02)
    client, counting = client_for(emu)
    async with client:
        with pytest.raises(TypeError, match=r"requests\[1\] must be a Txt2ImgRequest, got str"):
            client.txt2img_many(cast(Any, [req("a"), "not a request"]))
        with pytest.raises(TypeError, match="iterable of Txt2ImgRequest"):
            await client.txt2img_all(cast(Any, "a cat"))
        lazy = (x for x in cast(Any, [req("a"), 42]))  # a generator is checked as it is read
        with pytest.raises(TypeError, match="got int"):
            await client.txt2img_all(lazy)
    assert counting.posts_sent <= 1


async def test_rejected_request_is_an_error_item() -> None:
    emu = NovitaEmulator(durations=0.02)
    emu.fail_next("txt2img", status=400, reason="INVALID_REQUEST_BODY")
    client, counting = client_for(emu)
    async with client:
        items = await client.txt2img_all(reqs(3), max_concurrent_submissions=1)
    assert isinstance(items[0].error, BadRequestError)
    assert items[0].task_id is None
    assert items[1].ok
    assert items[2].ok
    assert counting.posts_sent == 3  # a 400 is not retried


async def test_txt2img_all_is_ordered() -> None:
    emu = NovitaEmulator(durations=(0.01, 0.3), seed=4)
    client, _ = client_for(emu)
    async with client:
        items = await client.txt2img_all(reqs(20))
    assert [item.index for item in items] == list(range(20))
    assert all(item.ok for item in items)
    assert len({item.task_id for item in items}) == 20


async def test_timeout_gives_task_timeout_items() -> None:
    emu = NovitaEmulator(durations=by_prompt(slow=30.0))
    client, _ = client_for(emu)
    async with client:
        items = await client.txt2img_all([req("slow"), req("fast")], timeout=0.3)
    assert isinstance(items[0].error, TaskTimeoutError)
    assert items[0].error.task_id == items[0].task_id
    assert items[0].error.timeout == 0.3
    assert items[1].ok


# --------------------------------------------------------------------------- scale, limits


async def test_thousand_task_fan_out() -> None:
    emu = NovitaEmulator(durations=(0.05, 0.2), seed=1)
    client, counting = client_for(emu, poll_policy=PollPolicy())
    seen: list[int] = []
    async with client, client.txt2img_many(reqs(1000), max_concurrent_submissions=8) as run:
        async for item in run:
            assert item.ok, item.error
            seen.append(item.index)
    assert sorted(seen) == list(range(1000))  # every index exactly once
    assert seen != list(range(1000))  # in completion order, not request order
    assert emu.tasks_created == 1000
    assert counting.posts_sent == 1000
    assert counting.max_posts_in_flight <= 8
    assert counting.max_in_flight <= 8 + client.scheduler.max_concurrent_polls


async def test_concurrency_never_exceeds_the_limits() -> None:
    emu = NovitaEmulator(durations=(0.02, 0.1), latency=0.01)
    client, counting = client_for(emu, max_connections=7, max_concurrent_polls=3)
    async with client:
        items = await client.txt2img_all(reqs(100), max_concurrent_submissions=4)
    assert all(item.ok for item in items)
    assert counting.max_posts_in_flight == 4  # reached, never exceeded
    assert counting.max_in_flight <= 7  # fits the connection pool


async def test_submissions_must_fit_the_connection_pool() -> None:
    emu = NovitaEmulator()
    client, _ = client_for(emu, max_connections=20, max_concurrent_polls=16)
    async with client:
        with pytest.raises(ValueError, match="max_connections"):
            client.txt2img_many(reqs(1), max_concurrent_submissions=8)
        assert client.txt2img_many(reqs(1)).max_concurrent_submissions == 4  # default fits
        with pytest.raises(ValueError):
            client.txt2img_many(reqs(1), max_concurrent_submissions=0)


async def test_one_client_shared_by_concurrent_batches() -> None:
    emu = NovitaEmulator(durations=(0.01, 0.05))
    client, counting = client_for(emu)
    shared = WeightedRateLimiter(None)
    results: dict[str, list[BatchItem]] = {}

    async def handler(name: str, n: int) -> None:  # e.g. two FastAPI requests
        results[name] = await client.txt2img_all(reqs(n, name), images_per_minute=shared)

    async with client, anyio.create_task_group() as tg:
        tg.start_soon(handler, "alpha", 30)
        tg.start_soon(handler, "beta", 20)
    assert [i.index for i in results["alpha"]] == list(range(30))
    assert [i.index for i in results["beta"]] == list(range(20))
    assert all(i.request.prompt.startswith("alpha") for i in results["alpha"])
    assert all(i.ok for i in results["alpha"] + results["beta"])
    assert emu.tasks_created == 50
    assert shared.admitted == 50
    assert counting.max_posts_in_flight <= 16


async def test_the_clients_limiter_passed_to_a_run_counts_each_image_once() -> None:
    # The README's "one quota" setup: AsyncNovita(rate_limiter=limiter) and the same
    # limiter as a run's images_per_minute. Each submission must take its weight from it
    # once, not once as the run's limiter and again as the client's.
    emu = NovitaEmulator(durations=0.01)
    limiter = WeightedRateLimiter(20)
    client, _ = client_for(emu, rate_limiter=limiter)
    with anyio.fail_after(10):  # counted twice, the third prompt waited a minute
        async with client:
            items = await client.txt2img_all(
                [req(f"p{i}", image_num=4) for i in range(3)], images_per_minute=limiter
            )
    assert all(item.ok for item in items)
    assert limiter.admitted == 12


# --------------------------------------------------------------------------- 429, 503, uncertain


async def test_429_slows_down_and_retries_without_duplicates() -> None:
    emu = NovitaEmulator(durations=0.02)
    emu.fail_next("txt2img", status=429, retry_after=0.05, times=3)
    client, counting = client_for(emu)
    async with client, client.txt2img_many(reqs(10), images_per_minute=600) as run:
        items = [item async for item in run]
    assert all(item.ok for item in items)
    assert len(items) == 10
    assert emu.tasks_created == 10  # no request paid twice
    assert counting.posts_sent == 13  # the three refusals were sent again
    assert run.limiter.rate_limited == 3
    assert run.limiter.per_minute == 600 / 2  # one slow-down per Retry-After period, not per answer


async def test_first_429_when_unpaced_switches_to_adaptive_pacing() -> None:
    emu = NovitaEmulator(durations=0.02)
    emu.fail_next("txt2img", status=429, retry_after=0.05)
    client, counting = client_for(emu)
    async with client, client.txt2img_many(reqs(10)) as run:
        assert run.limiter.per_minute is None
        items = [item async for item in run]
    assert all(item.ok for item in items)
    assert emu.tasks_created == 10
    assert counting.posts_sent == 11
    assert run.limiter.per_minute == 20  # nothing accepted yet: Novita's default quota


async def test_503_and_connection_failures_are_retried_by_the_batch() -> None:
    emu = NovitaEmulator(durations=0.02)
    emu.fail_next("txt2img", status=503, times=2)
    policy = RetryPolicy(max_retries=4, initial_backoff=0.01)  # 4 failures of one request
    client, counting = client_for(emu, retry_policy=policy)
    counting.refuse_connections = 2
    async with client:
        items = await client.txt2img_all(reqs(4), max_concurrent_submissions=1)
    assert all(item.ok for item in items)
    assert emu.tasks_created == 4
    assert emu.submissions == 6  # 4 + the two 503s; the refused connections never arrived


async def test_503_retries_are_bounded_by_the_retry_policy() -> None:
    emu = NovitaEmulator(durations=0.02)
    emu.fail_next("txt2img", status=503, times=100)
    client, _ = client_for(emu, retry_policy=RetryPolicy(max_retries=2, initial_backoff=0.01))
    async with client:
        items = await client.txt2img_all(reqs(1))
    assert isinstance(items[0].error, ServerError)
    assert items[0].error.status_code == 503
    assert emu.submissions == 3
    assert emu.tasks_created == 0


async def test_rate_limit_errors_bounded() -> None:
    emu = NovitaEmulator(durations=0.02)
    emu.fail_next("txt2img", status=429, retry_after=0, times=1000)
    client, counting = client_for(emu)
    limiter = WeightedRateLimiter(None, max_pause=0)
    async with client:
        items = await client.txt2img_all([req("x")], images_per_minute=limiter)
    assert items[0].error is not None
    assert items[0].task_id is None
    assert counting.posts_sent == RATE_LIMIT_ATTEMPTS  # 429 answers, then an error item
    assert emu.tasks_created == 0


async def test_uncertain_submission_is_an_item_and_never_resent() -> None:
    emu = NovitaEmulator(durations=0.02)
    emu.fail_next("txt2img", reset=True, after_create=True)  # created, answer lost
    client, counting = client_for(emu)
    requests = reqs(5)
    async with client:
        items = await client.txt2img_all(requests, max_concurrent_submissions=1)
    uncertain = [item for item in items if not item.ok]
    assert len(uncertain) == 1
    error = uncertain[0].error
    assert isinstance(error, SubmissionUncertainError)
    assert error.request is requests[uncertain[0].index]
    assert uncertain[0].task_id is None
    assert emu.tasks_created == 5  # one orphan task exists on the server...
    assert counting.posts_sent == 5  # ...and it was not paid for twice


def test_configured_quota_paces_without_any_429() -> None:
    async def main() -> tuple[list[BatchItem], NovitaEmulator, float]:
        emu = NovitaEmulator(durations=(1.0, 3.0), clock=anyio.current_time)
        emu.rate_limit(images_per_minute=20)
        requests = [req(f"p{i}", image_num=1 + i % 4) for i in range(24)]  # 60 images
        async with emu.client(poll_policy=FAST_POLLS) as client:
            start = anyio.current_time()
            items = await client.txt2img_all(requests, images_per_minute=20)
            return items, emu, anyio.current_time() - start

    items, emu, elapsed = trio.run(main, clock=MockClock(autojump_threshold=0))
    assert all(item.ok for item in items)
    assert emu.rate_limited == 0
    assert emu.tasks_created == 24
    assert elapsed >= 120  # 60 images at 20/min: the third minute's share starts at 120 s


def test_tight_durations_take_about_one_poll_and_no_blind_backoff() -> None:
    """Durations proportional to cost within 5 % (a warm client): about one poll per
    task, and a task that misses its first poll slower than nearly every sample is
    polled again at the samples' end, not after a blind 0.5 s backoff."""

    def duration(body: dict[str, Any]) -> float:
        request = body["request"]
        jitter = random.Random(request["prompt"]).uniform(0.95, 1.05)
        return request["steps"] / 20 * jitter  # cost 20 (20 steps at 512x512) per second x 4

    async def main() -> tuple[list[float], float]:
        emu = NovitaEmulator(durations=duration, clock=anyio.current_time, latency=0.005)
        rng = random.Random(4)

        def batch(prefix: str, n: int) -> list[Txt2ImgRequest]:
            return [req(f"{prefix} {i}", steps=rng.choice(range(20, 61, 5))) for i in range(n)]

        lags: list[float] = []
        async with emu.client() as client:
            await client.txt2img_all(batch("warm", 150))
            before = emu.polls_total
            async with client.txt2img_many(batch("measured", 1000)) as run:
                async for item in run:
                    assert item.task_id is not None
                    lags.append(anyio.current_time() - emu.tasks[item.task_id].completed_at)
            return lags, (emu.polls_total - before) / 1000

    lags, polls = trio.run(main, clock=MockClock(autojump_threshold=0))
    lags.sort()
    assert polls <= 1.2
    assert lags[int(0.95 * len(lags))] <= 0.3
    assert lags[-1] <= 0.3  # a second poll 0.2 s (the minimum interval) later, not 0.5 s


def test_a_cold_burst_past_its_first_finishers_is_polled_steadily() -> None:
    """A cold burst of U(1, 3) s tasks without eta. Nothing is polled blindly before the
    probes' first task ends; the first durations (the fastest tasks') are learnt only
    with their older peers', and a task past every sample with hundreds of peers as old
    is polled at a steady pace, not after a backoff growing to 1.1 and 1.7 s (which left
    tasks 1.5 s late, at 3.6 polls): fewer polls than a 1 s loop's 1 + E[ceil(D)] = 3.5,
    and no task a second late."""

    def duration(body: dict[str, Any]) -> float:
        return random.Random(body["request"]["prompt"]).uniform(1.0, 3.0)

    async def main() -> tuple[list[float], float]:
        emu = NovitaEmulator(
            durations=duration, clock=anyio.current_time, latency=0.005, report_eta=False
        )
        lags: list[float] = []
        async with emu.client() as client, client.txt2img_many(reqs(400)) as run:
            async for item in run:
                assert item.task_id is not None
                lags.append(anyio.current_time() - emu.tasks[item.task_id].completed_at)
        return lags, emu.polls_total / 400

    lags, polls = trio.run(main, clock=MockClock(autojump_threshold=0))
    assert len(lags) == 400
    assert polls <= 2.8
    assert max(lags) <= 1.0


def test_a_cold_burst_of_fixed_plus_per_cost_durations_takes_few_polls() -> None:
    """Durations of a fixed part U(0.6, 1.2) s plus a per-cost part, no eta, on a cold
    client: the first polls wait for the probes' first durations, and no task is taken
    for slow because the burst's fastest tasks finished first: about 2.4 polls per task
    (3.2 when the whole burst was polled at a blind first_poll_delay and then went by
    its fastest tasks' durations)."""

    def duration(body: dict[str, Any]) -> float:
        request = body["request"]
        rng = random.Random(request["prompt"])
        return rng.uniform(0.6, 1.2) + request["steps"] / 30

    async def main() -> tuple[int, float]:
        emu = NovitaEmulator(
            durations=duration, clock=anyio.current_time, latency=0.005, report_eta=False
        )
        rng = random.Random(9)
        requests = [req(f"affine {i}", steps=rng.choice(range(20, 61, 5))) for i in range(600)]
        done = 0
        async with emu.client() as client, client.txt2img_many(requests) as run:
            async for item in run:
                done += item.ok
        return done, emu.polls_total / 600

    done, polls = trio.run(main, clock=MockClock(autojump_threshold=0))
    assert done == 600
    assert polls <= 2.6


def test_unknown_quota_adapts_to_429s_without_duplicates() -> None:
    async def main() -> tuple[list[BatchItem], NovitaEmulator, WeightedRateLimiter]:
        emu = NovitaEmulator(durations=(1.0, 3.0), clock=anyio.current_time)
        emu.rate_limit(images_per_minute=20)
        requests = [req(f"p{i}", image_num=1 + i % 4) for i in range(24)]
        limiter = WeightedRateLimiter(None)
        async with emu.client(poll_policy=FAST_POLLS) as client:
            items = await client.txt2img_all(requests, images_per_minute=limiter)
        return items, emu, limiter

    items, emu, limiter = trio.run(main, clock=MockClock(autojump_threshold=0))
    assert all(item.ok for item in items), [i.error for i in items if i.error]
    assert emu.tasks_created == 24  # refused POSTs created nothing; none was paid twice
    assert emu.rate_limited >= 1
    assert limiter.rate_limited == emu.rate_limited
    # it learned the quota instead of hammering: few refusals for 60 images at 20/min
    assert emu.rate_limited <= 12


# --------------------------------------------------------------------------- break / cancel


async def test_break_out_of_bare_loop_stops_everything(caplog: pytest.LogCaptureFixture) -> None:
    emu = NovitaEmulator(durations=by_prompt(slow=0.5, fast=0.01), latency=0.01)
    requests = [req("fast"), *reqs(30, "slow")]
    client, counting = client_for(emu)
    async with client:
        got = []
        with caplog.at_level(logging.WARNING, logger="novita_async"):
            async for item in client.txt2img_many(requests, max_concurrent_submissions=2):
                got.append(item)
                break  # the run is freed here: no POST starts from now on
            sent = counting.posts_sent
            await anyio.sleep(0.05)  # polls already handed to the pool's workers may still go
            polls = emu.polls_total
            await anyio.sleep(0.7)  # long enough for more POSTs and polls, were anything running
        # POSTs on the wire at the break finish (shielded), nothing new starts, nothing polls
        assert (counting.posts_sent, emu.polls_total, emu.tasks_created) == (sent, polls, sent)
        assert sent < len(requests)
        [warning] = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
        pending = [t for t in emu.tasks if t != got[0].task_id]
        assert pending
        assert all(task_id in warning for task_id in pending)  # what was paid is reported


async def test_break_out_of_a_kept_run_stops_at_aclose(caplog: pytest.LogCaptureFixture) -> None:
    emu = NovitaEmulator(durations=by_prompt(slow=0.5, fast=0.01), latency=0.01)
    requests = [req("fast"), *reqs(30, "slow")]
    client, counting = client_for(emu)
    async with client:
        run = client.txt2img_many(requests, max_concurrent_submissions=2)
        got = []
        async for item in run:
            got.append(item)
            break
        await run.aclose()  # a run kept in a variable is stopped by aclose (or when freed)
        sent, polls, created = counting.posts_sent, emu.polls_total, emu.tasks_created
        await anyio.sleep(0.7)  # long enough for more POSTs and polls, were anything running
        assert (counting.posts_sent, emu.polls_total, emu.tasks_created) == (sent, polls, created)
        assert sent < len(requests)
        assert run.pending_task_ids  # submitted, still running, billed
        assert_no_task_lost(emu, got, run.pending_task_ids)
        assert run.closed
        assert [item async for item in run] == []
    assert not [r for r in caplog.records if r.name == "asyncio"]


async def test_abandoned_bare_loop_logs_pending_tasks(caplog: pytest.LogCaptureFixture) -> None:
    emu = NovitaEmulator(durations=by_prompt(slow=5.0, fast=0.01))
    client, _ = client_for(emu)
    async with client:
        with caplog.at_level(logging.WARNING, logger="novita_async"):
            async for _item in client.txt2img_many([req("fast"), *reqs(3, "slow")]):
                break
            gc.collect()
    messages = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert len(messages) == 1
    assert all(task_id in messages[0] for task_id in emu.tasks if emu.tasks[task_id].duration > 1)


@pytest.mark.parametrize("form", ["with", "aclose", "cancelled"])
async def test_a_stopped_run_reports_its_pending_tasks_once_when_freed(
    form: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A run stopped early (left ``async with``, ``aclose``, its bare loop cancelled) logs
    its paid, undelivered tasks at the stop; freeing the run afterwards must not log the
    same tasks again (a second "billed" warning for one set of tasks)."""
    emu = NovitaEmulator(durations=5.0)
    client, _ = client_for(emu)
    with anyio.fail_after(10):
        async with client:
            with caplog.at_level(logging.WARNING, logger="novita_async"):
                run = client.txt2img_many(reqs(3))
                with anyio.move_on_after(0.2):
                    if form == "with":
                        async with run:
                            async for _item in run:
                                pass
                    else:
                        async for _item in run:
                            pass
                if form == "aclose":
                    await run.aclose()
                assert run.closed
                assert len(run.pending_task_ids) == 3
                del run
                gc.collect()
    messages = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert len(messages) == 1
    assert all(task_id in messages[0] for task_id in emu.tasks)


async def test_break_while_a_refused_post_is_on_the_wire_reports_paid_tasks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A POST on the wire at a bare loop's break that ends in an error item (the reader
    is gone) must not turn the stop into a failure that skips the warning listing the
    paid tasks never delivered."""
    emu = NovitaEmulator(durations=by_prompt(slow=5.0, fast=0.01))
    emu.fail_next("txt2img", status=None, times=2)  # the first two POSTs answer normally
    emu.fail_next("txt2img", status=500, delay=0.3)  # the third is on the wire at the break
    client, _ = client_for(emu)
    with anyio.fail_after(10):
        async with client:
            with caplog.at_level(logging.WARNING, logger="novita_async"):
                got = []
                async for item in client.txt2img_many(
                    [req("fast"), req("slow"), req("third")], max_concurrent_submissions=1
                ):
                    got.append(item.task_id)
                    break
                await anyio.sleep(0.5)  # the third POST gets its 500 (uncertain)
    [paid] = [task_id for task_id in emu.tasks if task_id not in got]
    messages = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert len(messages) == 1
    assert paid in messages[0]


async def test_bare_loop_consumes_the_input_lazily() -> None:
    pulled = 0

    def generate() -> Iterator[Txt2ImgRequest]:
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield req(f"lazy {i}")

    emu = NovitaEmulator(durations=0.01, latency=0.01)
    client, counting = client_for(emu)
    async with client:
        run = client.txt2img_many(generate(), max_concurrent_submissions=2)
        async for _item in run:
            break
        await run.aclose()
    assert pulled < 100
    assert counting.posts_sent <= pulled


async def test_bare_loop_runs_to_completion_across_calls() -> None:
    emu = NovitaEmulator(durations=(0.01, 0.1), seed=2)
    client, _ = client_for(emu)
    async with client:
        run = client.txt2img_many(reqs(40))
        items = []
        async for item in run:
            items.append(item)
            await anyio.sleep(0.005)  # the loop body runs while nothing else does
    assert sorted(i.index for i in items) == list(range(40))
    assert all(i.ok for i in items)
    assert emu.tasks_created == 40
    assert run.closed
    assert run.pending_task_ids == ()


async def buffered_run(client: AsyncNovita, n: int) -> BatchRun:
    """A run of ``n`` quick prompts whose items all finished and wait to be read."""
    run = client.txt2img_many(reqs(n))
    await run.__aenter__()
    with anyio.fail_after(20):
        while client.scheduler.stats.tasks_succeeded < n:
            await anyio.sleep(0.01)
        await anyio.sleep(0.05)  # each task's waiter hands its item over
    return run


async def test_finished_items_are_read_without_a_loop_turn_each() -> None:
    """A burst of finished items is handed out in a few turns of the event loop,
    not one turn per item (a busy loop drained 100 items in 0.5 s that way)."""
    n = 96
    emu = NovitaEmulator(durations=0.01)
    client, _ = client_for(emu)
    turns = 0
    reading = True

    async def count_turns() -> None:
        nonlocal turns
        while reading:
            turns += 1
            await anyio.lowlevel.checkpoint()

    async with client:
        run = await buffered_run(client, n)
        async with anyio.create_task_group() as tg:
            tg.start_soon(count_turns)
            items = [item async for item in run]
            reading = False
        await run.aclose()
    assert sorted(item.index for item in items) == list(range(n))
    assert all(item.ok for item in items)
    assert turns <= n // 32 + 4  # one turn per item before


async def test_a_cancelled_reader_takes_no_buffered_item() -> None:
    """Cancellation still wins at every ``__anext__`` when items are waiting: the
    run stops and the items not read stay pending (nothing is taken and lost)."""
    n = 10
    emu = NovitaEmulator(durations=0.01)
    client, _ = client_for(emu)
    async with client:
        run = await buffered_run(client, n)
        first = await run.__anext__()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await run.__anext__()
        assert scope.cancelled_caught
        assert run.closed
        assert run.delivered == 1
        assert len(run.pending_task_ids) == n - 1
        assert first.task_id not in run.pending_task_ids
        assert_no_task_lost(emu, [first], run.pending_task_ids)


async def test_cancel_running_batch_from_outside() -> None:
    emu = NovitaEmulator(durations=by_prompt(slow=0.5, fast=0.01), latency=0.01)
    client, counting = client_for(emu)
    got: list[BatchItem] = []
    async with client:
        with anyio.CancelScope() as scope:
            async with client.txt2img_many([req("fast"), *reqs(40, "slow")]) as run:
                async for item in run:
                    got.append(item)
                    scope.cancel()
                    await anyio.sleep(10)  # cancelled here
        assert scope.cancelled_caught
        assert len(got) == 1
        sent, polls = counting.posts_sent, emu.polls_total
        await anyio.sleep(0.7)
        assert (counting.posts_sent, emu.polls_total) == (sent, polls)
        assert_no_task_lost(emu, got, run.pending_task_ids)
        assert run.closed


async def test_client_closed_while_the_last_prompts_are_paced_fails_the_run() -> None:
    """Prompts taken from the input but not sent yet (paced) when the client closes are
    not items: the run fails with the client's closing, not a clean, short end."""
    emu = NovitaEmulator(durations=0.01)
    client, counting = client_for(emu)
    with anyio.fail_after(10):
        async with client:
            run = client.txt2img_many(reqs(3), images_per_minute=1)  # the rest waits a minute
            first = await run.__anext__()
        assert first.ok
        assert counting.posts_sent == 1
        with pytest.raises(NovitaError, match="closed during the batch"):
            await run.__anext__()  # was StopAsyncIteration: 1 item for 3 prompts, no error
        assert run.state.value == "failed"


@pytest.mark.parametrize("hosted", [True, False], ids=["async-with", "bare"])
async def test_post_on_the_wire_at_cancellation_is_not_lost(hosted: bool) -> None:
    emu = NovitaEmulator(durations=5.0)
    emu.fail_next("txt2img", status=None, delay=0.3)  # the first POST takes 0.3 s
    client, counting = client_for(emu)
    async with client:
        run = client.txt2img_many(reqs(5), max_concurrent_submissions=1)
        with anyio.move_on_after(0.1) as scope:
            await consume(run, hosted=hosted)
        assert scope.cancelled_caught
        # the shielded POST completed: its (paid) task is known, nothing else was sent
        assert counting.posts_sent == 1
        assert emu.tasks_created == 1
        assert run.pending_task_ids == tuple(emu.tasks)
        await anyio.sleep(0.3)
        assert counting.posts_sent == 1
        await run.aclose()


async def test_aclose_inside_async_with_stops_the_batch_not_the_block() -> None:
    emu = NovitaEmulator(durations=by_prompt(slow=5.0, fast=0.01), latency=0.01)
    client, counting = client_for(emu)
    after_close = False
    async with client, client.txt2img_many([req("fast"), *reqs(30, "slow")]) as run:
        async for _item in run:
            await run.aclose()
            after_close = True  # the block itself was not cancelled
        sent = counting.posts_sent
        await anyio.sleep(0.2)
        assert counting.posts_sent == sent
        assert_no_task_lost(emu, [_item], run.pending_task_ids)
    assert after_close
    assert run.closed


async def test_leaving_async_with_without_iterating_cancels() -> None:
    emu = NovitaEmulator(durations=5.0, latency=0.01)
    client, counting = client_for(emu)
    async with client:
        async with client.txt2img_many(reqs(50), max_concurrent_submissions=2) as run:
            await anyio.sleep(0.05)
        sent = counting.posts_sent
        await anyio.sleep(0.2)
        assert counting.posts_sent == sent < 50
        assert_no_task_lost(emu, [], run.pending_task_ids)


async def test_exception_in_loop_body_propagates_unwrapped() -> None:
    emu = NovitaEmulator(durations=0.01)
    client, _ = client_for(emu)
    async with client:
        run = client.txt2img_many(reqs(10))

        async def body() -> None:
            async with run:
                async for _item in run:
                    raise KeyError("mine")

        with pytest.raises(KeyError):  # not an ExceptionGroup
            await body()
        assert run.closed


@pytest.mark.parametrize("hosted", [True, False], ids=["async-with", "bare"])
async def test_broken_input_iterator_raises(hosted: bool) -> None:
    def generate() -> Iterator[Txt2ImgRequest]:
        yield req("one")
        raise OSError("input broke")

    emu = NovitaEmulator(durations=0.01)
    client, _ = client_for(emu)
    async with client:
        run = client.txt2img_many(generate())
        with pytest.raises(OSError, match="input broke"):
            await consume(run, hosted=hosted)


async def test_misuse_is_reported() -> None:
    emu = NovitaEmulator(durations=0.01)
    client, _ = client_for(emu)
    async with client:
        run = client.txt2img_many(reqs(2))
        async with run:
            with pytest.raises(RuntimeError):
                async with run:
                    pass
            assert len([item async for item in run]) == 2
        assert [item async for item in run] == []  # closed
        bare = client.txt2img_many(reqs(1))
        assert (await bare.__anext__()).ok
        with pytest.raises(RuntimeError):
            async with bare:
                pass


# --------------------------------------------------------------------------- journal


async def test_journal_resumes_without_paying_twice(tmp_path: Path) -> None:
    db = tmp_path / "batch.db"
    emu = NovitaEmulator(durations=by_prompt(slow=0.4, fast=0.01))
    requests = [req("fast a"), req("fast [fail]"), *reqs(6, "slow")]
    client, counting = client_for(emu)
    async with client:
        first: list[BatchItem] = []
        run = client.txt2img_many(requests, journal=db)
        async for item in run:
            first.append(item)
            if len(first) == 2:
                break
        await run.aclose()
        assert 2 <= emu.tasks_created <= len(requests)

        second = await client.txt2img_all(requests, journal=db)
    assert [i.index for i in second] == list(range(len(requests)))
    assert emu.tasks_created == len(requests)  # every prompt paid exactly once
    assert counting.posts_sent == len(requests)
    for before in first:  # what the first run handed out comes back from the journal
        again = second[before.index]
        assert again.from_journal
        assert again.task_id == before.task_id
        assert again.ok == before.ok
    assert isinstance(second[1].error, TaskFailedError)
    assert second[1].error.reason == "emulated failure"
    assert second[0].ok
    assert all(i.ok for i in second[2:])


async def test_journal_keeps_uncertain_prompts_unless_asked(tmp_path: Path) -> None:
    db = tmp_path / "batch.db"
    emu = NovitaEmulator(durations=0.01)
    emu.fail_next("txt2img", reset=True, after_create=True)
    requests = reqs(3)
    client, counting = client_for(emu)
    async with client:
        one = await client.txt2img_all(requests, journal=db, max_concurrent_submissions=1)
        assert isinstance(one[0].error, SubmissionUncertainError)
        two = await client.txt2img_all(requests, journal=db)
        assert isinstance(two[0].error, SubmissionUncertainError)
        assert two[0].from_journal
        assert all(i.from_journal and i.ok for i in two[1:])
        assert counting.posts_sent == 3
        three = await client.txt2img_all(requests, journal=db, resubmit_uncertain=True)
    assert three[0].ok
    assert not three[0].from_journal
    assert counting.posts_sent == 4
    assert emu.tasks_created == 4


async def test_journal_of_another_batch_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "batch.db"
    emu = NovitaEmulator(durations=0.01)
    client, counting = client_for(emu)
    async with client:
        await client.txt2img_all(reqs(2), journal=db)
        with pytest.raises(JournalMismatchError):
            await client.txt2img_all(reqs(2, "other"), journal=db)
        with pytest.raises(JournalMismatchError):
            async for _item in client.txt2img_many(reqs(2, "other"), journal=db):
                pass
    assert counting.posts_sent == 2


async def test_caller_owned_journal_stays_open(tmp_path: Path) -> None:
    emu = NovitaEmulator(durations=0.01)
    client, _ = client_for(emu)
    with Journal(tmp_path / "batch.db") as journal:
        async with client:
            items = await client.txt2img_all(reqs(3, "owned"), journal=journal)
            again = await client.txt2img_all(reqs(3, "owned"), journal=journal)
        assert not journal.closed
        assert journal.summary()["succeeded"] == 3
    assert all(i.ok and not i.from_journal for i in items)
    assert all(i.ok and i.from_journal for i in again)
    assert emu.tasks_created == 3


@pytest.mark.parametrize("status", [403, 400])
async def test_a_refused_key_stops_the_submissions(status: int) -> None:
    emu = NovitaEmulator(durations=0.01)
    emu.fail_next(
        "txt2img",
        status=status,
        reason="INVALID_API_KEY" if status == 403 else "MISSING_API_KEY",
        times=1000,
    )
    client, counting = client_for(emu)
    async with client:
        items = await client.txt2img_all(reqs(30), max_concurrent_submissions=1)
    assert counting.posts_sent == 1  # no POST after the first refusal
    assert len(items) == 30
    assert all(type(item.error).__name__ == "AuthenticationError" for item in items)
    assert {id(item.error) for item in items[1:]} == {id(items[0].error)}


async def test_a_refused_key_calls_off_the_submissions_waiting_for_their_pace() -> None:
    """After a refused key, the prompts other workers took but had not sent yet (waiting
    for the rate limiter) become items at once: they used to wait out their pacing (a
    minute each here) and then be sent, each meeting the same refusal."""
    emu = NovitaEmulator(durations=0.01)
    emu.fail_next("txt2img", status=403, reason="INVALID_API_KEY", times=1000)
    client, counting = client_for(emu)
    with anyio.fail_after(5):  # was 3 more minutes, one paced POST after another
        async with client:
            items = await client.txt2img_all(
                reqs(10), images_per_minute=1, max_concurrent_submissions=4
            )
    assert counting.posts_sent == 1
    assert [item.index for item in items] == list(range(10))
    assert all(type(item.error).__name__ == "AuthenticationError" for item in items)
    assert all(item.task_id is None for item in items)


class SlowUncertainJournal:
    """An AsyncJournal in memory (as a user's might be: writes not shielded) whose
    ``mark_uncertain`` takes a while."""

    def __init__(self) -> None:
        self.states: dict[int, str] = {}

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def begin(self, entries: Any) -> dict[int, Any]:
        self.states = {index: "new" for index, _ in entries}
        return {}

    async def mark_submitting(self, index: int) -> None:
        self.states[index] = "submitting"

    async def mark_submitted(self, index: int, task_id: str) -> None:
        self.states[index] = "submitted"

    async def mark_uncertain(self, index: int, message: str) -> None:
        await anyio.sleep(0.3)
        self.states[index] = "uncertain"

    async def mark_rejected(self, index: int, message: str) -> None:
        self.states[index] = "rejected"

    async def mark_finished(self, index: int, *, result: Any, error: str | None) -> None:
        self.states[index] = "failed" if error else "succeeded"


async def test_a_refusal_does_not_turn_a_maybe_paid_prompt_into_a_refused_one() -> None:
    """Two POSTs on the wire: one answers 500 (a task may exist), the other 403. The
    refusal calls off the submissions not sent yet; the one whose outcome is being
    recorded as uncertain was sent: it stays a SubmissionUncertainError item (it became
    an AuthenticationError item, telling the user nothing was paid)."""
    emu = NovitaEmulator(durations=0.01, latency=0.1)
    emu.fail_next("txt2img", status=500, times=1)
    emu.fail_next("txt2img", status=403, reason="INVALID_API_KEY", times=1000)
    client, counting = client_for(emu)
    journal = SlowUncertainJournal()
    with anyio.fail_after(5):
        async with client:
            items = await client.txt2img_all(reqs(4), journal=journal, max_concurrent_submissions=2)
    assert counting.posts_sent == 2
    kinds = sorted(type(item.error).__name__ for item in items)
    assert kinds == ["AuthenticationError"] * 3 + ["SubmissionUncertainError"]
    (maybe_paid,) = [i for i in items if isinstance(i.error, SubmissionUncertainError)]
    assert journal.states[maybe_paid.index] == "uncertain"


async def test_a_refused_key_with_an_endless_input_lets_the_reader_leave() -> None:
    """After a refused key every prompt becomes an item without a request: an endless
    (lazy) input must not hold the event loop while the engine turns it into items."""
    pulled = 0

    def endless() -> Iterator[Txt2ImgRequest]:
        nonlocal pulled
        while pulled < 200_000:  # a guard, so that the bug fails the test, not hangs it
            pulled += 1
            yield req(f"prompt {pulled}")

    emu = NovitaEmulator(durations=0.01)
    emu.fail_next("txt2img", status=403, reason="INVALID_API_KEY", times=10)
    client, counting = client_for(emu)
    got = []
    with anyio.fail_after(10):
        async with client:
            async for item in client.txt2img_many(endless(), max_concurrent_submissions=1):
                got.append(item)
                if len(got) == 5:
                    break
    assert counting.posts_sent == 1
    assert all(type(item.error).__name__ == "AuthenticationError" for item in got)
    assert pulled < 1000  # was all 200,000, in one step of the event loop


async def test_an_endless_input_of_invalid_requests_lets_the_reader_leave() -> None:
    """Each invalid request is an item without a request; an endless (lazy) run of them
    must not hold the event loop while the engine turns it into items."""
    pulled = 0

    def endless() -> Iterator[Txt2ImgRequest]:
        nonlocal pulled
        while pulled < 200_000:  # a guard, so that the bug fails the test, not hangs it
            pulled += 1
            yield req(f"prompt {pulled}", enable_transparent_background=True)  # needs png

    emu = NovitaEmulator(durations=0.01)
    client, counting = client_for(emu)
    got = []
    with anyio.fail_after(10):
        async with client:
            async for item in client.txt2img_many(endless()):
                got.append(item)
                if len(got) == 5:
                    break
    assert counting.posts_sent == 0
    assert all(isinstance(item.error, InvalidRequestError) for item in got)
    assert pulled < 1000


async def test_an_unreachable_api_stops_before_any_task() -> None:
    emu = NovitaEmulator(durations=0.01)
    client, counting = client_for(emu, retry_policy=RetryPolicy(max_retries=1, max_backoff=0))
    counting.refuse_connections = 1000
    async with client:
        items = await client.txt2img_all(reqs(20), max_concurrent_submissions=1)
    attempts = 1000 - counting.refuse_connections
    assert attempts == 2  # the first prompt and its one retry, then nothing
    assert all(isinstance(item.error, APIConnectionError) for item in items)


def test_without_eta_a_cold_burst_waits_for_the_probes_first_end() -> None:
    """A server without eta, a cold burst of 3 s tasks: before any task ends only the
    probes are polled, every latency_budget (the rest used to be polled blindly at
    first_poll_delay, 1 s); the first end re-plans them all, so each of the others is
    polled about once."""

    async def main() -> tuple[int, int, int, float]:
        emu = NovitaEmulator(durations=3.0, clock=anyio.current_time, report_eta=False)
        probes = PollPolicy().warmup_samples
        async with emu.client() as client, client.txt2img_many(reqs(100)) as run:
            await anyio.sleep(2.9)  # virtual time: the tasks were submitted at once
            early = emu.polls_total
            polled = sum(1 for n in emu.polls.values() if n)
            done = 0
            async for item in run:
                done += item.ok
        return early, polled, probes, emu.polls_total / done

    early, polled, probes, polls = trio.run(main, clock=MockClock(autojump_threshold=0))
    assert polled == probes  # only the probes were polled before the first end
    # at 0.25 s, then every 0.8 s like any task past what is known (they used to be
    # polled every 0.4 s: 7 polls each by 2.9 s, 1.4 per task of a 100-prompt burst)
    assert early <= 4 * probes
    assert polls <= 2.0  # the probes' polls included


def _cold_burst(
    n: int,
    duration: Any,
    known: list[int] | None = None,
    steps: list[int] | None = None,
    workers: int | None = None,
    loop: list[float] | None = None,
    stamps: bool = True,
) -> tuple[float, float]:
    """A cold burst of ``n`` prompts of 20-60 steps (or of ``steps``, in order) on a server
    without eta (running ``workers`` tasks at once, the others QUEUED): (polls per task,
    p95 of how late each task's end was seen); ``known`` gets the durations the client
    had learnt at each delivery; ``loop`` the polls per task and p95 of a 1 s loop."""

    rng = random.Random(3)
    if steps is None:
        steps = [rng.choice(range(20, 61, 5)) for _ in range(n)]
    requests = [req(f"cold {i}", steps=s) for i, s in enumerate(steps[:n])]

    async def main() -> tuple[float, float]:
        emu = NovitaEmulator(
            durations=duration,
            clock=anyio.current_time,
            report_eta=False,
            workers=workers,
            stamps=stamps,
        )
        late = []
        async with emu.client() as client, client.txt2img_many(requests) as run:
            async for item in run:
                assert item.ok
                late.append(anyio.current_time() - emu.tasks[item.task_id].completed_at)
                if known is not None:
                    known.append(client.scheduler.stats.duration_samples)
        late.sort()
        if loop is not None:  # polled every second from submission, each task on its own
            ages = [t.completed_at - t.created_at for t in emu.tasks.values()]
            looped = sorted(math.ceil(age) - age for age in ages)
            loop.extend([sum(math.ceil(age) for age in ages) / n, looped[int(0.95 * n)]])
        return emu.polls_total / n, late[int(0.95 * n)]

    return trio.run(main, clock=MockClock(autojump_threshold=0))


def _unit(body: Any) -> float:
    """A number in [0, 1) drawn from the prompt (the same task, the same number)."""
    return random.Random(body["request"]["prompt"]).random()


def test_a_cold_burst_whose_durations_grow_with_cost_polls_dear_tasks_later() -> None:
    """300 prompts, a fixed 0.9 s plus 33 ms a step (1.5-2.9 s), no eta: the probes that
    ended first are the cheap ones, so once they show durations grow with cost a cold
    first poll waits for what the first finishers' costs and seconds predict at the
    task's cost (before: their seconds whatever the cost, re-planned only at the first
    end and when warm: 2.17 polls per task, p95 0.51 s; then 1.39 and 0.43 s; since
    tasks stamped with one instant are each other's peers, 1.22 and 0.59 s)."""

    def duration(body: Any) -> float:
        return (0.9 + body["request"]["steps"] / 30) * (0.95 + 0.1 * _unit(body))

    polls, p95 = _cold_burst(300, duration)
    assert polls <= 1.6
    assert p95 <= 0.65


def test_a_cold_burst_does_not_poll_dear_tasks_on_two_cheap_probes_seconds() -> None:
    """302 prompts, 0.9 s plus 33 ms a step (10, 30 or 60 steps: 1.2, 1.9 or 2.9 s), no
    eta. The first 20 are the probes: two cheap ones, three of 30 steps, fifteen dear.
    The probes' poll at 1.85 s finds the two cheap ones ended: too few to tell whether
    durations grow with cost, so every cold first poll was planned from their seconds
    (1.6 s after submission), before most tasks' end (2.18 polls per task). The two are
    cheaper than every probe still running: the dearer tasks now wait for the probes'
    next poll, whose three ends settle it (1.24 polls, p95 0.78 s either way)."""

    def duration(body: Any) -> float:
        return (0.9 + body["request"]["steps"] / 30) * (0.98 + 0.04 * _unit(body))

    probes = [10, 10] + [30] * 3 + [60] * 15
    steps = probes + [10, 30, 60] * 94
    polls, p95 = _cold_burst(len(steps), duration, steps=steps)
    assert polls <= 1.5
    assert p95 <= 0.85


def test_a_burst_the_server_queues_is_polled_by_the_queue_not_by_its_age() -> None:
    """400 prompts, 0.6-1.2 s plus 33 ms a step, no eta, on a server that runs 25 at
    once and queues the rest (about 38 s for the last). Every duration from submission
    grows with the queue, so a waiting task was past all of them and polled at a growing
    backoff: 9.6 polls per task, p95 4.5 s late, against a 1 s loop's 19.5 polls and
    0.96 s. Now a QUEUED answer plans the next poll where the queue's front, moving at
    the pace stamped starts show, reaches the task, plus the first runs of its cost; a
    stamped start, where runs of its cost end (6.9 polls, p95 0.43 s)."""

    def duration(body: Any) -> float:
        return 0.6 + 0.6 * _unit(body) + body["request"]["steps"] / 30

    loop: list[float] = []
    polls, p95 = _cold_burst(400, duration, workers=25, loop=loop)
    loop_polls, loop_p95 = loop
    assert loop_polls > 15  # the queue is long: a 1 s loop polls each task ~20 times
    assert polls <= 0.45 * loop_polls
    assert p95 <= min(0.7, loop_p95)


def _queued_then_idle(stamps: bool) -> tuple[float, float]:
    """600 prompts on a server that runs 60 at once (the last wait ~20 s), no eta; then,
    once they are done, 60 more: (polls per task, p95 lateness) of the 60."""

    def duration(body: Any) -> float:
        return 0.6 + 0.6 * _unit(body) + body["request"]["steps"] / 30

    rng = random.Random(5)
    busy = [req(f"busy {i}", steps=rng.choice(range(20, 61, 5))) for i in range(600)]
    idle = [req(f"idle {i}", steps=rng.choice(range(20, 61, 5))) for i in range(60)]

    async def main() -> tuple[float, float]:
        emu = NovitaEmulator(
            durations=duration,
            clock=anyio.current_time,
            report_eta=False,
            workers=60,
            stamps=stamps,
        )
        late = []
        async with emu.client() as client:
            async with client.txt2img_many(busy) as run:
                async for item in run:
                    assert item.ok
            before = emu.polls_total
            async with client.txt2img_many(idle) as run:
                async for item in run:
                    assert item.ok
                    late.append(anyio.current_time() - emu.tasks[item.task_id].completed_at)
        late.sort()
        return (emu.polls_total - before) / len(idle), late[int(0.95 * len(late))]

    return trio.run(main, clock=MockClock(autojump_threshold=0))


def test_a_burst_after_a_queue_drained_is_polled_at_task_durations_not_the_queues() -> None:
    """A client's first 600 prompts queue on a server that runs 60 at once; 60 more come
    once they are done. The queue's waits were in the durations learnt, so the 60 were
    first polled as late as the queue was long: 1.0 poll per task, p95 13.3 s late. A
    stamped wait beyond the shortest seen plus 0.5 s is the queue's, and such a task's
    duration is not learnt by a warm learner (1.25 polls, p95 0.40 s)."""

    polls, p95 = _queued_then_idle(stamps=True)
    assert polls <= 2.0
    assert p95 <= 0.7


def test_a_server_that_queues_without_stamps_is_polled_by_the_pace_of_ends() -> None:
    """As above, on a server whose answers carry no ``debug_info`` times: ``QUEUED`` still
    says a task waits. Its next poll comes when the tasks submitted between the last one
    seen ended and it should have ended, at the pace that front moved; once running,
    every ``latency_budget`` (before: a growing backoff, 8.5 polls per task, p95 4.5 s
    late, against a 1 s loop's 19.5 and 0.96 s; now 8.7-10.1 polls, p95 0.46-0.61 s over runs:
    the order of simultaneous events varies)."""

    def duration(body: Any) -> float:
        return 0.6 + 0.6 * _unit(body) + body["request"]["steps"] / 30

    loop: list[float] = []
    polls, p95 = _cold_burst(400, duration, workers=25, loop=loop, stamps=False)
    loop_polls, loop_p95 = loop
    assert loop_polls > 15
    assert polls <= 0.6 * loop_polls
    assert p95 <= min(0.8, loop_p95)


def test_a_queue_after_a_trickle_is_paced_by_the_tasks_that_waited() -> None:
    """A client sends 70 prompts one at a time, then 300 at once to a server that runs 20
    at once. The trickle's starts came at the client's pace, one every 2.5 s: taken as
    the queue's pace, they put every waiting task's next poll at ``max_interval``
    (p95 2.3 s late). The pace is now that of tasks that waited to start (p95 0.4 s)."""

    def duration(body: Any) -> float:
        return 0.6 + 0.6 * _unit(body) + body["request"]["steps"] / 30

    rng = random.Random(5)
    trickle = [req(f"trickle {i}", steps=rng.choice(range(20, 61, 5))) for i in range(70)]
    burst = [req(f"burst {i}", steps=rng.choice(range(20, 61, 5))) for i in range(300)]

    async def main() -> float:
        emu = NovitaEmulator(
            durations=duration, clock=anyio.current_time, report_eta=False, workers=20
        )
        late = []
        async with emu.client() as client:
            for request in trickle:
                await client.txt2img(request)
                await anyio.sleep(0.5)
            async with client.txt2img_many(burst) as run:
                async for item in run:
                    assert item.ok
                    late.append(anyio.current_time() - emu.tasks[item.task_id].completed_at)
        late.sort()
        return late[int(0.95 * len(late))]

    assert trio.run(main, clock=MockClock(autojump_threshold=0)) <= 0.7


def test_a_cold_burst_without_stamps_learns_its_probes_durations() -> None:
    """300 prompts, 0.6-1.2 s plus 33 ms a step, no eta and no ``debug_info`` times: a
    probe that was running at its first poll was never learnt (only stamps or an eta
    taught a duration), so the burst's first polls waited for every probe to end: 1.21
    polls per task, p95 2.0 s late, against a 1 s loop's 2.69 and 0.96 s. A probe's
    polls come at a burst's pace whatever its duration, so the midpoint of the last two
    is a fair sample (2.08 polls, p95 0.75 s)."""

    def duration(body: Any) -> float:
        return 0.6 + 0.6 * _unit(body) + body["request"]["steps"] / 30

    loop: list[float] = []
    polls, p95 = _cold_burst(300, duration, stamps=False, loop=loop)
    loop_polls, loop_p95 = loop
    assert polls <= loop_polls
    assert p95 <= min(0.9, loop_p95)


def test_a_cold_burst_whose_fixed_part_varies_is_first_polled_past_its_first_finishers() -> None:
    """300 prompts, a fixed part of U(0.6, 1.2) s per task plus 33 ms a step, no eta: what
    the line through the first finishers leaves unexplained is wide. Their smallest
    residual is the fastest task's, so a cold first poll there (plus the latency budget)
    came before most tasks' end; their largest is about the k/n quantile of the k
    fastest of n probes (2.05 polls per task, then 1.45 once tasks of one instant were
    each other's peers; now 1.30)."""

    def duration(body: Any) -> float:
        return 0.6 + 0.6 * _unit(body) + body["request"]["steps"] / 30

    polls, p95 = _cold_burst(300, duration)
    assert polls <= 1.38
    assert p95 <= 0.8


def test_a_burst_stamped_with_one_instant_learns_durations_as_whole_cohorts() -> None:
    """Trio's MockClock (like a coarse clock) stamps the whole burst's submission with one
    instant: the tasks that finish first are still its fastest, so their durations wait
    for the cohort (before, no task of the instant counted as older than another: 113
    durations were learnt by the 100th delivery, and the tasks still running looked
    slower than all of them)."""
    known: list[int] = []
    _cold_burst(300, lambda body: 1.0 + 2.0 * _unit(body), known)
    assert max(known[:100]) <= PollPolicy().warmup_samples  # the probes' alone
    assert known[-1] == PollPolicy().learning_window  # then the whole cohort


def test_a_cold_burst_whose_durations_ignore_cost_is_not_polled_later_for_it() -> None:
    """300 prompts of 20-60 steps whose durations are U(1, 3) s whatever the cost: the
    probes show no link, so a dear task's cold first poll is not put later by the cheap
    first finishers' seconds per cost (fewer polls from the re-plans as durations come,
    and no later ends)."""
    polls, p95 = _cold_burst(300, lambda body: 1.0 + 2.0 * _unit(body))
    assert polls <= 2.15
    assert p95 <= 0.85


def test_concurrent_txt2img_calls_learn_durations_from_when_their_post_went() -> None:
    """200 concurrent txt2img calls through 4 connections wait their turn to POST (up to
    2.5 s): a task's clock starts when its POST is sent, so the 1 s tasks are learnt as
    1 s (from the call's start they looked like 1 to 3.5 s, and were polled so)."""

    async def main() -> tuple[float | None, float]:
        emu = NovitaEmulator(
            durations=1.0, clock=anyio.current_time, latency=0.05, report_eta=False
        )
        async with emu.client(max_connections=4, max_concurrent_polls=4) as client:
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(client.txt2img, req(f"single {i}"))
            return client.scheduler.stats.duration_p50, emu.polls_total / 200

    p50, polls = trio.run(main, clock=MockClock(autojump_threshold=0))
    assert p50 is not None
    assert 1.0 <= p50 <= 1.2
    assert polls <= 2.0


def test_concurrent_txt2img_calls_with_whole_second_etas_poll_soon_enough() -> None:
    """400 concurrent txt2img calls of 1.3-3 s tasks whose eta is whole seconds left
    (rounded up, as Novita's): an eta bounds a duration without giving it, so the
    probes' etas (2 or 3 at 0.25 s) are not taken for durations. Taken as such (up to
    a second too long) they planned every first poll at 2.65 s or later, after most
    tasks had ended: p95 1.37-1.38 s late, 1.2 polls per task. Now: p95 0.51 s, 2.5
    polls (a first poll, then the eta's last second, split once). Once etas are known
    to be whole, no more tasks are probed: a probe's eta says no more than a first
    poll's."""

    def duration(body: dict[str, Any]) -> float:
        return random.Random(body["request"]["prompt"]).uniform(1.3, 3.0)

    async def main() -> tuple[list[float], float, int]:
        emu = NovitaEmulator(
            durations=duration, clock=anyio.current_time, latency=0.01, report_eta="whole"
        )
        lags: list[float] = []

        async def one(i: int) -> None:
            result = await client.txt2img(req(f"whole eta {i}"))
            lags.append(anyio.current_time() - emu.tasks[result.task.task_id].completed_at)

        async with emu.client() as client, anyio.create_task_group() as tg:
            for i in range(400):
                tg.start_soon(one, i)
        return sorted(lags), emu.polls_total / 400, client.scheduler.stats.probes

    for _ in range(3):  # trio runs ready tasks in a random order: a few orders
        lags, polls, probes = trio.run(main, clock=MockClock(autojump_threshold=0))
        assert probes <= 20  # PollPolicy.warmup_samples
        assert len(lags) == 400
        assert lags[int(0.95 * len(lags))] <= 0.7
        assert polls <= 2.7


def test_a_batch_probes_no_more_once_etas_are_known_to_be_whole() -> None:
    """Submitted 8 at a time, a batch's later tasks come after the first probes
    answered: with whole-second etas (which bound a duration, not give it) they are
    not probed as well. Before, every task was probed until 20 durations were known
    from finished tasks: 40 probes here, a wasted early poll each."""

    async def main() -> int:
        emu = NovitaEmulator(
            durations=(1.3, 3.0), clock=anyio.current_time, latency=0.01, report_eta="whole"
        )
        async with emu.client() as client:
            items = await client.txt2img_all([req(f"batch eta {i}") for i in range(300)])
        assert all(item.ok for item in items)
        return client.scheduler.stats.probes

    probes = trio.run(main, clock=MockClock(autojump_threshold=0))
    assert 5 <= probes <= 20
