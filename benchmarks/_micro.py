"""Transport micro-benchmark: many concurrent task-result GETs through one pool.

``concurrency`` coroutines each loop ``GET /v3/async/task-result`` (+ JSON
decode) for ``seconds`` against a task that never finishes, through ONE pool of
``POOL_SIZE`` connections (AsyncNovita's default). Above the pool size the
extra requests wait inside the transport's pool -- where some pools' bookkeeping
grows with the queue. Transports (``TRANSPORTS``):

* ``httpx``: httpx's own pool (httpcore), what ``httpx.AsyncClient`` builds;
* ``httpx-shards``: httpx's pool in shards of 8 connections, the library's default on
  trio (``novita_async._pool.ShardedPool``; trio only);
* ``httpx-aiohttp``: httpx with the httpx-aiohttp transport;
* ``aiohttp``: a raw ``aiohttp.ClientSession`` (the floor);
* ``httpx2``: httpx2's ``AsyncClient`` (Python >= 3.11), when installed.

All run on asyncio; ``httpx`` and ``httpx2`` also on trio (``backend``), the
cost basis of the library's trio rows.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from _harness import EMULATOR_KEY, POOL_SIZE, Meter

__all__ = ["TRANSPORTS", "run_micro"]

TRANSPORTS = {
    "httpx": "httpx (httpcore pool)",
    "httpx-shards": "httpx, 8-connection shards",
    "httpx-aiohttp": "httpx + httpx-aiohttp transport",
    "aiohttp": "raw aiohttp",
    "httpx2": "httpx2",
}
BODY = {
    "request": {
        "model_name": "m.safetensors",
        "prompt": "micro",
        "width": 512,
        "height": 512,
        "image_num": 1,
        "steps": 20,
        "guidance_scale": 7.5,
        "sampler_name": "Euler a",
    }
}
Get = Callable[[dict[str, str]], Awaitable[Any]]


@asynccontextmanager
async def _session(kind: str, base_url: str) -> AsyncIterator[tuple[Get, Get]]:
    """(post, get) coroutines of one client of ``kind`` with a pool of ``POOL_SIZE``."""
    headers = {"Authorization": f"Bearer {EMULATOR_KEY}"}
    if kind == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=POOL_SIZE)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(
            base_url, headers=headers, connector=connector, timeout=timeout
        ) as session:

            async def apost(body: dict[str, Any]) -> Any:
                async with session.post("/v3/async/txt2img", json=body) as r:
                    r.raise_for_status()
                    return await r.json()

            async def aget(params: dict[str, str]) -> Any:
                async with session.get("/v3/async/task-result", params=params) as r:
                    r.raise_for_status()
                    return await r.json()

            yield apost, aget
        return
    if kind == "httpx2":
        import httpx2 as hx  # type: ignore[import-not-found,unused-ignore]

        transport = None
    else:
        import httpx as hx

        transport = None
        if kind == "httpx-shards":
            from novita_async._pool import ShardedPool

            transport = ShardedPool(max_connections=POOL_SIZE)
        if kind == "httpx-aiohttp":
            from httpx_aiohttp import AiohttpTransport

            limits = hx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE)
            transport = AiohttpTransport(limits=limits)
    limits = hx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE)
    async with hx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=60.0, transport=transport
    ) as http:

        async def post(body: dict[str, Any]) -> Any:
            r = await http.post("/v3/async/txt2img", json=body)
            r.raise_for_status()
            return r.json()

        async def get(params: dict[str, str]) -> Any:
            r = await http.get("/v3/async/task-result", params=params)
            r.raise_for_status()
            return r.json()

        yield post, get


async def run_micro(
    base_url: str, *, transport: str, concurrency: int, seconds: float, backend: str
) -> dict[str, Any]:
    async with _session(transport, base_url) as (post, get):
        params = {"task_id": (await post(BODY))["task_id"]}
        latencies: list[float] = []
        done = 0

        async def worker(deadline: float | None, count: int | None) -> None:
            nonlocal done
            n = 0
            while deadline is None or time.monotonic() < deadline:
                if count is not None and n >= count:
                    break
                start = time.monotonic()
                await get(params)
                n += 1
                if deadline is not None:
                    done += 1
                    latencies.append(time.monotonic() - start)

        # Warm-up: open the pool's connections, then measure.
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker, None, 2)
        meter = Meter()
        with meter:
            deadline = time.monotonic() + seconds
            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(worker, deadline, None)
    latencies.sort()
    return {
        "transport": transport,
        "backend": backend,
        "concurrency": concurrency,
        "requests": done,
        "requests_per_s": done / meter.wall,
        "cpu_us_per_request": meter.cpu / done * 1e6,
        "latency_p50_ms": latencies[len(latencies) // 2] * 1e3,
        "latency_p95_ms": latencies[int(len(latencies) * 0.95)] * 1e3,
        **meter.as_dict(),
    }
