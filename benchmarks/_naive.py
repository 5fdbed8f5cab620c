"""Baselines: what people write by hand -- httpx + gather + a fixed sleep.

* ``naive``: a plain ``httpx.AsyncClient`` (httpx's default pool limits, 100
  connections, 20 kept alive), every prompt POSTed at once, each task then loops
  GET + ``sleep(1.0)`` until terminal. Only the timeout is raised, so that the
  baseline does not fail outright while hundreds of requests queue for the pool.
* ``loop-<interval>``: the same loop with another fixed interval, on the
  httpx-aiohttp transport (so the strategy, not httpcore's pool, sets its
  latency): the fixed-interval points of the trade-off curve.
* ``trio-loop-1``: the 1 s loop on trio, on the library's default trio transport
  (httpx's pool in shards), at most 16 requests in flight (the library's cap on
  polls): what a request costs on trio on each workload, nothing but the transport
  and JSON.

A loop that has not delivered everything ``deadline`` seconds into the measured
batch (httpcore's pool can collapse under 1000 requests in flight on 2 busy
cores: PoolTimeout) stops there; its undelivered tasks count as failures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
from _harness import EMULATOR_KEY, Meter, make_transport

__all__ = ["run_loop"]

TERMINAL = frozenset({"TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED"})


async def run_loop(
    job: dict[str, Any], deliveries: dict[str, float], *, interval: float, transport_kind: str
) -> dict[str, Any]:
    """POST every request (waves ``pause`` s apart), then poll each every ``interval`` s
    (on the job's backend: asyncio gathers the tasks, trio runs them in a task group)."""
    trio = job.get("backend") == "trio"
    sleep: Callable[[float], Awaitable[Any]] = anyio.sleep if trio else asyncio.sleep
    transport = make_transport(transport_kind, max_connections=None)
    headers = {"Authorization": f"Bearer {EMULATOR_KEY}"}
    requests, warmup = job["requests"], job.get("warmup") or []
    waves, pause = max(1, job.get("waves", 1)), job.get("pause", 0.0)
    size = -(-len(requests) // waves)
    failures = 0
    async with httpx.AsyncClient(
        base_url=job["base_url"], headers=headers, transport=transport, timeout=120.0
    ) as http:

        async def one(request: dict[str, Any], stamps: dict[str, float], delay: float) -> None:
            nonlocal failures
            if delay:
                await sleep(delay)
            response = await http.post("/v3/async/txt2img", json={"request": request})
            response.raise_for_status()
            task_id = response.json()["task_id"]
            while True:
                response = await http.get("/v3/async/task-result", params={"task_id": task_id})
                response.raise_for_status()
                status = response.json()["task"]["status"]
                if status in TERMINAL:
                    stamps[task_id] = time.monotonic()
                    failures += status != "TASK_STATUS_SUCCEED"
                    return
                await sleep(interval)

        warm: dict[str, float] = {}
        if warmup:  # same as the library's warm-up: one unmeasured batch first
            if trio:
                await _all_trio([one(r, warm, 0.0) for r in warmup], None)
            else:
                await asyncio.gather(*(one(r, warm, 0.0) for r in warmup))
            transport.reset()
            failures = 0
        meter = Meter()
        with meter:
            batch = [one(r, deliveries, (i // size) * pause) for i, r in enumerate(requests)]
            if trio:
                outcomes = await _all_trio(batch, job["deadline"])
            else:
                gathered = asyncio.gather(*batch, return_exceptions=True)
                try:
                    outcomes = await asyncio.wait_for(gathered, job["deadline"])
                except asyncio.TimeoutError:
                    outcomes = []
            errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    return {
        "failures": failures,
        "max_in_flight": transport.max_in_flight,
        "warmup_task_ids": list(warm),
        "errors": sorted(set(errors))[:3] or (["deadline"] if not outcomes else []),
        "transport": f"{transport_kind} (counted)",
        **meter.as_dict(),
    }


async def _all_trio(coros: list[Awaitable[None]], deadline: float | None) -> list[Any]:
    """Run ``coros`` in one task group: their outcomes (an exception or None), or ``[]``
    if ``deadline`` seconds passed first (the rest are cancelled)."""
    outcomes: list[Any] = [None] * len(coros)

    async def one(i: int, coro: Awaitable[None]) -> None:
        try:
            await coro
        except Exception as exc:
            outcomes[i] = exc

    with anyio.move_on_after(deadline if deadline is not None else float("inf")) as scope:
        async with anyio.create_task_group() as tg:
            for i, coro in enumerate(coros):
                tg.start_soon(one, i, coro)
    return [] if scope.cancelled_caught else outcomes
