"""Webhook-driven waits: ``AsyncNovita(webhook_url=...)`` and ``client.receive_webhook``.

Deliveries are built by the in-process emulator (``emu.webhook_event``) and handed to
the client the way an app's route would; GETs are counted by the emulator.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import anyio
import httpx
import pytest
from _support import req, until

from novita_async import (
    Extra,
    PollPolicy,
    TaskResult,
    TaskStatus,
    Webhook,
)
from novita_async.testing import NovitaEmulator

pytestmark = pytest.mark.anyio

HOOK = "https://my.app/novita-hook"
#: Webhook tasks are held back: a lost delivery is caught by a poll after this long.
POLICY = PollPolicy(webhook_cold_delay=2.0, min_interval=0.01, backoff_initial=0.05)


async def submitted(emu: NovitaEmulator, count: int = 1) -> list[str]:
    """The ids of the first ``count`` tasks, once the emulator created them."""
    await until(lambda: len(emu.tasks) >= count, timeout=5)
    return list(emu.tasks)[:count]


async def finished(emu: NovitaEmulator, task_id: str) -> None:
    ended = (TaskStatus.SUCCEED, TaskStatus.FAILED)
    await until(lambda: emu.tasks[task_id].status_at(emu.clock()) in ended, timeout=5)


async def test_every_submission_carries_the_clients_webhook_unless_its_own() -> None:
    emu = NovitaEmulator(durations=0.01)
    async with emu.client(webhook_url=HOOK) as client:
        mine = await client.submit_txt2img(req())
        own = Extra(webhook=Webhook(url="https://elsewhere.example/hook"))
        theirs = await client.submit_txt2img(req(), own)
        plain = await client.submit_txt2img(req(), Extra(response_image_type="webp"))
    assert emu.tasks[mine].extra["webhook"] == {"url": HOOK}
    assert emu.tasks[theirs].extra["webhook"] == {"url": "https://elsewhere.example/hook"}
    assert emu.tasks[plain].extra == {"response_image_type": "webp", "webhook": {"url": HOOK}}


async def test_a_delivery_confirms_with_one_get_and_wakes_every_waiter() -> None:
    emu = NovitaEmulator(durations=0.05)
    results: list[TaskResult] = []
    async with emu.client(webhook_url=HOOK, poll_policy=POLICY) as client:
        async with anyio.create_task_group() as tg:

            async def wait_twice() -> None:
                first = await client.txt2img(req())
                results.append(first)

            tg.start_soon(wait_twice)
            [task_id] = await submitted(emu)
            tg.start_soon(lambda: _append(results, client.wait(task_id)))
            await finished(emu, task_id)
            await anyio.sleep(0.1)
            assert emu.polls[task_id] == 0  # nothing polled while the delivery is due
            body = json.dumps(emu.webhook_event(task_id)).encode()
            confirmed = await client.receive_webhook(body)
        assert confirmed is not None
        assert confirmed.status is TaskStatus.SUCCEED
        assert [r.task_id for r in results] == [task_id, task_id]
        assert emu.polls[task_id] == 1
        # Novita retries a delivery up to 5 times: later duplicates cost nothing.
        for _ in range(5):
            assert await client.receive_webhook(emu.webhook_event(task_id)) is None
        assert emu.polls[task_id] == 1


async def _append(results: list[TaskResult], waiting: Awaitable[TaskResult]) -> None:
    results.append(await waiting)


async def test_concurrent_duplicates_share_one_get() -> None:
    emu = NovitaEmulator(durations=0.02, latency=0.05)
    async with emu.client(webhook_url=HOOK, poll_policy=POLICY) as client:
        outcomes: list[TaskResult | None] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(outcomes, client.txt2img(req())))  # type: ignore[arg-type]
            [task_id] = await submitted(emu)
            await finished(emu, task_id)
            body = emu.webhook_event(task_id)

            async def deliver() -> None:
                outcomes.append(await client.receive_webhook(body))

            for _ in range(6):
                tg.start_soon(deliver)
        stats = client.scheduler.stats
        # one delivery time learned, not six: duplicates would skew its 99 % quantile
        delivery_times = len(client.scheduler._planner.deliveries.raw)
    assert emu.polls[task_id] == 1
    assert (stats.webhooks_received, stats.webhooks_confirmed) == (6, 1)
    assert delivery_times == 1
    confirmed = [o for o in outcomes if o is not None]
    assert len(confirmed) == 7  # the waiter's result and every concurrent delivery's
    assert {o.task_id for o in confirmed} == {task_id}


async def test_a_stranger_posting_random_ids_costs_no_request() -> None:
    emu = NovitaEmulator(durations=0.02)
    async with emu.client(webhook_url=HOOK) as client:
        task_id = await client.submit_txt2img(req())  # not waited on here
        await finished(emu, task_id)
        for fake in ["nope", "also-not-mine", task_id]:
            body = {
                "event_type": "ASYNC_TASK_RESULT",
                "payload": {"task": {"task_id": fake, "status": "TASK_STATUS_SUCCEED"}},
            }
            assert await client.receive_webhook(body) is None
        assert await client.receive_webhook(b"not json at all") is None
        assert await client.receive_webhook({"event_type": "SOMETHING_ELSE"}) is None
    assert emu.polls_total == 0


async def test_a_body_nested_too_deeply_for_the_json_parser_is_ignored() -> None:
    """Deliveries are unsigned: a stranger's ``[[[...]]]`` (too deep for Python's parser,
    a RecursionError) is "not a delivery" like any other junk, not an error in the route."""
    emu = NovitaEmulator(durations=0.02)
    deep = b"[" * 100_000 + b"]" * 100_000
    nested = b'{"event_type":"ASYNC_TASK_RESULT","payload":' + deep + b"}"
    with anyio.fail_after(5):
        async with emu.client(webhook_url=HOOK) as client:
            for body in (deep, nested, deep.decode()):
                assert await client.receive_webhook(body) is None
    assert emu.polls_total == 0


async def test_a_forged_success_for_a_running_task_resolves_nothing() -> None:
    emu = NovitaEmulator(durations=0.6)
    async with emu.client(webhook_url=HOOK, poll_policy=POLICY) as client:
        outcomes: list[TaskResult] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(outcomes, client.txt2img(req())))  # type: ignore[arg-type]
            [task_id] = await submitted(emu)
            forged = emu.webhook_event(task_id)
            forged["payload"]["task"]["status"] = "TASK_STATUS_SUCCEED"
            forged["payload"]["images"] = [{"image_url": "https://evil.example/x.png"}]
            assert await client.receive_webhook(forged) is None
            assert emu.polls[task_id] == 1  # the one confirming GET said: still running
            assert not outcomes
            assert client.scheduler.stats.webhooks_confirmed == 0
            await finished(emu, task_id)
            real = await client.receive_webhook(emu.webhook_event(task_id))
        assert real is not None
        assert client.scheduler.stats.webhooks_confirmed == 1
        assert outcomes[0].status is TaskStatus.SUCCEED
        assert all("evil.example" not in image.image_url for image in outcomes[0].images)
        assert emu.polls[task_id] == 2


async def test_a_lost_delivery_still_ends_in_a_result() -> None:
    emu = NovitaEmulator(durations=0.05)
    async with emu.client(webhook_url=HOOK, poll_policy=POLICY) as client:
        started = anyio.current_time()
        result = await client.txt2img(req(), timeout=10)
        waited = anyio.current_time() - started
    assert result.status is TaskStatus.SUCCEED
    assert waited >= POLICY.webhook_cold_delay  # held back until the delivery was late
    assert emu.polls_total == 1


async def test_receive_webhook_needs_the_entered_client() -> None:
    emu = NovitaEmulator(durations=0.05)
    client = emu.client(webhook_url=HOOK)
    with pytest.raises(RuntimeError, match="async with"):
        await client.receive_webhook({"event_type": "ASYNC_TASK_RESULT"})
    await client.aclose()


class MemoryRelay:
    """An in-process stand-in for a relay between replicas (pub/sub)."""

    def __init__(self, bus: list[MemoryRelay]) -> None:
        self.bus = bus
        bus.append(self)
        self.send, self.receive = anyio.create_memory_object_stream[tuple[str, bytes]](100)
        self.published = 0

    async def publish(self, task_id: str, body: bytes) -> None:
        self.published += 1
        for other in self.bus:
            if other is not self:
                await other.send.send((task_id, body))

    async def serve(self, deliver: Callable[[str, bytes], Awaitable[None]]) -> None:
        async with self.receive:
            async for task_id, body in self.receive:
                await deliver(task_id, body)


async def test_a_relay_passes_a_delivery_to_the_replica_that_waits() -> None:
    emu = NovitaEmulator(durations=0.05)
    bus: list[MemoryRelay] = []
    relay_a, relay_b = MemoryRelay(bus), MemoryRelay(bus)
    a = emu.client(webhook_url=HOOK, webhook_relay=relay_a, poll_policy=POLICY)
    b = emu.client(webhook_url=HOOK, webhook_relay=relay_b, poll_policy=POLICY)
    results: list[TaskResult] = []
    async with a, b, anyio.create_task_group() as tg:
        tg.start_soon(lambda: _append(results, a.txt2img(req())))  # type: ignore[arg-type]
        [task_id] = await submitted(emu)
        await finished(emu, task_id)
        assert await b.receive_webhook(emu.webhook_event(task_id)) is None  # not b's task
        await until(lambda: bool(results), timeout=1)
    for relay in bus:
        relay.send.close()
    assert results[0].task_id == task_id
    assert relay_b.published == 1
    assert emu.polls[task_id] == 1  # confirmed once, by the replica that waited


class _GetsInFlight(httpx.AsyncBaseTransport):
    """Counts task-result GETs in flight (and the most at once)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner, self.now, self.most = inner, 0, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        get = request.method == "GET"
        self.now += get
        self.most = max(self.most, self.now)
        try:
            return await self.inner.handle_async_request(request)
        finally:
            self.now -= get


async def test_a_burst_of_deliveries_is_confirmed_at_once_not_by_the_poll_workers() -> None:
    """Six deliveries at once with ``max_concurrent_polls=2``: the six confirming GETs
    are on the wire together (in the delivering tasks), not two at a time."""
    emu = NovitaEmulator(durations=0.02, latency=0.2)
    counting = _GetsInFlight(emu.transport())
    client = emu.client(
        webhook_url=HOOK, poll_policy=POLICY, max_concurrent_polls=2, transport=counting
    )
    confirmed: list[TaskResult | None] = []
    async with client, anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(client.txt2img, req(f"prompt {i}"))
        ids = await submitted(emu, 6)
        for task_id in ids:
            await finished(emu, task_id)

        async def deliver(task_id: str) -> None:
            confirmed.append(await client.receive_webhook(emu.webhook_event(task_id)))

        async with anyio.create_task_group() as deliveries:
            for task_id in ids:
                deliveries.start_soon(deliver, task_id)
    assert [c is not None for c in confirmed] == [True] * 6
    assert sum(emu.polls[t] for t in ids) == 6
    assert counting.most == 6  # two at a time through the poll workers before
