"""The shared polling scheduler (``novita_async._poller``).

Most tests run on trio with a ``MockClock`` (``autojump_threshold=0``): time is
virtual, so they assert exact poll instants and counts and still take
milliseconds. A few run on asyncio and trio in real time with tiny durations.
A scheduler polls only while its loop task runs: tests wrap it in
:func:`running`, as the client does with its own task group.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import httpx
import pytest
import respx
import trio
import trio.testing
from _support import KEY, RESULT, SPEC_RESULT_BODY, SPEC_TASK_ID

from novita_async import (
    APIConnectionError,
    AsyncNovita,
    AuthenticationError,
    MalformedResponseError,
    NotFoundError,
    NovitaError,
    PollPolicy,
    RateLimitError,
    RetryPolicy,
    ServerError,
    TaskFailedError,
    TaskTimeoutError,
    Txt2ImgRequest,
)
from novita_async._errors import InvalidRequestError
from novita_async._learn import Learner
from novita_async._policy import PollHint
from novita_async._poller import PollScheduler
from novita_async._results import DebugInfo, ResultExtra, Task, TaskResult, TaskStatus

EPOCH_MS = 1_700_000_000_000  # the fake server's wall clock = EPOCH_MS + anyio time


@attrs.define
class FakeTask:
    created: float
    duration: float
    fail: bool = False
    visible_at: float = 0.0
    script: list[TaskStatus] = attrs.Factory(list)  # statuses answered first, in order


class FakeServer:
    """A task table on anyio's clock; ``fetch`` answers like ``GET task-result``.

    ``errors[task_id]`` lists what its next polls raise, in order (``None``: answer).
    """

    def __init__(self, *, eta: bool = True, latency: float = 0.0, whole: bool = False) -> None:
        self.eta = eta
        self.whole = whole  # etas rounded up to whole seconds
        self.latency = latency
        self.tasks: dict[str, FakeTask] = {}
        self.calls: list[tuple[float, str]] = []
        self.errors: dict[str, list[Exception | None]] = {}
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight = 0
        self.max_in_flight_per_task = 0
        self.cancelled = 0

    def add(self, task_id: str, duration: float, **kwargs: Any) -> float:
        now = anyio.current_time()
        self.tasks[task_id] = FakeTask(created=now, duration=duration, **kwargs)
        return now

    def completed_at(self, task_id: str) -> float:
        task = self.tasks[task_id]
        return task.created + task.duration

    def polls(self, task_id: str) -> int:
        return sum(1 for _, tid in self.calls if tid == task_id)

    def times(self, task_id: str) -> list[float]:
        return [t for t, tid in self.calls if tid == task_id]

    async def fetch(self, task_id: str) -> TaskResult:
        self.calls.append((anyio.current_time(), task_id))
        self.in_flight[task_id] += 1
        self.max_in_flight = max(self.max_in_flight, sum(self.in_flight.values()))
        self.max_in_flight_per_task = max(self.max_in_flight_per_task, self.in_flight[task_id])
        try:
            await anyio.sleep(self.latency)
        except BaseException:
            self.cancelled += 1
            raise
        finally:
            self.in_flight[task_id] -= 1
        queued = self.errors.get(task_id)
        if queued:
            error = queued.pop(0)
            if error is not None:
                raise error
        return self.answer(task_id)

    def answer(self, task_id: str) -> TaskResult:
        now = anyio.current_time()
        task = self.tasks.get(task_id)
        if task is None or now < task.visible_at:
            raise NotFoundError("no such task", status_code=404, reason="TASK_NOT_FOUND")
        done_at = task.created + task.duration
        if task.script:
            status = task.script.pop(0)
        elif now >= done_at:
            status = TaskStatus.FAILED if task.fail else TaskStatus.SUCCEED
        else:
            status = TaskStatus.PROCESSING
        finished = status.is_terminal
        eta = 0.0 if finished or not self.eta else round(done_at - now, 3)
        if self.whole and eta:
            eta = float(math.ceil(eta))
        debug = DebugInfo(
            submit_time_ms=EPOCH_MS + int(task.created * 1000),
            complete_time_ms=EPOCH_MS + int(done_at * 1000) if finished else None,
        )
        return TaskResult(
            task=Task(
                task_id=task_id,
                status=status,
                eta=eta,
                reason="emulated failure" if status is TaskStatus.FAILED else "",
            ),
            extra=ResultExtra(debug_info=debug),
        )


def scheduler(server: FakeServer, *, limit: int = 16, **policy: Any) -> PollScheduler:
    return PollScheduler(server.fetch, max_concurrent_polls=limit, policy=PollPolicy(**policy))


@asynccontextmanager
async def running(sched: PollScheduler) -> AsyncIterator[PollScheduler]:
    """Run ``sched``'s loop task for the block (as the client's task group does)."""
    async with anyio.create_task_group() as tg:
        await tg.start(sched.run)
        assert sched.running
        try:
            yield sched
        finally:
            tg.cancel_scope.cancel()
    assert not sched.running


async def joined(sched: PollScheduler, tracked: int = 1) -> None:
    """Let the waiters started so far register (trio shuffles who runs first)."""
    while sched.tracked < tracked:
        await anyio.lowlevel.checkpoint()


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.95 * (len(ordered) - 1))]


# --------------------------------------------------------------------------- virtual time


class TestVirtualTime:
    @pytest.fixture
    def anyio_backend(self) -> tuple[str, dict[str, Any]]:
        return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}

    # ----------------------------------------------------------------- dedupe

    @pytest.mark.anyio
    async def test_two_waiters_share_one_poll_sequence(self) -> None:
        server = FakeServer()
        sched = scheduler(server)
        server.add("t", 1.2)
        results: list[TaskResult] = []

        async def waiter(delay: float) -> None:
            await anyio.sleep(delay)
            results.append(await sched.wait("t"))

        async with running(sched), anyio.create_task_group() as tg:
            tg.start_soon(waiter, 0.0)
            tg.start_soon(waiter, 0.0)
            tg.start_soon(waiter, 0.5)  # joins the running sequence
        assert [r.status for r in results] == [TaskStatus.SUCCEED] * 3
        # Alone, one waiter needs 2 polls (now, then eta); three waiters need no more.
        assert server.times("t") == pytest.approx([0.0, 1.25])
        assert sched.stats.polls_total == 2
        assert sched.stats.poll_histogram == {2: 1}
        assert sched.stats.waits == 3
        assert sched.tracked == 0
        assert sched.stats.polls_by_task == {}

    @pytest.mark.anyio
    async def test_never_two_polls_in_flight_for_one_task(self) -> None:
        server = FakeServer(latency=0.3)
        sched = scheduler(server, min_interval=0.0)
        server.add("t", 2.0)
        async with running(sched), anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(sched.wait, "t")
        assert server.max_in_flight_per_task == 1
        assert server.polls("t") <= 3

    # ----------------------------------------------------------------- timing

    @pytest.mark.anyio
    async def test_eta_schedules_the_next_poll(self) -> None:
        server = FakeServer()
        sched = scheduler(server, eta_margin=0.05)
        server.add("t", 3.0)
        async with running(sched):
            result = await sched.wait("t")
            assert anyio.current_time() == pytest.approx(3.05)
        assert result.status is TaskStatus.SUCCEED
        assert server.times("t") == pytest.approx([0.0, 3.05])

    @pytest.mark.anyio
    async def test_eta_is_clamped_to_max_interval(self) -> None:
        server = FakeServer()
        sched = scheduler(server, max_interval=5.0, eta_margin=0.0)
        server.add("t", 12.0)
        async with running(sched):
            await sched.wait("t")
        assert server.times("t") == pytest.approx([0.0, 5.0, 10.0, 12.0])

    @pytest.mark.anyio
    async def test_backoff_without_eta(self) -> None:
        server = FakeServer(eta=False)
        sched = scheduler(server, backoff_initial=0.5, backoff_factor=2.0, max_interval=2.0)
        server.add("t", 4.0)
        async with running(sched):
            await sched.wait("t")
        # 0.5, 1, 2, then capped at 2
        assert server.times("t") == pytest.approx([0.0, 0.5, 1.5, 3.5, 5.5])

    @pytest.mark.anyio
    async def test_unknown_status_is_not_terminal(self) -> None:
        server = FakeServer()
        sched = scheduler(server, backoff_initial=0.5)
        server.add("t", 0.0, script=[TaskStatus.UNKNOWN, TaskStatus.UNKNOWN])
        async with running(sched):
            result = await sched.wait("t")
        assert result.status is TaskStatus.SUCCEED
        assert server.times("t") == pytest.approx([0.0, 0.5, 1.25])

    @pytest.mark.anyio
    async def test_hintless_wait_polls_at_once(self) -> None:
        server = FakeServer()
        sched = scheduler(server)
        server.add("done", 0.0)
        async with running(sched):
            await anyio.sleep(60)  # finished long ago
            start = anyio.current_time()
            await sched.wait("done")
        assert server.times("done") == [start]

    # ----------------------------------------------------------------- learning

    async def _submit_wave(
        self, server: FakeServer, sched: PollScheduler, jobs: list[tuple[str, float, float]]
    ) -> dict[str, float]:
        """Start (task_id, duration, cost) jobs at once; return delivery times."""
        delivered: dict[str, float] = {}

        async def one(task_id: str, duration: float, cost: float) -> None:
            submitted = server.add(task_id, duration)
            await sched.wait(task_id, hint=PollHint(submitted_at=submitted, cost=cost))
            delivered[task_id] = anyio.current_time()

        async with anyio.create_task_group() as tg:
            for job in jobs:
                tg.start_soon(one, *job)
        return delivered

    @pytest.mark.anyio
    async def test_learns_a_fixed_part_plus_a_per_cost_part(self) -> None:
        """Real GPU time: model load, decode, upload (fixed) plus steps x pixels (per cost).
        Neither raw durations nor seconds-per-cost predict it; the affine fit does."""
        server = FakeServer(eta=False)
        sched = scheduler(server)
        rng = random.Random(3)

        def duration(cost: float) -> float:
            return 1.0 + 0.02 * cost + rng.uniform(-0.02, 0.02)

        def jobs(prefix: str, n: int) -> list[tuple[str, float, float]]:
            costs = [rng.choice([10.0, 25.0, 50.0, 75.0, 100.0]) for _ in range(n)]
            return [(f"{prefix}{i}", duration(c), c) for i, c in enumerate(costs)]

        async with running(sched):
            await self._submit_wave(server, sched, jobs("warm", 60))
            for cost in (10.0, 50.0, 100.0):
                predicted = sched.predict_first_poll(cost=cost)
                assert predicted is not None
                assert predicted == pytest.approx(1.0 + 0.02 * cost, abs=0.08)
            wave = jobs("t", 100)
            delivered = await self._submit_wave(server, sched, wave)
        polls = [server.polls(task_id) for task_id, _, _ in wave]
        late = [delivered[t] - server.completed_at(t) for t, _, _ in wave]
        assert sum(polls) / len(polls) <= 1.3
        assert p95(late) <= 0.2

    @pytest.mark.anyio
    async def test_debug_info_later_than_observed_is_not_learned(self) -> None:
        """A server clock that claims a task finished after we saw it finished is wrong."""
        server = FakeServer(eta=False)
        sched = scheduler(server, warmup_samples=1, learning_window=1)
        async with running(sched):
            submitted = server.add("t", 1.0)
            server.tasks["t"].duration = 1.0
            await anyio.sleep(1.5)
            real = server.answer

            def skewed(task_id: str) -> TaskResult:
                result = real(task_id)  # completion stamped 30 s in the future
                info = attrs.evolve(result.extra.debug_info, complete_time_ms=EPOCH_MS + 31_500)
                return attrs.evolve(result, extra=attrs.evolve(result.extra, debug_info=info))

            server.answer = skewed  # type: ignore[method-assign]
            await sched.wait("t", hint=PollHint(submitted_at=submitted, cost=1.0))
        # what was seen (done by 1.5 s) bounds it, not the server's 31.5 s
        assert sched.stats.duration_samples == 1
        assert sched.stats.duration_p50 == pytest.approx(1.5)

    @pytest.mark.anyio
    async def test_whole_second_etas_split_the_last_second(self) -> None:
        server = FakeServer(whole=True)
        sched = scheduler(server, eta_margin=0.05)
        async with running(sched):
            for i in range(5):  # five whole-second etas in a row: the server rounds up
                server.add(f"warm{i}", 0.2)
                await sched.wait(f"warm{i}")
            start = server.add("t", 2.3)
            await sched.wait("t")
        times = [t - start for t in server.times("t")]
        # eta 3 at 0: the task ends within (2, 3]; poll at 2.5 (done), not at 3.05
        assert times == pytest.approx([0.0, 2.5])

    @pytest.mark.anyio
    async def test_exact_etas_are_not_split(self) -> None:
        server = FakeServer()
        sched = scheduler(server, eta_margin=0.05)
        async with running(sched):
            start = server.add("t", 2.3)
            await sched.wait("t")
        assert [t - start for t in server.times("t")] == pytest.approx([0.0, 2.35])

    @pytest.mark.anyio
    async def test_learns_cost_proportional_durations(self) -> None:
        server = FakeServer()
        sched = scheduler(server)
        rng = random.Random(1)

        def jobs(prefix: str, n: int) -> list[tuple[str, float, float]]:
            out = []
            for i in range(n):
                cost = rng.choice([20.0, 30.0, 40.0, 50.0, 60.0])
                out.append((f"{prefix}{i}", 0.05 * cost * rng.uniform(0.97, 1.03), cost))
            return out

        async with running(sched):
            await self._submit_wave(server, sched, jobs("warm", 40))
            stats = sched.stats
            assert stats.probes == 20  # cold start: the first tasks were probed for their eta
            assert stats.seconds_per_cost_p50 == pytest.approx(0.05, rel=0.03)
            short, long = sched.predict_first_poll(cost=20.0), sched.predict_first_poll(cost=60.0)
            assert short is not None
            assert long is not None
            assert long / short == pytest.approx(3.0, rel=0.01)  # the cost model was chosen
            assert 1.0 <= short <= 1.1

            wave = jobs("t", 200)
            delivered = await self._submit_wave(server, sched, wave)
        polls = [server.polls(task_id) for task_id, _, _ in wave]
        assert sum(polls) / len(polls) <= 1.3
        lags = [delivered[t] - server.completed_at(t) for t, _, _ in wave]
        assert min(lags) >= 0
        assert p95(lags) <= 0.5

    @pytest.mark.anyio
    async def test_learns_without_eta(self) -> None:
        # Novita's image tasks report eta 0: the learned durations of the slower
        # tasks then place the poll after a miss (instead of a blind backoff).
        server = FakeServer(eta=False)
        sched = scheduler(server)
        rng = random.Random(5)

        def jobs(prefix: str, n: int) -> list[tuple[str, float, float]]:
            out = []
            for i in range(n):
                cost = rng.choice([20.0, 30.0, 40.0, 50.0, 60.0])
                out.append((f"{prefix}{i}", 0.05 * cost * rng.uniform(0.95, 1.05), cost))
            return out

        async with running(sched):
            await self._submit_wave(server, sched, jobs("warm", 60))
            wave = jobs("t", 200)
            delivered = await self._submit_wave(server, sched, wave)
        polls = [server.polls(task_id) for task_id, _, _ in wave]
        assert sum(polls) / len(polls) <= 1.3
        lags = [delivered[t] - server.completed_at(t) for t, _, _ in wave]
        assert p95(lags) <= 0.3

    @pytest.mark.anyio
    async def test_latency_guard_when_cost_predicts_nothing(self) -> None:
        server = FakeServer()
        sched = scheduler(server)
        rng = random.Random(2)

        def jobs(prefix: str, n: int) -> list[tuple[str, float, float]]:
            return [(f"{prefix}{i}", rng.uniform(1.0, 3.0), rng.uniform(20, 60)) for i in range(n)]

        async with running(sched):
            await self._submit_wave(server, sched, jobs("warm", 60))
            first = sched.predict_first_poll(cost=40.0)
            assert first is not None
            assert first == sched.predict_first_poll()  # cost is ignored: it predicts nothing
            assert 1.0 <= first <= 1.5  # 5 % quantile (~1.1 s) + latency budget (0.4 s)
            wave = jobs("t", 200)
            delivered = await self._submit_wave(server, sched, wave)
        lags = [delivered[t] - server.completed_at(t) for t, _, _ in wave]
        assert p95(lags) <= 0.5

    @pytest.mark.anyio
    async def test_without_latency_guard_first_poll_aims_at_the_quantile(self) -> None:
        server = FakeServer()
        sched = scheduler(server, latency_budget=None, first_poll_quantile=0.8)
        rng = random.Random(3)
        jobs = [(f"t{i}", rng.uniform(1.0, 3.0), 1.0) for i in range(150)]
        async with running(sched):
            await self._submit_wave(server, sched, jobs)
        first = sched.predict_first_poll()
        assert first is not None
        assert 2.4 <= first <= 3.0

    @pytest.mark.anyio
    async def test_cold_tasks_wait_for_the_first_samples(self) -> None:
        server = FakeServer()
        sched = scheduler(server, warmup_samples=3, probe_delay=0.25, first_poll_delay=1.0)
        jobs = [(f"t{i}", 2.0, 1.0) for i in range(10)]
        async with running(sched):
            await self._submit_wave(server, sched, jobs)
        probes = [t for t, _, _ in jobs if server.times(t)[0] == pytest.approx(0.25)]
        assert len(probes) == 3
        assert sched.stats.probes == 3
        for task_id, _, _ in jobs:
            if task_id not in probes:
                # re-planned from the probes' eta instead of the cold 1.0 s: one poll
                assert server.polls(task_id) == 1
                assert server.times(task_id)[0] >= 2.0

    @pytest.mark.anyio
    async def test_no_probes_when_the_server_gives_no_eta(self) -> None:
        server = FakeServer(eta=False)
        sched = scheduler(server, warmup_samples=3, first_poll_delay=1.0)
        jobs = [(f"t{i}", 2.0, 1.0) for i in range(10)]
        async with running(sched):
            await self._submit_wave(server, sched, jobs)
        assert sched.stats.probes <= 3  # probing stopped at the first eta-less answer
        assert sched.stats.duration_samples == 10  # learned from the timestamps instead

    # ----------------------------------------------------------------- limiter

    @pytest.mark.anyio
    async def test_concurrency_limit_is_respected(self) -> None:
        server = FakeServer(latency=0.1)
        sched = scheduler(server, limit=4)
        for i in range(50):
            server.add(f"t{i}", 1.0)
        async with running(sched), anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(sched.wait, f"t{i}")
        assert server.max_in_flight == 4
        assert sched.stats.max_in_flight == 4
        assert sched.stats.tasks_succeeded == 50

    @pytest.mark.anyio
    async def test_a_thousand_waiters(self) -> None:
        server = FakeServer(latency=0.02)
        sched = scheduler(server, limit=16)
        rng = random.Random(4)
        results: list[TaskResult] = []

        async def one(i: int) -> None:
            task_id = f"t{i % 800}"  # 200 tasks have two waiters
            if task_id not in server.tasks:
                submitted = server.add(task_id, rng.uniform(1.0, 3.0))
                hint = PollHint(submitted_at=submitted, cost=1.0)
            else:
                hint = None
            results.append(await sched.wait(task_id, hint=hint))

        async with running(sched):
            async with anyio.create_task_group() as tg:
                for i in range(1000):
                    tg.start_soon(one, i)
            assert sched.tracked == 0
            assert sched.stats.polls_by_task == {}
            assert sched.stats.in_flight == 0
        assert len(results) == 1000
        assert all(r.status is TaskStatus.SUCCEED for r in results)
        assert server.max_in_flight <= 16
        assert sched.stats.tasks_succeeded == 800
        assert sum(sched.stats.poll_histogram.values()) == 800
        assert sched.stats.polls_total == len(server.calls)
        assert sched.stats.waits == 1000

    @pytest.mark.anyio
    async def test_scheduler_work_per_task_does_not_grow_with_tracked_tasks(self) -> None:
        # n tasks tracked at once: each wait() and each poll costs the scheduler a
        # bounded number of heap operations, however many other tasks are tracked.
        async def work(n: int) -> tuple[int, int, int]:
            server = FakeServer(latency=0.01)
            sched = scheduler(server, limit=16)
            rng = random.Random(6)

            async def one(i: int) -> None:
                submitted = server.add(f"t{i}", rng.uniform(1.0, 3.0))
                await sched.wait(f"t{i}", hint=PollHint(submitted_at=submitted, cost=1.0))

            async with running(sched):
                async with anyio.create_task_group() as tg:
                    for i in range(n):
                        tg.start_soon(one, i)
                assert sched.tracked == 0
            stats = sched.stats
            assert stats.tasks_succeeded == n
            assert stats.polls_total == len(server.calls)
            return stats.waits, stats.heap_pushes, stats.polls_total

        small, large = await work(100), await work(1000)
        for n, (waits, pushes, polls) in ((100, small), (1000, large)):
            assert waits == n
            # at most: one push to track a task, re-plans of its cold first poll when
            # the learner knows 1, 2, 4, 8, 16 durations and when it warms up, and one
            # reschedule per poll answered
            replans = PollPolicy().warmup_samples.bit_length() + 1
            assert pushes <= (1 + replans) * n + polls
        # per task, ten times the tasks tracked cost the scheduler about the same (more
        # of them are still cold when the learner's first durations re-plan them)
        assert large[1] / 1000 <= 1.5 * small[1] / 100

    # ----------------------------------------------------------------- deadlines

    @pytest.mark.anyio
    async def test_deadline_raises_with_last_result_and_polling_stops(self) -> None:
        server = FakeServer()
        sched = scheduler(server, max_interval=1.0)
        server.add("t", 100.0)
        async with running(sched):
            with pytest.raises(TaskTimeoutError) as info:
                await sched.wait("t", timeout=2.5)
            assert anyio.current_time() == pytest.approx(2.5)
            polls = server.polls("t")
            await anyio.sleep(30)
            assert server.polls("t") == polls  # nothing after the deadline
            assert sched.tracked == 0
        err = info.value
        assert err.task_id == "t"
        assert err.timeout == 2.5
        assert err.last_result is not None
        assert err.last_result.status is TaskStatus.PROCESSING
        assert sched.stats.timeouts == 1
        assert sched.stats.tasks_abandoned == 1

    @pytest.mark.anyio
    async def test_deadline_cancels_a_poll_in_flight(self) -> None:
        server = FakeServer(latency=5.0)
        sched = scheduler(server)
        server.add("t", 1.0)
        async with running(sched):
            with pytest.raises(TaskTimeoutError) as info:
                await sched.wait("t", timeout=0.5)
            assert anyio.current_time() == pytest.approx(0.5)
            await trio.testing.wait_all_tasks_blocked()  # the worker sees its cancellation
            assert anyio.current_time() == pytest.approx(0.5)
            assert server.cancelled == 1
            assert sched.stats.in_flight == 0
        assert info.value.last_result is None
        assert sched.stats.polls_cancelled == 1

    @pytest.mark.anyio
    async def test_the_longer_deadline_keeps_the_task_alive(self) -> None:
        server = FakeServer()
        sched = scheduler(server)
        server.add("t", 3.0)
        outcomes: dict[str, Any] = {}

        async def waiter(name: str, timeout: float | None) -> None:
            try:
                outcomes[name] = await sched.wait("t", timeout=timeout)
            except TaskTimeoutError as exc:
                outcomes[name] = exc

        async with running(sched), anyio.create_task_group() as tg:
            tg.start_soon(waiter, "short", 1.0)
            tg.start_soon(waiter, "long", None)
        assert isinstance(outcomes["short"], TaskTimeoutError)
        assert outcomes["long"].status is TaskStatus.SUCCEED
        assert server.times("t") == pytest.approx([0.0, 3.05])  # one shared sequence

    @pytest.mark.anyio
    async def test_a_waiter_deadline_mid_poll_keeps_the_shared_poll(self) -> None:
        # One waiter's deadline falls while the shared poll is in flight: the
        # poll goes on for the other waiter, nothing is cancelled or repeated.
        server = FakeServer(latency=0.5)
        sched = scheduler(server)
        server.add("t", 3.0)
        outcomes: list[Any] = []

        async def waiter(delay: float, timeout: float | None) -> None:
            await anyio.sleep(delay)
            try:
                outcomes.append(await sched.wait("t", timeout=timeout))
            except TaskTimeoutError as exc:
                outcomes.append(exc)

        async with running(sched), anyio.create_task_group() as tg:
            tg.start_soon(waiter, 0.0, 3.2)  # leaves while the poll sent at 3.05 is in flight
            tg.start_soon(waiter, 0.1, None)
        assert isinstance(outcomes[0], TaskTimeoutError)
        assert outcomes[1].status is TaskStatus.SUCCEED
        assert server.cancelled == 0
        assert sched.stats.polls_cancelled == 0
        assert server.times("t") == pytest.approx([0.0, 3.05])

    @pytest.mark.anyio
    async def test_zero_timeout(self) -> None:
        server = FakeServer()
        sched = scheduler(server)
        server.add("t", 1.0)
        async with running(sched):
            with pytest.raises(TaskTimeoutError):
                await sched.wait("t", timeout=0)
            assert sched.tracked == 0

    @pytest.mark.anyio
    async def test_invalid_timeout(self) -> None:
        sched = scheduler(FakeServer())
        async with running(sched):
            with pytest.raises(InvalidRequestError):
                await sched.wait("t", timeout=-1)
            with pytest.raises(InvalidRequestError):
                await sched.wait("t", timeout=float("nan"))
            assert sched.tracked == 0

    @pytest.mark.anyio
    async def test_outer_cancellation_is_not_turned_into_a_timeout(self) -> None:
        server = FakeServer()
        sched = scheduler(server)
        server.add("t", 100.0)
        async with running(sched):
            with anyio.move_on_after(1.0) as scope:
                await sched.wait("t", timeout=1.0)  # same instant as the outer cancel
        assert scope.cancelled_caught
        assert sched.stats.timeouts == 0

    # ----------------------------------------------------------------- cancellation

    @pytest.mark.anyio
    async def test_cancelled_waiter_stops_its_task_but_not_a_shared_one(self) -> None:
        server = FakeServer()
        sched = scheduler(server, max_interval=1.0)
        server.add("alone", 10.0)
        server.add("shared", 10.0)
        shared_result: list[TaskResult] = []

        async def keep_waiting() -> None:
            shared_result.append(await sched.wait("shared"))

        async with running(sched), anyio.create_task_group() as tg:
            tg.start_soon(keep_waiting)
            async with anyio.create_task_group() as doomed:
                doomed.start_soon(sched.wait, "alone")
                doomed.start_soon(sched.wait, "shared")
                await anyio.sleep(2.5)
                doomed.cancel_scope.cancel()
            alone_polls = server.polls("alone")
            assert sched.tracked == 1
        assert server.polls("alone") == alone_polls  # stopped at the cancellation
        assert server.times("alone")[-1] <= 2.5
        assert shared_result[0].status is TaskStatus.SUCCEED
        assert server.times("shared")[-1] >= 10.0

    @pytest.mark.anyio
    async def test_a_waiter_cancelled_mid_poll_keeps_the_shared_poll(self) -> None:
        server = FakeServer(latency=0.4)
        sched = scheduler(server)
        server.add("t", 2.0)
        got: list[TaskResult] = []

        async def other() -> None:
            await anyio.sleep(0.1)
            got.append(await sched.wait("t"))

        async with running(sched), anyio.create_task_group() as tg:
            tg.start_soon(other)
            with anyio.move_on_after(0.2):  # cancelled during the first poll (0 to 0.4)
                await sched.wait("t")
        assert server.cancelled == 0
        assert got[0].status is TaskStatus.SUCCEED
        # the first answer (at 0.4, eta 1.6) served the remaining waiter
        assert server.times("t") == pytest.approx([0.0, 2.05])
        assert server.max_in_flight_per_task == 1

    @pytest.mark.anyio
    async def test_each_waiter_returns_when_its_own_task_is_done(self) -> None:
        server = FakeServer()
        sched = scheduler(server, min_interval=0.0)
        returned: dict[str, float] = {}

        async def one(task_id: str, duration: float) -> None:
            submitted = server.add(task_id, duration)
            await sched.wait(task_id, hint=PollHint(submitted_at=submitted))
            returned[task_id] = anyio.current_time()

        async with running(sched), anyio.create_task_group() as tg:
            for i, duration in enumerate([0.3, 5.0, 1.0, 2.0]):
                tg.start_soon(one, f"t{i}", duration)
        assert sorted(returned, key=returned.__getitem__) == ["t0", "t2", "t3", "t1"]
        for task_id, at in returned.items():
            assert at - server.completed_at(task_id) <= 0.1

    # ----------------------------------------------------------------- failures

    @pytest.mark.anyio
    async def test_failed_task_raises_to_every_waiter(self) -> None:
        server = FakeServer()
        sched = scheduler(server)
        server.add("t", 1.0, fail=True)
        errors: list[TaskFailedError] = []

        async def waiter() -> None:
            with pytest.raises(TaskFailedError) as info:
                await sched.wait("t")
            errors.append(info.value)

        async with running(sched), anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.start_soon(waiter)
        assert len(errors) == 2
        for err in errors:
            assert err.task_id == "t"
            assert err.reason == "emulated failure"
            assert err.result.status is TaskStatus.FAILED
        assert server.polls("t") == 2
        assert sched.stats.tasks_failed == 1
        assert sched.stats.tasks_succeeded == 0

    @pytest.mark.anyio
    async def test_server_task_failed_500_is_terminal(self) -> None:
        server = FakeServer()
        sched = scheduler(server)
        server.add("t", 1.0)
        server.errors["t"] = [ServerError("task failed", status_code=500, reason="TASK_FAILED")]
        async with running(sched):
            with pytest.raises(TaskFailedError) as info:
                await sched.wait("t")
        assert info.value.result.status is TaskStatus.FAILED
        assert server.polls("t") == 1

    @pytest.mark.anyio
    async def test_task_not_found_within_grace_keeps_polling(self) -> None:
        server = FakeServer()
        sched = scheduler(server, not_found_grace=10.0)
        submitted = server.add("t", 3.0, visible_at=2.0)
        async with running(sched):
            result = await sched.wait("t", hint=PollHint(submitted_at=submitted))
        assert result.status is TaskStatus.SUCCEED
        assert sched.stats.not_found_retries >= 1

    @pytest.mark.anyio
    async def test_task_not_found_after_grace_raises_to_every_waiter(self) -> None:
        server = FakeServer()
        sched = scheduler(server, not_found_grace=3.0, max_interval=1.0)
        errors: list[BaseException] = []

        async def waiter() -> None:
            try:
                await sched.wait("ghost")
            except NotFoundError as exc:
                errors.append(exc)

        async with running(sched):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                tg.start_soon(waiter)
            assert 3.0 <= anyio.current_time() <= 4.0
            assert sched.tracked == 0
        assert len(errors) == 2
        assert sched.stats.tasks_errored == 1

    @pytest.mark.anyio
    async def test_transient_errors_keep_polling(self, caplog: pytest.LogCaptureFixture) -> None:
        server = FakeServer()
        sched = scheduler(server)
        server.add("t", 0.0)
        server.errors["t"] = [
            APIConnectionError("connection reset"),
            ServerError("bad gateway", status_code=502),
            MalformedResponseError("not JSON"),
            RateLimitError("slow down", status_code=429),
        ]
        with caplog.at_level(logging.WARNING, logger="novita_async"):
            async with running(sched):
                result = await sched.wait("t")
        assert result.status is TaskStatus.SUCCEED
        assert server.polls("t") == 5
        assert sched.stats.transient_errors == 4
        assert sum("polling task t failed" in r.getMessage() for r in caplog.records) == 4

    @pytest.mark.anyio
    async def test_identical_malformed_answers_end_the_task(self) -> None:
        server = FakeServer()
        sched = scheduler(server)  # max_malformed=5
        server.add("t", 0.0)  # a good answer would say SUCCEED
        bad = MalformedResponseError("not JSON", body="<html>502</html>")
        server.errors["t"] = [bad] * 10
        async with running(sched):
            with pytest.raises(MalformedResponseError) as info:
                await sched.wait("t", timeout=None)
            assert sched.tracked == 0
            polls = server.polls("t")
            await anyio.sleep(60)
            assert server.polls("t") == polls  # polling stopped
        assert info.value.body == "<html>502</html>"
        assert polls == 5
        assert sched.stats.tasks_errored == 1

    @pytest.mark.anyio
    async def test_differing_malformed_answers_keep_polling(self) -> None:
        server = FakeServer()
        sched = scheduler(server, max_malformed=3)
        server.add("t", 0.0)
        server.errors["t"] = [MalformedResponseError("not JSON", body=body) for body in "aabbaabb"]
        async with running(sched):
            result = await sched.wait("t", timeout=None)
        assert result.status is TaskStatus.SUCCEED
        assert server.polls("t") == 9

    @pytest.mark.anyio
    async def test_a_good_answer_resets_the_malformed_count(self) -> None:
        server = FakeServer(eta=False)
        sched = scheduler(server, max_malformed=3)
        server.add("t", 0.0, script=[TaskStatus.PROCESSING, TaskStatus.PROCESSING])
        bad = MalformedResponseError("not JSON", body="same")
        server.errors["t"] = [bad, bad, None, bad, bad, None, bad, bad]
        async with running(sched):
            result = await sched.wait("t", timeout=None)
        assert result.status is TaskStatus.SUCCEED
        assert server.polls("t") == 9

    @pytest.mark.anyio
    async def test_rate_limit_retry_after_pauses_every_poll(self) -> None:
        server = FakeServer()
        sched = scheduler(server)
        server.add("a", 0.5)
        server.add("b", 0.5)
        server.errors["a"] = [RateLimitError("slow down", retry_after=3.0, status_code=429)]
        async with running(sched), anyio.create_task_group() as tg:
            tg.start_soon(sched.wait, "a")
            await anyio.sleep(0.1)
            tg.start_soon(sched.wait, "b")  # due at once, but the pause holds it
        assert server.times("a") == pytest.approx([0.0, 3.0])
        assert server.times("b") == pytest.approx([3.0])
        assert sched.stats.rate_limit_pauses == 1

    @pytest.mark.anyio
    async def test_auth_error_propagates_to_every_waiter(self) -> None:
        server = FakeServer()
        sched = scheduler(server)
        server.add("t", 5.0)
        server.errors["t"] = [AuthenticationError("bad key", status_code=403)]
        errors: list[BaseException] = []

        async def waiter() -> None:
            try:
                await sched.wait("t")
            except AuthenticationError as exc:
                errors.append(exc)

        async with running(sched):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                tg.start_soon(waiter)
            assert sched.tracked == 0
        assert len(errors) == 2
        assert server.polls("t") == 1
        assert sched.stats.tasks_errored == 1


# --------------------------------------------------------------------------- tick model


class TestTickModel:
    @pytest.fixture
    def anyio_backend(self) -> tuple[str, dict[str, Any]]:
        return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}

    @pytest.mark.anyio
    async def test_every_due_task_is_polled_in_one_tick(self) -> None:
        server = FakeServer(latency=0.01)
        sched = scheduler(server, limit=8)
        for i in range(200):
            server.add(f"t{i}", 1.0)
        async with running(sched):
            async with anyio.create_task_group() as waiters:
                for i in range(200):
                    waiters.start_soon(sched.wait, f"t{i}")
                await anyio.sleep(0.5)
                assert sched.stats.polls_total == 200  # every task polled once
                ticks = sched.stats.ticks
            # all due again at eta + margin = 1.05: ONE tick starts their 200 polls
            assert sched.stats.ticks == ticks + 1
        stats = sched.stats
        assert stats.max_polls_per_tick == 200
        assert stats.polls_total == 400
        assert server.max_in_flight == 8  # concurrent, capped by the workers
        assert stats.max_in_flight == 8
        assert stats.tasks_succeeded == 200
        assert server.cancelled == 0
        assert {server.polls(f"t{i}") for i in range(200)} == {2}

    @pytest.mark.anyio
    async def test_tasks_due_within_the_coalesce_window_share_a_tick(self) -> None:
        async def run(coalesce: float) -> int:
            server = FakeServer()
            sched = scheduler(server, tick_coalesce=coalesce, eta_margin=0.05)
            for i in range(10):
                server.add(f"t{i}", 1.0 + 0.001 * i)  # due 1 ms apart
            async with running(sched):
                async with anyio.create_task_group() as waiters:
                    for i in range(10):
                        waiters.start_soon(sched.wait, f"t{i}")
                    await anyio.sleep(0.5)
                    ticks = sched.stats.ticks
                assert sched.stats.polls_total == 20
            return sched.stats.ticks - ticks

        assert await run(0.02) == 1
        assert await run(0.0) == 10

    @pytest.mark.anyio
    async def test_first_waiter_done_while_500_others_wait(self) -> None:
        server = FakeServer(latency=0.02)
        sched = scheduler(server, limit=16)
        rng = random.Random(7)
        server.add("first", 0.5)
        delivered: dict[str, float] = {}

        async def one(task_id: str) -> None:
            await sched.wait(task_id)
            delivered[task_id] = anyio.current_time()

        async with running(sched):
            async with anyio.create_task_group() as waiters:
                waiters.start_soon(one, "first")
                await joined(sched)
                for i in range(500):
                    server.add(f"t{i}", rng.uniform(1.0, 3.0))
                    waiters.start_soon(one, f"t{i}")
            assert sched.tracked == 0
            assert sched.stats.in_flight == 0
        assert len(delivered) == 501
        assert sched.stats.tasks_succeeded == 501
        # nobody starved: every task delivered soon after it finished
        lags = [delivered[t] - server.completed_at(t) for t in delivered]
        assert min(lags) >= 0
        assert max(lags) <= 0.5

    @pytest.mark.anyio
    async def test_last_waiter_leaving_mid_poll_drops_the_entry(self) -> None:
        server = FakeServer(latency=1.0)
        sched = scheduler(server)
        server.add("keep", 5.0)
        server.add("drop", 0.0)  # its answer would say SUCCEED
        async with running(sched), anyio.create_task_group() as tg:
            tg.start_soon(sched.wait, "keep")
            await anyio.sleep(0.1)
            with pytest.raises(TaskTimeoutError):
                await sched.wait("drop", timeout=0.3)
            assert sched.tracked == 1
            assert "drop" not in sched.stats.polls_by_task
            await trio.testing.wait_all_tasks_blocked()
            assert server.cancelled == 1  # its poll in flight was cancelled at once
            assert anyio.current_time() == pytest.approx(0.4)
        assert server.polls("drop") == 1
        assert server.cancelled == 1
        assert sched.stats.tasks_abandoned == 1
        assert sched.stats.tasks_succeeded == 1

    @pytest.mark.anyio
    async def test_answer_after_the_entry_left_is_ignored(self) -> None:
        server = FakeServer(latency=1.0)

        async def stubborn(task_id: str) -> TaskResult:
            with anyio.CancelScope(shield=True):  # answers despite the cancellation
                result = await server.fetch(task_id)
            return result

        sched = PollScheduler(stubborn, max_concurrent_polls=4, policy=PollPolicy())
        server.add("keep", 5.0)
        server.add("drop", 0.0)
        async with running(sched), anyio.create_task_group() as tg:
            tg.start_soon(sched.wait, "keep")
            await anyio.sleep(0.1)
            with pytest.raises(TaskTimeoutError):
                await sched.wait("drop", timeout=0.3)
            await anyio.sleep(2.0)  # the answer (SUCCEED) arrived meanwhile
            assert sched.stats.tasks_succeeded == 0
            assert sched.stats.poll_histogram == {}
            assert "drop" not in sched.stats.polls_by_task
        assert server.polls("drop") == 1
        assert sched.stats.tasks_succeeded == 1  # "keep" only

    @pytest.mark.anyio
    async def test_random_churn(self) -> None:
        server = FakeServer(latency=0.05)
        sched = scheduler(server, limit=8)
        rng = random.Random(11)
        outcomes: Counter[str] = Counter()

        async def one(i: int) -> None:
            await anyio.sleep(rng.uniform(0, 2))
            task_id = f"t{rng.randrange(120)}"
            if task_id not in server.tasks:
                server.add(task_id, rng.uniform(0.2, 3.0))
            timeout = rng.choice([None, None, 0.5, 1.0, 2.0])
            with anyio.move_on_after(rng.choice([0.3, 1.5, 100.0])):
                try:
                    await sched.wait(task_id, timeout=timeout)
                    outcomes["ok"] += 1
                    return
                except TaskTimeoutError:
                    outcomes["timeout"] += 1
                    return
            outcomes["cancelled"] += 1

        async with running(sched):
            async with anyio.create_task_group() as waiters:
                for i in range(300):
                    waiters.start_soon(one, i)
            # every waiter got its outcome, and nothing is left polling
            assert sched.tracked == 0
            assert sched.stats.polls_by_task == {}
            await trio.testing.wait_all_tasks_blocked()  # cancelled polls unwind
            assert sched.stats.in_flight == 0
            assert sum(server.in_flight.values()) == 0
            calls = len(server.calls)
            await anyio.sleep(60)
            assert len(server.calls) == calls  # no orphan polls
        assert sum(outcomes.values()) == 300
        assert min(outcomes["ok"], outcomes["timeout"], outcomes["cancelled"]) > 10
        assert server.max_in_flight_per_task == 1
        assert server.max_in_flight <= 8
        assert sched.stats.polls_total == len(server.calls)


# --------------------------------------------------------------------------- both backends


@pytest.mark.anyio
async def test_real_time_on_both_backends() -> None:
    server = FakeServer(latency=0.001)
    sched = scheduler(server, limit=4, min_interval=0.0, eta_margin=0.005)
    for i in range(20):
        server.add(f"t{i}", 0.02 + 0.002 * i)
    results: list[TaskResult] = []

    async def one(task_id: str) -> None:
        results.append(await sched.wait(task_id, timeout=10))

    async with running(sched), anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(one, f"t{i}")
            tg.start_soon(one, f"t{i}")  # two waiters each
    assert len(results) == 40
    assert all(r.status is TaskStatus.SUCCEED for r in results)
    assert server.max_in_flight <= 4
    assert server.max_in_flight_per_task == 1
    assert sched.stats.tasks_succeeded == 20
    assert sched.stats.polls_total == len(server.calls)


@pytest.mark.anyio
async def test_timeout_and_cancellation_on_both_backends() -> None:
    server = FakeServer()
    sched = scheduler(server, max_interval=0.01, min_interval=0.0)
    server.add("slow", 60.0)
    async with running(sched):
        with pytest.raises(TaskTimeoutError):
            await sched.wait("slow", timeout=0.05)
        with anyio.move_on_after(0.05):
            await sched.wait("slow")
        polls = server.polls("slow")
        await anyio.sleep(0.05)
        assert server.polls("slow") == polls
        assert sched.tracked == 0


@pytest.mark.anyio
async def test_wait_needs_the_loop_running() -> None:
    server = FakeServer()
    sched = scheduler(server)
    server.add("t", 0.0)
    with anyio.fail_after(5), pytest.raises(RuntimeError, match="not running"):
        await sched.wait("t")  # refused, not left hanging
    assert sched.stats.waits == 0
    async with running(sched):
        assert (await sched.wait("t")).status is TaskStatus.SUCCEED
    with anyio.fail_after(5), pytest.raises(RuntimeError, match="not running"):
        await sched.wait("t")  # ended: refused again
    assert server.polls("t") == 1
    assert sched.tracked == 0


@pytest.mark.anyio
async def test_one_loop_per_scheduler() -> None:
    sched = scheduler(FakeServer())
    async with running(sched):
        with pytest.raises(RuntimeError, match="already running"):
            await sched.run()
        assert sched.running
    async with running(sched):  # it may run again once stopped
        assert sched.running


@pytest.mark.anyio
async def test_stopping_the_loop_ends_every_wait() -> None:
    server = FakeServer(latency=1.0)
    sched = scheduler(server, limit=2)
    for i in range(4):
        server.add(f"t{i}", 60.0)
    errors: list[BaseException] = []

    async def waiter(task_id: str, timeout: float | None) -> None:
        try:
            await sched.wait(task_id, timeout=timeout)
        except Exception as exc:  # collected and checked below
            errors.append(exc)

    with anyio.fail_after(5):  # no waiter may hang
        async with anyio.create_task_group() as waiters, anyio.create_task_group() as loop:
            await loop.start(sched.run)
            for i in range(4):
                waiters.start_soon(waiter, f"t{i}", None)
            waiters.start_soon(waiter, "t0", 30.0)  # a second waiter of t0
            await joined(sched, 4)
            await anyio.sleep(0.02)  # two polls in flight now (for a second)
            assert sched.stats.in_flight == 2
            loop.cancel_scope.cancel()
    assert len(errors) == 5
    for exc in errors:
        assert type(exc) is NovitaError
        assert "closed" in str(exc)
    assert sorted(str(exc).rsplit(" ", 1)[-1] for exc in errors) == ["t0", "t0", "t1", "t2", "t3"]
    assert not sched.running
    assert sched.tracked == 0
    assert sched.stats.in_flight == 0
    assert sched.stats.polls_cancelled == 2
    assert server.cancelled == 2
    assert sched.stats.tasks_errored == 4


@pytest.mark.anyio
async def test_client_wait_without_async_with() -> None:
    from novita_async.testing import NovitaEmulator

    emu = NovitaEmulator(durations=(0.01, 0.02))
    client = emu.client(poll_policy=PollPolicy(min_interval=0.0))
    request = Txt2ImgRequest(model_name="m", prompt="a lighthouse")
    with pytest.raises(RuntimeError, match="async with") as info:
        await client.wait("abc", timeout=5)
    assert "lifespan" in str(info.value)
    with pytest.raises(RuntimeError, match="async with") as info:
        await client.txt2img(request, timeout=5)
    assert "lifespan" in str(info.value)
    with pytest.raises(RuntimeError, match="async with") as info:
        client.txt2img_many([request])
    assert "lifespan" in str(info.value)
    assert emu.tasks_created == 0
    # the plain HTTP calls work on a client that was never entered
    task_id = await client.submit_txt2img(request)
    result = await client.get_task_result(task_id)
    assert result.task.task_id == task_id
    assert emu.tasks_created == 1
    assert client.scheduler.stats.waits == 0
    async with client:  # entered, it waits
        done = await client.wait(task_id, timeout=10)
    assert done.status is TaskStatus.SUCCEED
    assert client.is_closed


@pytest.mark.anyio
async def test_client_txt2img_on_the_emulator() -> None:
    from novita_async.testing import NovitaEmulator

    emu = NovitaEmulator(durations=(0.02, 0.05))
    client = emu.client(poll_policy=PollPolicy(min_interval=0.0, probe_delay=0.005))
    request = Txt2ImgRequest(model_name="m", prompt="a lighthouse")
    results = []

    async def one() -> None:
        results.append(await client.txt2img(request, timeout=10))

    async with client, anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
    assert [r.status for r in results] == [TaskStatus.SUCCEED] * 5
    assert emu.tasks_created == 5
    assert sum(emu.polls.values()) == client.scheduler.stats.polls_total
    assert client.scheduler.stats.waits == 5


@pytest.mark.anyio
@pytest.mark.parametrize("field", ["submit_time_ms", "complete_time_ms"])
async def test_debug_info_times_too_large_for_a_float_are_not_a_duration(
    api: respx.MockRouter, field: str
) -> None:
    """A debug_info time of 400 digits (valid JSON, an int to the parser) is no epoch
    millisecond: the task's result is returned, the scheduler and the client live on."""
    body = copy.deepcopy(SPEC_RESULT_BODY)
    body["extra"]["debug_info"][field] = 10**400
    api.get(RESULT).mock(return_value=httpx.Response(200, json=body))
    client = AsyncNovita(KEY, transport=httpx.AsyncHTTPTransport())
    with anyio.fail_after(5):
        async with client:
            result = await client.wait(SPEC_TASK_ID, timeout=5)
            assert result.status is TaskStatus.SUCCEED
            assert client.scheduler.running
            again = await client.wait(SPEC_TASK_ID, timeout=5)  # the scheduler still serves
            assert again.status is TaskStatus.SUCCEED
    assert client.scheduler.stats.duration_samples == 0
    assert client.scheduler.stats.tasks_succeeded == 2


