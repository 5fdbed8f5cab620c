"""The library's scenarios, and the worker entry point every client process runs.

``python benchmarks/_scenarios.py`` reads one JSON job on stdin, runs it in this
(fresh) process and prints one JSON result line: the process's CPU time, wall
time and peak RSS, plus ``deliveries`` (task_id -> ``time.monotonic()`` when the
result reached the caller) for the emulator's completion times to be set against.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
from typing import Any

from _harness import EMULATOR_KEY, Meter, make_transport

CLIENTS = {
    "novita-httpx": "novita_async, httpx default pool (asyncio)",
    "novita-aiohttp": "novita_async, httpx-aiohttp transport (asyncio)",
    "novita-trio": "novita_async, httpx default pool (trio)",
    "naive": "naive: httpx + gather + sleep(1.0)",
    "naive-aiohttp": "naive loop on the httpx-aiohttp transport",
}


async def run_novita(
    base_url: str,
    requests: list[dict[str, Any]],
    warmup: list[dict[str, Any]],
    deliveries: dict[str, float],
    meter: Meter,
    *,
    transport: str,
    policy: dict[str, Any],
) -> dict[str, Any]:
    """``client.txt2img_many`` over every request; stamps each item as it is yielded.

    ``warmup`` requests run first through the same client (unmeasured), so its
    scheduler has learned task durations -- a long-lived client's steady state.
    """
    from novita_async import AsyncNovita, PollPolicy, Txt2ImgRequest  # imported before the meter

    counting = make_transport(transport)
    failures = 0
    async with AsyncNovita(
        EMULATOR_KEY, base_url=base_url, transport=counting, poll_policy=PollPolicy(**policy)
    ) as client:
        warm_ids: list[str] = []
        if warmup:
            items = await client.txt2img_all(
                [Txt2ImgRequest(**r) for r in warmup], images_per_minute=None
            )
            warm_ids = [item.task_id for item in items if item.task_id is not None]
            counting.reset()
        reqs = [Txt2ImgRequest(**r) for r in requests]
        with meter:
            async with client.txt2img_many(reqs, images_per_minute=None) as run:
                async for item in run:
                    now = time.monotonic()
                    if item.error is not None or item.task_id is None:
                        failures += 1
                        continue
                    deliveries[item.task_id] = now
        stats = client.scheduler.stats
    return {
        "http_requests": counting.requests,
        "max_in_flight": counting.max_in_flight,
        "failures": failures,
        "warmup_task_ids": warm_ids,
        "scheduler_stats": _jsonable(stats),
    }


def _jsonable(stats: Any) -> Any:
    """The scheduler's counters as JSON (without the live per-task map)."""
    import attrs

    if not attrs.has(type(stats)):
        return repr(stats)
    out = attrs.asdict(stats)
    out.pop("polls_by_task", None)
    return json.loads(json.dumps(out, default=str))


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    # Each process imports only what its client needs (peak RSS is compared),
    # and before its meter starts.
    kind = job["kind"]
    if kind == "micro":
        if job["transport"] == "aiohttp":
            importlib.import_module("httpx_aiohttp")
        from _micro import run_micro

        return asyncio.run(
            run_micro(
                job["base_url"],
                transport=job["transport"],
                concurrency=job["concurrency"],
                seconds=job["seconds"],
            )
        )

    client = job["client"]
    deliveries: dict[str, float] = {}
    base_url, requests, warmup = job["base_url"], job["requests"], job.get("warmup", [])
    meter = Meter()
    if client in ("naive", "naive-aiohttp"):
        from _naive import run_naive

        kind = "aiohttp" if client == "naive-aiohttp" else "httpx"
        if kind == "aiohttp":
            importlib.import_module("httpx_aiohttp")
        extra = asyncio.run(
            run_naive(base_url, requests, warmup, deliveries, meter, transport_kind=kind)
        )
    elif client in ("novita-httpx", "novita-aiohttp", "novita-trio"):
        import anyio

        importlib.import_module("novita_async")
        if client == "novita-aiohttp":
            importlib.import_module("httpx_aiohttp")
        backend = "trio" if client == "novita-trio" else "asyncio"
        transport = "aiohttp" if client == "novita-aiohttp" else "httpx"
        policy = job.get("policy") or {}
        extra = anyio.run(
            lambda: run_novita(
                base_url, requests, warmup, deliveries, meter, transport=transport, policy=policy
            ),
            backend=backend,
        )
    else:
        raise ValueError(f"unknown client {client!r}")
    return {"client": client, "deliveries": deliveries, **extra, **meter.as_dict()}


def main() -> None:
    job = json.loads(sys.stdin.read())
    result = run_job(job)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
