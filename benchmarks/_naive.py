"""The baseline: what people write by hand -- httpx + gather + a fixed 1 s sleep."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from _harness import EMULATOR_KEY, Meter, make_transport

__all__ = ["run_naive"]

TERMINAL = frozenset({"TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED"})


async def run_naive(
    base_url: str,
    requests: list[dict[str, Any]],
    warmup: list[dict[str, Any]],
    deliveries: dict[str, float],
    meter: Meter,
    *,
    transport_kind: str = "httpx",
) -> dict[str, Any]:
    """POST every request at once; each task then loops GET + ``sleep(1.0)`` until terminal.

    A plain ``httpx.AsyncClient`` with httpx's default pool limits (100
    connections, 20 kept alive); only the timeout is raised so that the
    baseline does not fail outright while 500 requests queue for the pool.
    ``transport_kind="aiohttp"`` swaps in httpx-aiohttp (same limits), to
    separate the cost of the polling strategy from that of httpcore's pool.
    """
    transport = make_transport(transport_kind, max_connections=None)
    headers = {"Authorization": f"Bearer {EMULATOR_KEY}"}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, transport=transport, timeout=60.0
    ) as http:

        async def one(request: dict[str, Any], deliveries: dict[str, float]) -> None:
            response = await http.post("/v3/async/txt2img", json={"request": request})
            response.raise_for_status()
            task_id = response.json()["task_id"]
            while True:
                response = await http.get("/v3/async/task-result", params={"task_id": task_id})
                response.raise_for_status()
                if response.json()["task"]["status"] in TERMINAL:
                    deliveries[task_id] = time.monotonic()
                    return
                await asyncio.sleep(1.0)

        warm: dict[str, float] = {}
        if warmup:  # same as the library's warm-up: one unmeasured batch first
            await asyncio.gather(*(one(r, warm) for r in warmup))
            transport.reset()
        with meter:
            await asyncio.gather(*(one(r, deliveries) for r in requests))
    return {
        "http_requests": transport.requests,
        "max_in_flight": transport.max_in_flight,
        "warmup_task_ids": list(warm),
    }