def fast_polling_client() -> AsyncNovita:
    """No retries in the transport, polls 10-20 ms apart: the scheduler's decisions alone."""
    return AsyncNovita(
        KEY,
        transport=httpx.AsyncHTTPTransport(),
        retry_policy=RetryPolicy(max_retries=0),
        poll_policy=PollPolicy(min_interval=0.01, max_interval=0.02, backoff_initial=0.01),
    )


@pytest.mark.anyio
async def test_a_task_failed_500_ends_the_wait_whatever_the_reason_case(
    api: respx.MockRouter,
) -> None:
    """The transport reads Novita's reasons case-blind (a 500 ``task_failed`` is not
    retried: the task failed); the scheduler must too, not poll that task forever."""
    body = {"code": 500, "reason": "task_failed", "message": "out of memory", "metadata": {}}
    route = api.get(RESULT).mock(return_value=httpx.Response(500, json=body))
    client = fast_polling_client()
    with anyio.fail_after(5):
        async with client:
            with pytest.raises(TaskFailedError) as info:
                await client.wait(SPEC_TASK_ID)
    assert info.value.reason == "out of memory"
    assert route.call_count == 1
    assert client.scheduler.stats.tasks_failed == 1


@pytest.mark.anyio
async def test_a_lowercase_task_not_found_gets_the_grace_too(api: respx.MockRouter) -> None:
    body = {"code": 404, "reason": "task_not_found", "message": "", "metadata": {}}
    route = api.get(RESULT).mock(
        side_effect=[httpx.Response(404, json=body), httpx.Response(200, json=SPEC_RESULT_BODY)]
    )
    client = fast_polling_client()
    with anyio.fail_after(5):
        async with client:
            result = await client.wait(SPEC_TASK_ID)
    assert result.status is TaskStatus.SUCCEED
    assert route.call_count == 2
    assert client.scheduler.stats.not_found_retries == 1


