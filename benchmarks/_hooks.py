"""Webhook-driven waits against polling alone (issue #12): in-process and loopback.

``delivery: in-process`` (:func:`run_webhooks`): everything in ONE process.

The emulator runs in-process (``emu.client()``'s transport, no sockets) and
delivers webhooks in-process: its sender's ``deliver`` callable hands each body
to ``client.receive_webhook`` and answers 200, as an app's route would. Genuine
deliveries are delayed U(0.05, 0.25) s after the task ends, ``duplicate_rate``
of them are delivered twice, ``loss_rate`` never. While the batch runs, forged
"succeeded" deliveries are posted for running tasks and for random task ids
(their images live on ``forged.invalid``, so a forged field in a result shows).

Measured: task-result GETs per task (the emulator's count), added latency after
the first genuine delivery (and after completion, for every task: the lost
ones end by the scheduler's safety-net poll), every prompt delivered, no forged
image or early result, and zero GETs for the random ids.

``delivery: loopback`` (:func:`run_webhooks_loopback`): the emulator runs in its
own process (``_server.py --webhooks``) and POSTs deliveries over HTTP to a
receiver in this process, which hands each body to ``client.receive_webhook``:
``receiver: cli`` is the CLI's ``WebhookReceiver`` (204 before the handler runs,
keep-alive; both backends), ``receiver: aiohttp`` a minimal
aiohttp route (keep-alive, 204 after the handler; asyncio only). The emulator
also posts the forgeries, on
the parent's ``forge`` command as the meter starts. This process reports its
delivery stamps and results; the parent sets them against the emulator's
counters and first-delivery stamps (``_report.merge_loopback``).
"""

from __future__ import annotations

import json
import random
import time
import uuid
from typing import Any

import anyio
from _harness import EMULATOR_KEY, Meter, jsonable_stats
from _workloads import duration_for

__all__ = ["FORGED_HOST", "run_webhooks", "run_webhooks_loopback"]

URL = "https://bench.invalid/novita-hook"
FORGED_HOST = "forged.invalid"


async def run_webhooks(job: dict[str, Any]) -> dict[str, Any]:
    from novita_async import Txt2ImgRequest
    from novita_async.testing import NovitaEmulator

    seed, hooks_on = job["seed"], job["webhooks"]
    emu = NovitaEmulator(
        durations=duration_for(job["durations"], seed=seed),
        report_eta=False,
        workers=None,
        images_per_minute=None,
        clock=time.monotonic,
        seed=seed,
    )
    first_delivery: dict[str, float] = {}
    results: dict[str, Any] = {}
    stamps: dict[str, float] = {}
    rng = random.Random(f"bench-forgeries:{seed}")
    random_ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(job["forged"])]
    forged_running: list[str] = []
    failures = 0

    client = emu.client(webhook_url=URL) if hooks_on else emu.client()

    async def deliver(url: str, body: bytes) -> int:
        if FORGED_HOST.encode() not in body:
            task_id = json.loads(body)["payload"]["task"]["task_id"]
            first_delivery.setdefault(task_id, time.monotonic())
        await client.receive_webhook(body)
        return 200

    async def forge(hooks: Any) -> None:
        """``forged`` forgeries for running tasks and as many for random ids, spread out."""
        await anyio.sleep(0.5)
        for k in range(job["forged"]):
            now = time.monotonic()
            running = [
                t.task_id
                for t in emu.tasks.values()
                if t.completed_at > now + 0.3 and t.task_id not in forged_running
            ]
            if running:
                forged_running.append(rng.choice(running))
                await hooks.forge(URL, forged_running[-1])
            await hooks.forge(URL, random_ids[k])
            await anyio.sleep(0.02)

    async def batch(reqs: list[Any], measured: bool) -> None:
        nonlocal failures
        async with client.txt2img_many(reqs) as run:
            async for item in run:
                if not measured:
                    continue
                if item.error is not None or item.task_id is None:
                    failures += 1
                    continue
                stamps[item.task_id] = time.monotonic()
                results[item.task_id] = item.result

    meter = Meter()
    warm_ids: set[str] = set()
    sender = emu.webhooks(
        deliver=deliver,
        delay=(0.05, 0.2),
        duplicate_rate=job["duplicate_rate"],
        loss_rate=job["loss_rate"],
        seed=seed,
    )
    async with client, sender as hooks:
        if job.get("warmup"):
            await batch([Txt2ImgRequest(**r) for r in job["warmup"]], False)
            warm_ids = set(emu.tasks)
        reqs = [Txt2ImgRequest(**r) for r in job["requests"]]
        with meter:
            async with anyio.create_task_group() as tg:
                if hooks_on:
                    tg.start_soon(forge, hooks)
                await batch(reqs, True)
                tg.cancel_scope.cancel()
        stats = jsonable_stats(client.scheduler.stats)
    tasks = {tid: t for tid, t in emu.tasks.items() if tid not in warm_ids}
    forged_images = sum(
        FORGED_HOST in image.image_url for r in results.values() for image in r.images
    )
    early = sum(stamps[tid] < tasks[tid].completed_at for tid in stamps if tid in tasks)
    after_delivery = [stamps[t] - first_delivery[t] for t in stamps if t in first_delivery]
    after_completion = [stamps[t] - tasks[t].completed_at for t in stamps if t in tasks]
    lost = [stamps[t] - tasks[t].completed_at for t in stamps if t not in first_delivery]
    wh = emu.webhook_stats
    return {
        "webhooks": hooks_on,
        "tasks": len(tasks),
        "delivered": len(stamps),
        "failures": failures,
        "gets_per_task": sum(emu.polls[t] for t in tasks) / max(1, len(tasks)),
        "gets_unknown_ids": sum(emu.polls[t] for t in random_ids),
        "forged_running": len(forged_running),
        "forged_random": len(random_ids) if hooks_on else 0,
        "forged_images_in_results": forged_images,
        "results_before_completion": early,
        "after_delivery": sorted(after_delivery),
        "after_completion": sorted(after_completion),
        "lost_latencies": sorted(lost) if hooks_on else [],
        "sender": {k: getattr(wh, k) for k in ("sent", "duplicates", "lost", "forgeries")},
        "scheduler_stats": stats,
        **meter.as_dict(),
    }


