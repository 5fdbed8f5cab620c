"""The emulator delivers webhooks: timing, duplicates, losses, retries, forgeries, loopback."""

from __future__ import annotations

import json
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from _support import emulator_http, post_task, request_json, until

from novita_async.testing import (
    API_BASE_URL,
    IMAGE_BASE_URL,
    ManualClock,
    NovitaEmulator,
)

pytestmark = pytest.mark.anyio

HOOK = "https://my.app/novita-hook"


def body(prompt: str = "a lighthouse", url: str | None = HOOK) -> dict[str, Any]:
    extra = {"webhook": {"url": url}} if url is not None else {}
    return {"request": request_json(prompt=prompt), "extra": extra}


async def submit(
    emu: NovitaEmulator, *bodies: dict[str, Any], base_url: str = API_BASE_URL
) -> list[str]:
    async with emulator_http(emu, base_url) as client:
        return [await post_task(client, one) for one in bodies]


class Receiver:
    """An in-process receiver: records each delivery and answers the next scripted status."""

    def __init__(
        self, emu: NovitaEmulator, statuses: list[int | BaseException | None] | None = None
    ) -> None:
        self.emu = emu
        self.script = list(statuses or [])
        self.calls: list[tuple[str, dict[str, Any], float]] = []

    async def __call__(self, url: str, raw: bytes) -> int:
        self.calls.append((url, json.loads(raw), self.emu.clock()))
        answer = self.script.pop(0) if self.script else 200
        if answer is None:
            await anyio.sleep_forever()  # never answers: the sender's timeout decides
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, int)
        return answer

    def task_ids(self) -> list[str]:
        return [event["payload"]["task"]["task_id"] for _, event, _ in self.calls]


async def test_a_task_that_ends_is_delivered_once_after_the_delay() -> None:
    clock = ManualClock()
    emu = NovitaEmulator(clock=clock, durations=1.0)
    receiver = Receiver(emu)
    async with emu.webhooks(deliver=receiver, delay=2.0) as hooks:
        ok, failed = await submit(emu, body(), body("a dog [fail]"))
        await submit(emu, body("no webhook", url=None))
        clock.advance(2.5)  # both ended at 1.0, due at 3.0
        await anyio.sleep(0.2)
        assert receiver.calls == []
        clock.advance(0.6)
        await until(lambda: len(receiver.calls) == 2)
        await anyio.sleep(0.1)
    assert sorted(receiver.task_ids()) == sorted([ok, failed])  # none for the 3rd task
    by_id = {
        event["payload"]["task"]["task_id"]: (url, event, at) for url, event, at in receiver.calls
    }
    url, event, at = by_id[ok]
    assert url == HOOK
    assert at == pytest.approx(3.1)
    assert event["event_type"] == "ASYNC_TASK_RESULT"
    assert event["payload"]["task"]["status"] == "TASK_STATUS_SUCCEED"
    assert event["payload"]["extra"]["webhook"] == {"url": HOOK}
    assert event["payload"]["images"][0]["image_url"].startswith(IMAGE_BASE_URL)
    assert by_id[failed][1]["payload"]["task"]["status"] == "TASK_STATUS_FAILED"
    stats = hooks.stats
    assert (stats.sent, stats.acknowledged, stats.retries, stats.lost) == (2, 2, 0, 0)
    assert stats.per_task == {ok: 1, failed: 1}
    assert emu.webhook_stats is stats


async def test_webhook_test_mode_delivers_the_status_asked_for() -> None:
    # extra.webhook.test_mode asks Novita for a mock event with return_task_status;
    # the emulator ignored it, so a user's failure-path test never saw a FAILED event.
    emu = NovitaEmulator(durations=0.01)
    receiver = Receiver(emu)

    def with_test_mode(prompt: str, status: str) -> dict[str, Any]:
        mode = {"enabled": True, "return_task_status": status}
        return {
            "request": request_json(prompt=prompt),
            "extra": {"webhook": {"url": HOOK, "test_mode": mode}},
        }

    with anyio.fail_after(10):
        async with emu.webhooks(deliver=receiver, delay=0.0):
            failed, ok = await submit(
                emu,
                with_test_mode("a cat", "TASK_STATUS_FAILED"),
                with_test_mode("a dog", "TASK_STATUS_SUCCEED"),
            )
            await until(lambda: len(receiver.calls) == 2)
    events = {e["payload"]["task"]["task_id"]: e["payload"] for _, e, _ in receiver.calls}
    assert events[failed]["task"]["status"] == "TASK_STATUS_FAILED"
    assert events[failed]["task"]["reason"] != ""
    assert events[failed]["images"] == []
    assert events[ok]["task"]["status"] == "TASK_STATUS_SUCCEED"
    assert len(events[ok]["images"]) == 1


async def test_duplicate_rate_one_delivers_every_task_twice() -> None:
    emu = NovitaEmulator(durations=0.01)
    receiver = Receiver(emu)
    async with emu.webhooks(deliver=receiver, delay=(0.0, 0.02), duplicate_rate=1.0) as hooks:
        ids = await submit(emu, body("a"), body("b"), body("c"))
        await until(lambda: len(receiver.calls) == 6)
    assert sorted(receiver.task_ids()) == sorted(ids * 2)
    assert hooks.stats.duplicates == 3
    assert hooks.stats.per_task == dict.fromkeys(ids, 2)


