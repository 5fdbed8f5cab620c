"""RedisWebhookRelay against a real redis-server: deliveries reach the other replicas (and
only them), under load, through a bad ``deliver``, across a Redis restart."""

from __future__ import annotations

import logging
from collections import Counter

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio as aioredis
import trio
from _redis_server import RedisServer
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff

from novita_async.redis import RedisUnavailableError, RedisWebhookRelay

DELIVERIES = 1000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client is asyncio-only (see test_trio_is_refused_clearly)


class Inbox:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.arrived = anyio.Event()
        self.expected = 0

    async def __call__(self, task_id: str, body: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        self.got.append((task_id, body))
        if len(self.got) >= self.expected:
            self.arrived.set()


@pytest.mark.anyio
async def test_1000_deliveries_reach_every_other_replica_once(
    redis_url: str, redis_key: str
) -> None:
    replicas = [RedisWebhookRelay(redis_url, redis_key, max_concurrency=8) for _ in range(3)]
    inboxes = [Inbox() for _ in replicas]
    publisher, *others = replicas
    for inbox in inboxes[1:]:
        inbox.expected = DELIVERIES
    async with anyio.create_task_group() as tg:
        for relay, inbox in zip(replicas, inboxes, strict=True):
            await tg.start(relay.serve, inbox)
        bodies = {
            f"task-{i:04d}": b'{"task": {"status": "TASK_STATUS_SUCCEED"}}\xff' + bytes([i % 256])
            for i in range(DELIVERIES)
        }
        listeners = [await publisher.publish(task_id, body) for task_id, body in bodies.items()]
        with anyio.fail_after(20):
            for inbox in inboxes[1:]:
                await inbox.arrived.wait()
        await anyio.sleep(0.2)  # anything extra (own messages, duplicates) would show now
        tg.cancel_scope.cancel()
    assert set(listeners) == {3}  # every relay was subscribed
    assert inboxes[0].got == []  # its own deliveries are not handed back
    for inbox in inboxes[1:]:
        assert Counter(inbox.got) == Counter(bodies.items())
    assert publisher.published == DELIVERIES
    assert [relay.received for relay in others] == [DELIVERIES, DELIVERIES]
    for relay in replicas:
        await relay.aclose()


@pytest.mark.anyio
async def test_a_failing_deliver_and_foreign_messages_do_not_stop_the_relay(
    redis_url: str, redis_key: str
) -> None:
    got: list[str] = []
    done = anyio.Event()

    async def deliver(task_id: str, body: bytes) -> None:
        if task_id == "bad":
            raise RuntimeError("receive_webhook failed")
        got.append(task_id)
        if task_id == "last":
            done.set()

    async with (
        RedisWebhookRelay(redis_url, redis_key) as sender,
        RedisWebhookRelay(redis_url, redis_key) as receiver,
        anyio.create_task_group() as tg,
    ):
        await tg.start(receiver.serve, deliver)
        await sender.publish("bad", b"{}")
        client = sender._redis.client
        for foreign in (b"hello", b"nvr1 only-two\n", b"nvr2 x y\n{}", b"nvr1 a b c\n"):
            await client.publish(redis_key, foreign)
        await sender.publish("good", "a str body")  # type: ignore[arg-type]
        await sender.publish("last", b"{}")
        with anyio.fail_after(10):
            await done.wait()
        tg.cancel_scope.cancel()
    assert got == ["good", "last"]
    assert receiver.failed == 1
    with pytest.raises(ValueError, match="task id"):
        await sender.publish("two words", b"{}")
    with pytest.raises(ValueError, match="task id"):
        await sender.publish("", b"{}")


@pytest.mark.anyio
async def test_the_relay_reconnects_after_a_redis_restart(
    restartable_redis: RedisServer, redis_key: str
) -> None:
    inbox = Inbox()
    inbox.expected = 1
    url = restartable_redis.url
    async with (
        RedisWebhookRelay(url, redis_key) as sender,
        RedisWebhookRelay(url, redis_key) as receiver,
        anyio.create_task_group() as tg,
    ):
        await tg.start(receiver.serve, inbox)
        restartable_redis.stop()
        with pytest.raises(RedisUnavailableError, match="unreachable"):
            await sender.publish("lost", b"{}")
        restartable_redis.start()
        with anyio.fail_after(15):
            # Published until the receiver is subscribed again (pub/sub keeps nothing).
            while not await sender.publish("after", b"{}"):
                await anyio.sleep(0.05)
            await inbox.arrived.wait()
        tg.cancel_scope.cancel()
    assert inbox.got[0] == ("after", b"{}")


@pytest.mark.anyio
async def test_the_relay_reconnects_on_its_own_schedule_whatever_the_clients_retries(
    restartable_redis: RedisServer, redis_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A client whose own retry policy waits a minute between connection attempts: the
    # relay's subscription must not reconnect through it (nor re-subscribe behind the
    # relay's back), but notice the outage at once and reconnect on the relay's backoff.
    caplog.set_level(logging.WARNING, logger="novita_async.redis")
    url = restartable_redis.url
    slow = aioredis.Redis.from_url(url, retry=Retry(ConstantBackoff(60), 5))
    inbox = Inbox()
    inbox.expected = 1
    async with (
        RedisWebhookRelay(url, redis_key) as sender,
        RedisWebhookRelay(slow, redis_key) as receiver,
        anyio.create_task_group() as tg,
    ):
        await tg.start(receiver.serve, inbox)
        restartable_redis.stop()
        with anyio.fail_after(15):  # Redis stays down until the relay has noticed
            while not any("Redis unreachable" in r.getMessage() for r in caplog.records):
                await anyio.sleep(0.05)
        restartable_redis.start()
        with anyio.fail_after(15):
            while not await sender.publish("after", b"{}"):
                await anyio.sleep(0.05)
            await inbox.arrived.wait()
        tg.cancel_scope.cancel()
    assert inbox.got[0] == ("after", b"{}")
    assert await slow.publish(redis_key, b"the client still works") == 0
    await slow.aclose()


def test_trio_is_refused_clearly(redis_url: str) -> None:
    async def main() -> None:
        await RedisWebhookRelay(redis_url).publish("t", b"{}")

    with pytest.raises(RuntimeError, match=r"needs asyncio.*trio"):
        trio.run(main)