async def run_webhooks_loopback(job: dict[str, Any]) -> dict[str, Any]:
    from novita_async import AsyncNovita, Txt2ImgRequest
    from novita_async._cli_webhooks import WebhookReceiver

    hooks_on = job["webhooks"]
    stamps: dict[str, float] = {}
    warm_ids: list[str] = []
    forged_images = 0
    failures = 0
    meter = Meter()
    clients: list[Any] = []  # the receiver binds first (its port is the URL), then the client

    arrived: dict[str, float] = {}  # task_id -> when its first genuine body got here

    async def deliver(body: bytes) -> object:
        if FORGED_HOST.encode() not in body:
            now = time.monotonic()
            arrived.setdefault(json.loads(body)["payload"]["task"]["task_id"], now)
        return await clients[0].receive_webhook(body)

    if job.get("receiver") == "aiohttp":
        receiver: Any = await _AiohttpReceiver.bind(deliver)
    else:
        receiver = await WebhookReceiver.bind("127.0.0.1", 0, deliver)
    url = f"http://127.0.0.1:{receiver.port}/novita-hook"
    kwargs = {"webhook_url": url} if hooks_on else {}
    client = AsyncNovita(EMULATOR_KEY, base_url=job["base_url"], **kwargs)
    clients.append(client)

    async def batch(reqs: list[Any], measured: bool) -> None:
        nonlocal failures, forged_images
        async with client.txt2img_many(reqs) as run:
            async for item in run:
                if not measured:
                    warm_ids.append(item.task_id)
                    continue
                if item.error is not None or item.task_id is None:
                    failures += 1
                    continue
                stamps[item.task_id] = time.monotonic()
                images = item.result.images
                forged_images += sum(FORGED_HOST in image.image_url for image in images)

    async with client, anyio.create_task_group() as tg:
        tg.start_soon(receiver.serve)
        if job.get("warmup"):
            await batch([Txt2ImgRequest(**r) for r in job["warmup"]], False)
        reqs = [Txt2ImgRequest(**r) for r in job["requests"]]
        with meter:  # the parent sends the emulator ``forge`` as this prints "measuring"
            await batch(reqs, True)
        stats = jsonable_stats(client.scheduler.stats)
        tg.cancel_scope.cancel()
    return {
        "webhooks": hooks_on,
        "stamps": stamps,
        "arrived": arrived,
        "warm_ids": warm_ids,
        "failures": failures,
        "forged_images_in_results": forged_images,
        "receiver_counts": {"delivered": receiver.delivered, "refused": receiver.refused},
        "scheduler_stats": stats,
        **meter.as_dict(),
    }


class _AiohttpReceiver:
    """A minimal aiohttp route (asyncio only): keeps connections alive, answers 204."""

    def __init__(self, runner: Any, port: int) -> None:
        self.runner, self.port = runner, port
        self.delivered = 0
        self.refused = 0

    @classmethod
    async def bind(cls, deliver: Any) -> _AiohttpReceiver:
        from aiohttp import web

        async def route(request: web.Request) -> web.Response:
            body = await request.read()
            receiver.delivered += 1
            await deliver(body)
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/novita-hook", route)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        receiver = cls(runner, site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        return receiver

    async def serve(self) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self.runner.cleanup()