async def test_loss_rate_one_delivers_nothing() -> None:
    emu = NovitaEmulator(durations=0.0)
    receiver = Receiver(emu)
    async with emu.webhooks(deliver=receiver, delay=0.0, loss_rate=1.0) as hooks:
        await submit(emu, body("a"), body("b"))
        await anyio.sleep(0.2)
    assert receiver.calls == []
    assert (hooks.stats.lost, hooks.stats.sent) == (2, 0)


async def test_rates_are_seeded_and_independent_per_task() -> None:
    async def run(seed: int) -> tuple[dict[str, int], int, int, int]:
        emu = NovitaEmulator(durations=0.0, seed=1)
        receiver = Receiver(emu)
        options: dict[str, Any] = {"delay": 0.0, "duplicate_rate": 0.5, "loss_rate": 0.3}
        async with emu.webhooks(deliver=receiver, seed=seed, **options) as hooks:
            await submit(emu, *(body(f"p{i}") for i in range(30)))
            expected = 30 - hooks.stats.lost + hooks.stats.duplicates
            await until(lambda: len(receiver.calls) == expected)
        stats = hooks.stats
        return dict(stats.per_task), stats.lost, stats.duplicates, len(receiver.calls)

    first = await run(seed=7)
    assert first == await run(seed=7)  # same seed, same deliveries
    per_task, lost, duplicates, calls = first
    assert 0 < lost < 30
    assert 0 < duplicates < 30 - lost
    assert calls == 30 - lost + duplicates
    assert sorted(set(per_task.values())) == [1, 2]
    assert first != await run(seed=8)


async def test_non_2xx_errors_and_timeouts_are_retried_up_to_5_times() -> None:
    emu = NovitaEmulator(durations=0.0)
    flaky = Receiver(emu, [500, 404, RuntimeError("receiver crashed"), None, 204])
    async with emu.webhooks(deliver=flaky, delay=0.0, retry_delay=0.01, timeout=0.1) as hooks:
        (task_id,) = await submit(emu, body())
        await until(lambda: hooks.stats.acknowledged == 1)
    assert len(flaky.calls) == 5
    assert (hooks.stats.sent, hooks.stats.retries, hooks.stats.abandoned) == (5, 4, 0)
    assert hooks.stats.per_task[task_id] == 5

    emu = NovitaEmulator(durations=0.0)
    down = Receiver(emu, [503] * 10)
    async with emu.webhooks(deliver=down, delay=0.0, retry_delay=0.01) as hooks:
        await submit(emu, body())
        await until(lambda: hooks.stats.abandoned == 1)
    assert len(down.calls) == 6  # the first try and 5 retries, like Novita
    assert (hooks.stats.sent, hooks.stats.acknowledged) == (6, 0)


async def test_forgeries_for_a_running_task_and_a_random_id() -> None:
    emu = NovitaEmulator(durations=600.0)
    receiver = Receiver(emu, [200, 401])
    async with emu.webhooks(deliver=receiver) as hooks:
        (running,) = await submit(emu, body())
        assert await hooks.forge(HOOK, running) == 200
        assert await emu.post_forgery(HOOK, status="TASK_STATUS_FAILED", reason="lies") == 401
    (_, forged, _), (_, stranger, _) = receiver.calls
    assert forged["payload"]["task"]["task_id"] == running
    assert forged["payload"]["task"]["status"] == "TASK_STATUS_SUCCEED"
    assert forged["payload"]["images"][0]["image_url"].startswith("https://forged.invalid/")
    assert emu.tasks[running].status.value == "TASK_STATUS_PROCESSING"  # the truth
    assert stranger["payload"]["task"]["task_id"] not in emu.tasks
    assert stranger["payload"]["task"]["reason"] == "lies"
    assert stranger["payload"]["images"] == []
    assert (hooks.stats.forgeries, hooks.stats.sent) == (2, 0)
    with pytest.raises(RuntimeError, match="no webhook sender"):
        await emu.post_forgery(HOOK, running)


def test_sender_rejects_nonsense() -> None:
    emu = NovitaEmulator()
    for bad in ({"duplicate_rate": 1.5}, {"loss_rate": -0.1}, {"delay": -1.0}, {"timeout": 0}):
        with pytest.raises(ValueError):
            emu.webhooks(**bad)


async def _http_receiver(
    listener: anyio.abc.SocketListener, bodies: list[dict[str, Any]], statuses: list[int]
) -> None:
    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(rest) < length:
                rest += await stream.receive()
            bodies.append(json.loads(rest))
            status = statuses.pop(0) if statuses else 200
            await stream.send(
                b"HTTP/1.1 %d X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % status
            )

    async with listener:
        await listener.serve(handle)


async def test_loopback_server_delivers_over_http_with_retries() -> None:
    emu = NovitaEmulator(durations=0.01)
    bodies: list[dict[str, Any]] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            group.start_soon(_http_receiver, listener, bodies, [500])
            options = {"delay": 0.0, "retry_delay": 0.01}
            async with emu.serve(webhooks=options) as server:
                assert server.webhooks is not None
                url = f"http://127.0.0.1:{port}/hook"
                (task_id,) = await submit(emu, body(url=url), base_url=server.base_url)
                await until(lambda: len(bodies) == 2)
                image_url = bodies[1]["payload"]["images"][0]["image_url"]
                assert image_url.startswith(server.image_base_url)  # fetchable over loopback
                async with httpx.AsyncClient() as plain:
                    assert (await plain.get(image_url)).status_code == 200
            assert server.webhooks is None
            group.cancel_scope.cancel()
    assert [b["payload"]["task"]["task_id"] for b in bodies] == [task_id, task_id]
    assert emu.webhook_stats.retries == 1
