"""The library, used the ways people use it, at default settings.

Forms (``FORMS``):

* ``bare``: ``async for item in client.txt2img_many(reqs)``;
* ``with``: ``async with client.txt2img_many(reqs) as run: async for item in run``;
* ``single``: one ``await client.txt2img(req)`` per prompt, all concurrent (what
  a FastAPI app does when N requests come in at once).

``AsyncNovita`` is built with the API key and base URL only: its default
transport, pool and ``PollPolicy``, unless a job sets ``policy`` (the trade-off
sweep sets :data:`KNOB`) -- the emulator counts requests, so nothing wraps the
client's transport. Waves (``bursts``) start ``pause`` seconds apart, each a
run (or a set of ``txt2img`` calls) of its own.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from _harness import EMULATOR_KEY, Meter, jsonable_stats, transport_name

__all__ = ["FORMS", "KNOB", "KNOB_VALUES", "run_library"]

#: The policy's one knob the trade-off curve sweeps (a ``PollPolicy`` field name).
KNOB = "latency_budget"
KNOB_VALUES = (0.1, 0.2, 0.4, 0.8, 1.6)
KNOB_VALUES_QUICK = (0.1, 0.4, 1.6)

FORMS = {
    "bare": "bare `async for`",
    "with": "`async with ... as run`",
    "single": "concurrent `txt2img` calls",
}

Record = Callable[[str | None, bool], None]


async def _bare(client: Any, reqs: list[Any], record: Record) -> None:
    async for item in client.txt2img_many(reqs):
        record(item.task_id, item.error is None)


async def _with(client: Any, reqs: list[Any], record: Record) -> None:
    async with client.txt2img_many(reqs) as run:
        async for item in run:
            record(item.task_id, item.error is None)


async def _single(client: Any, reqs: list[Any], record: Record) -> None:
    from novita_async import NovitaError

    async def one(req: Any) -> None:
        try:
            result = await client.txt2img(req)
        except NovitaError as exc:
            record(getattr(exc, "task_id", None), False)
        else:
            record(result.task.task_id, True)

    async with anyio.create_task_group() as tg:
        for req in reqs:
            tg.start_soon(one, req)


_RUNNERS: dict[str, Callable[[Any, list[Any], Record], Awaitable[None]]] = {
    "bare": _bare,
    "with": _with,
    "single": _single,
}


def waves_of(items: list[Any], waves: int) -> list[list[Any]]:
    """``items`` cut into ``waves`` consecutive slices of (nearly) equal size."""
    size = -(-len(items) // max(1, waves))
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


async def run_waves(
    form: str, client: Any, reqs: list[Any], waves: int, pause: float, record: Record
) -> None:
    runner = _RUNNERS[form]
    start = anyio.current_time()

    async def wave(k: int, part: list[Any]) -> None:
        await anyio.sleep(max(0.0, start + k * pause - anyio.current_time()))
        await runner(client, part, record)

    async with anyio.create_task_group() as tg:
        for k, part in enumerate(waves_of(reqs, waves)):
            tg.start_soon(wave, k, part)


async def run_library(job: dict[str, Any], deliveries: dict[str, float]) -> dict[str, Any]:
    """One library scenario; stamps each result as the caller gets it.

    ``warmup`` requests run first through the same client and form (unmeasured),
    so its scheduler has learned task durations -- a long-lived client.
    """
    from novita_async import AsyncNovita, PollPolicy, Txt2ImgRequest  # before the meter

    form = job["form"]
    kwargs: dict[str, Any] = {}
    if job.get("policy"):
        kwargs["poll_policy"] = PollPolicy(**job["policy"])
    failures = 0
    warm_ids: list[str] = []

    def measured(task_id: str | None, ok: bool) -> None:
        nonlocal failures
        now = time.monotonic()
        if ok and task_id is not None:
            deliveries[task_id] = now
        else:
            failures += 1

    def warming(task_id: str | None, ok: bool) -> None:
        if task_id is not None:
            warm_ids.append(task_id)

    meter = Meter()
    async with AsyncNovita(EMULATOR_KEY, base_url=job["base_url"], **kwargs) as client:
        if job.get("warmup"):
            warm = [Txt2ImgRequest(**r) for r in job["warmup"]]
            await run_waves(form, client, warm, 1, 0.0, warming)
        polls_before = client.scheduler.stats.polls_total
        reqs = [Txt2ImgRequest(**r) for r in job["requests"]]
        with meter:
            await run_waves(
                form, client, reqs, job.get("waves", 1), job.get("pause", 0.0), measured
            )
        stats = jsonable_stats(client.scheduler.stats)
        stats["polls_measured"] = client.scheduler.stats.polls_total - polls_before
        transport = transport_name(client)
    return {
        "failures": failures,
        "warmup_task_ids": warm_ids,
        "scheduler_stats": stats,
        "max_in_flight": stats.get("max_in_flight"),
        "transport": transport,
        **meter.as_dict(),
    }