@pytest.mark.anyio
async def test_closing_the_client_mid_polls_ends_every_wait_with_a_novita_error() -> None:
    """On asyncio the client's task group is cancelled by its host task, a loop turn after
    ``aclose`` marks the client closed: a poll starting in that turn must not end its wait
    with ``RuntimeError("this AsyncNovita client is closed")`` (README: closing ends every
    pending wait with a NovitaError)."""

    def running_task(request: httpx.Request) -> httpx.Response:
        task = {"task_id": request.url.params["task_id"], "status": "TASK_STATUS_PROCESSING"}
        return httpx.Response(200, json={"task": task})

    errors: list[Exception] = []
    for _ in range(5):  # polls run back to back: some start in that turn
        client = AsyncNovita(
            KEY,
            transport=httpx.MockTransport(running_task),
            poll_policy=PollPolicy(min_interval=0.0, max_interval=0.001, backoff_initial=0.001),
        )

        async def waiter(client: AsyncNovita, task_id: str) -> None:
            try:
                await client.wait(task_id)
            except Exception as exc:  # collected and checked below
                errors.append(exc)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg, client:
                for i in range(16):
                    tg.start_soon(waiter, client, f"t{i}")
                await joined(client.scheduler, 16)  # (a wait after the close is refused)
                await anyio.sleep(0.02)
    assert len(errors) == 5 * 16
    assert {type(exc) for exc in errors} == {NovitaError}
    assert all("closed" in str(exc) for exc in errors)


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="min_interval"):
        PollPolicy(min_interval=2.0, max_interval=1.0)
    with pytest.raises(ValueError):
        PollPolicy(first_poll_quantile=1.0)
    with pytest.raises(ValueError):
        PollPolicy(latency_budget=-1.0)
    with pytest.raises(ValueError):
        PollPolicy(warmup_samples=0)
    with pytest.raises(ValueError, match="warmup_samples"):
        PollPolicy(warmup_samples=30, learning_window=10)
    with pytest.raises(ValueError):
        PollPolicy(max_malformed=0)
    assert PollPolicy(latency_budget=None).latency_budget is None
    with pytest.raises(ValueError):
        PollScheduler(FakeServer().fetch, max_concurrent_polls=0, policy=PollPolicy())


