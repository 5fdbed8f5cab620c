"""Transport micro-benchmark: many concurrent task-result GETs through one pool.

``concurrency`` coroutines each loop ``GET /v3/async/task-result`` (+ JSON
decode) for ``seconds`` against a task that never finishes, through a pool of
``POOL_SIZE`` connections (AsyncNovita's default). Above the pool size the
extra requests wait inside the transport's pool -- where httpcore's
bookkeeping grows with the queue.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from _harness import EMULATOR_KEY, POOL_SIZE, Meter, make_transport

__all__ = ["run_micro"]


async def run_micro(
    base_url: str, *, transport: str, concurrency: int, seconds: float
) -> dict[str, Any]:
    counting = make_transport(transport, max_connections=POOL_SIZE)
    headers = {"Authorization": f"Bearer {EMULATOR_KEY}"}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, transport=counting, timeout=60.0
    ) as http:
        response = await http.post(
            "/v3/async/txt2img",
            json={
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
            },
        )
        response.raise_for_status()
        params = {"task_id": response.json()["task_id"]}
        latencies: list[float] = []

        async def worker(deadline: float | None, count: int | None) -> None:
            done = 0
            while (deadline is None or time.monotonic() < deadline) and (
                count is None or done < count
            ):
                start = time.monotonic()
                r = await http.get("/v3/async/task-result", params=params)
                r.raise_for_status()
                r.json()
                done += 1
                if deadline is not None:
                    latencies.append(time.monotonic() - start)

        # Warm-up: open the pool's connections, then measure.
        await asyncio.gather(*(worker(None, 2) for _ in range(concurrency)))
        warm = counting.requests
        with Meter() as meter:
            deadline = time.monotonic() + seconds
            await asyncio.gather(*(worker(deadline, None) for _ in range(concurrency)))
    n = counting.requests - warm
    latencies.sort()
    return {
        "transport": transport,
        "concurrency": concurrency,
        "requests": n,
        "requests_per_s": n / meter.wall,
        "cpu_us_per_request": meter.cpu / n * 1e6,
        "latency_p50_ms": latencies[len(latencies) // 2] * 1e3,
        "latency_p95_ms": latencies[int(len(latencies) * 0.95)] * 1e3,
        "max_in_flight": counting.max_in_flight,
        **meter.as_dict(),
    }