@pytest.mark.anyio
async def test_a_thousand_waiters_leave_no_task_behind(anyio_backend: str) -> None:
    server = FakeServer(latency=0.001)
    sched = scheduler(server, limit=16, min_interval=0.0, eta_margin=0.01)
    rng = random.Random(3)
    for i in range(1000):
        server.add(f"t{i}", rng.uniform(0.05, 0.3))
    results: list[TaskResult] = []
    before = asyncio.all_tasks() if anyio_backend == "asyncio" else set()

    async def one(task_id: str) -> None:
        results.append(await sched.wait(task_id, timeout=30))

    async with running(sched):
        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(one, f"t{i}")
        assert sched.tracked == 0
    assert len(results) == 1000
    assert all(server.polls(f"t{i}") >= 1 for i in range(1000))
    assert sched.stats.tasks_succeeded == 1000
    assert sched.stats.max_polls_per_tick > 100  # the first tick served the whole wave
    assert sched.stats.ticks < sched.stats.polls_total
    assert server.max_in_flight <= 16
    if anyio_backend == "asyncio":
        assert asyncio.all_tasks() == before  # the loop and its workers ended with run()
    else:
        assert trio.lowlevel.current_task().child_nurseries == []


def test_a_task_just_past_nearly_every_sample_is_polled_at_their_end() -> None:
    """Slower than 98 % of the samples but not than all: the next poll is at the
    samples' end (extrapolated by one spacing), not a blind backoff; past every
    sample (a stuck task) the learner has no time to offer and the scheduler backs off."""
    learner = Learner(window=256, warmup=20, quantile=0.9, latency_budget=0.4)
    for i in range(100):
        learner.add(2.0 + i * 0.002, None)  # 2.000 ... 2.198 s
    after = learner.next_poll(2.197, None)
    assert after is not None
    assert 2.197 < after <= 2.21
    assert learner.next_poll(2.5, None) is None


def test_a_cold_learner_scales_the_first_finishers_by_cost_only_when_told() -> None:
    """Before it is warm, what a cold first poll goes by: the 5 % quantile of the
    durations, and for a task of some cost at least what the samples' seconds per cost
    (or, with a fixed part, their line) give at that cost; a cost past every sampled one
    counts as the dearest sampled unless durations are known to grow with cost."""
    learner = Learner(window=256, warmup=20, quantile=0.9, latency_budget=0.4)
    assert learner.early(10.0) is None  # nothing known yet
    for cost, seconds in ((20.0, 1.0), (30.0, 1.5), (40.0, 2.0)):  # 50 ms per unit
        learner.add(seconds, cost)
    assert learner.early(None) == pytest.approx(0.6)  # below the fastest: few samples
    assert learner.early(40.0) == pytest.approx(2.0)
    assert learner.early(80.0) == pytest.approx(2.0)  # capped at the dearest sampled
    assert learner.early(80.0, scales=True) == pytest.approx(4.0)
    fixed = Learner(window=256, warmup=20, quantile=0.9, latency_budget=0.4)
    for cost in (20.0, 30.0, 40.0):
        fixed.add(0.9 + cost / 30, cost)  # a fixed 0.9 s: seconds per cost falls with cost
    # seconds per cost would say 9.3 s at cost 200; the line says 7.57 s
    assert fixed.early(200.0, scales=True) == pytest.approx(0.9 + 200 / 30)
    varied = Learner(window=256, warmup=20, quantile=0.9, latency_budget=0.4)
    for cost, residual in ((20.0, 0.1), (30.0, -0.2), (40.0, 0.1)):  # the line: 0.9 + c / 30
        varied.add(0.9 + cost / 30 + residual, cost)
    # durations grow with cost: the line plus the largest residual (the k-th fastest of
    # the cohort), not the smallest (the fastest task's alone)
    assert varied.early(35.0, scales=True) == pytest.approx(0.9 + 35 / 30 + 0.1)
    assert varied.early(35.0) <= 0.9 + 35 / 30 - 0.2 + 1e-9


def test_past_every_sample_a_task_with_many_peers_as_old_is_polled_steadily() -> None:
    """Past every learned duration, a task alone (a stuck one) backs off 0.5, 0.75,
    1.125 s (with 20 samples it was polled every 0.2 s: their 98 % was never reached);
    one of a burst whose peers are as old (the samples are only the first finishers) is
    polled every 2 x latency_budget, or a quarter of its age if longer (submitted at
    clock 0.0, which the age once took for "no submission time")."""
    from novita_async._entry import Entry
    from novita_async._plan import Planner
    from novita_async._policy import PollStats

    def gaps(peers: int) -> list[float]:
        planner = Planner(PollPolicy(), PollStats())
        for _ in range(20):
            planner.learner.add(1.0, None)  # warm: every task took 1 s
        entries = []
        for i in range(peers + 1):
            entry = Entry(f"t{i}", 0.0, planner.policy.backoff_initial)
            entry.absorb(PollHint(submitted_at=0.0), 0.0)
            planner.first(entry)
            entries.append(entry)
        task = entries[-1]
        running = TaskResult(task=Task(task_id=task.task_id, status=TaskStatus.PROCESSING))
        out = []
        for now in (2.0, 3.0, 4.0):
            out.append(_answered_at(planner, task, running, now) - now)
        for entry in entries:
            planner.forget(entry)
        assert len(planner.peers) == 0
        return out

    assert gaps(0) == pytest.approx([0.5, 0.75, 1.125])
    assert gaps(19) == pytest.approx([0.8, 0.8, 1.0])  # at 4 s old, a quarter of its age
    assert gaps(18) == pytest.approx([0.5, 0.75, 1.125])  # 19 running: not a burst


def _answered_at(planner: Any, entry: Any, result: TaskResult, now: float) -> float:
    """``planner.answered`` at virtual time ``now``; returns the next poll's time."""

    async def main() -> float:
        await trio.sleep_until(now)
        planner.answered(entry, result, now)
        return float(entry.next_at)

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_duration_is_learnt_once_its_older_peers_are_done() -> None:
    """A burst's fastest tasks finish first: their durations wait until (nearly) every
    task submitted before theirs has finished, so what is learnt is whole cohorts. One
    straggler (up to 2 % of the running tasks) holds nothing back, and past its limit
    the oldest held duration is learnt (stuck tasks must not stop all learning). As the
    planner does, each task is offered its duration, then discarded (it stopped)."""
    from novita_async._learn import Peers

    peers = Peers(limit=3)
    for submitted in range(100):
        peers.add(float(submitted))
    assert peers.as_old(9.0) == 10

    def ended(submitted: float, seconds: float, cost: float | None = None) -> list[Any]:
        learnt = peers.offer(submitted, seconds, cost)
        return learnt + peers.discard(submitted)

    assert ended(1.0, 1.5) == [(1.5, None)]  # one older task runs (2 % of 100): learnt now
    assert ended(2.0, 1.6) == [(1.6, None)]  # one (task 0) of 99 still: learnt now
    assert ended(50.0, 0.5, 2.0) == []  # 48 older tasks run: held back
    assert ended(30.0, 0.7) == []
    assert ended(60.0, 0.4) == []
    assert ended(70.0, 0.3) == [(0.7, None)]  # a fourth: the oldest is learnt
    assert ended(61.0, 0.2) == [(0.5, 2.0)]
    assert peers.held == 3  # tasks 60, 61 and 70
    released = []
    for submitted in range(58):
        released += peers.discard(float(submitted))
    assert released == []  # task 60 still has two older peers running (58 and 59)
    released += peers.discard(58.0)  # one straggler holds nothing back: 60, then 61
    assert released == [(0.4, None), (0.2, None)]
    assert peers.discard(59.0) == []
    assert peers.held == 1  # task 70: 62 to 69 still run
    assert len(peers) == 37


def test_tasks_submitted_at_one_instant_are_each_others_peers() -> None:
    """A coarse clock (Windows' before Python 3.13: 15.6 ms; trio's MockClock) gives a
    burst's tasks one timestamp: the first of them to finish are still its fastest, held
    until (nearly) all of that instant have finished (before, none of them counted as
    older than another: every first finisher was learnt at once, and the tasks still
    running looked slower than all of them)."""
    from novita_async._learn import Peers

    peers = Peers(limit=100)
    for _ in range(50):
        peers.add(5.0)
    peers.add(6.0)
    assert peers.offer(5.0, 1.0, None) == []  # 49 others of its instant still run
    released = peers.discard(5.0)
    assert peers.offer(6.0, 0.9, None) == []  # 49 older ones run
    released += peers.discard(6.0)
    for _ in range(47):
        released += peers.discard(5.0)
    assert released == []  # two of the instant still run
    assert peers.held == 2
    assert peers.discard(5.0) == [(1.0, None), (0.9, None)]  # one straggler holds nothing back
    assert len(peers) == 1


def test_cold_first_polls_wait_for_stuck_probes_at_most_a_minute() -> None:
    """Without eta, cold first polls wait for the probes' first end, but not for ever:
    with the probes stuck for good, the other tasks are polled a minute after their
    submission (before, they waited as long as the probes)."""

    async def main() -> tuple[dict[str, float], FakeServer]:
        server = FakeServer(eta=False)
        sched = scheduler(server)
        ends: dict[str, float] = {}

        async def one(i: int, duration: float) -> None:
            submitted = server.add(f"t{i}", duration)
            await sched.wait(f"t{i}", hint=PollHint(submitted_at=submitted))
            ends[f"t{i}"] = anyio.current_time()

        async with running(sched), anyio.create_task_group() as tg:
            for i in range(sched.policy.warmup_samples):
                tg.start_soon(one, i, 10_000.0)  # the probes: stuck
            await anyio.sleep(0.01)
            for i in range(20, 30):
                tg.start_soon(one, i, 2.0)
            await anyio.sleep(100)
            tg.cancel_scope.cancel()
        return ends, server

    ends, server = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    late = [ends.get(f"t{i}") for i in range(20, 30)]
    assert None not in late
    assert all(60.0 <= t <= 61.1 for t in late if t is not None)
    assert min(server.times("t20")) >= 60.0  # nothing sooner: the probes might have ended
