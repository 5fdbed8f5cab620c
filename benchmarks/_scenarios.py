"""The worker entry point every client process runs.

``python benchmarks/_scenarios.py`` reads one JSON job on stdin, runs it in this
(fresh) process and prints one JSON result line: the process's CPU time, wall
time and peak RSS, plus ``deliveries`` (task_id -> ``time.monotonic()`` when the
result reached the caller) for the emulator's completion times to be set against.

Job kinds: ``library`` (``_forms``: a usage form on a backend), ``loop`` (the
hand-written baselines of ``_naive``), ``micro`` (``_micro``), ``webhooks``
(``_hooks``: emulator in this process, or in its own for ``delivery: loopback``).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from typing import Any

#: Client names of the scenario tables -> labels.
CLIENTS = {
    "naive": "hand-written httpx + gather + sleep(1)",
    "loop-0.25": "fixed 0.25 s loop (httpx-aiohttp)",
    "loop-0.5": "fixed 0.5 s loop (httpx-aiohttp)",
    "loop-1": "fixed 1 s loop (httpx-aiohttp)",
    "loop-2": "fixed 2 s loop (httpx-aiohttp)",
    "trio-loop-1": "fixed 1 s loop (trio, httpx-shards)",
}


def loop_params(client: str) -> tuple[float, str]:
    """(interval, transport) of a baseline client name."""
    if client == "naive":
        return 1.0, "httpx"
    if client.startswith("loop-"):
        return float(client.removeprefix("loop-")), "aiohttp"
    if client == "trio-loop-1":
        return 1.0, "shards"
    raise ValueError(f"unknown baseline {client!r}")


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    # Each process imports only what its client needs (peak RSS is compared),
    # and before its meter starts.
    kind = job["kind"]
    deliveries: dict[str, float] = {}
    if kind == "micro":
        import anyio
        from _micro import run_micro

        return dict(
            anyio.run(
                lambda: run_micro(
                    job["base_url"],
                    transport=job["transport"],
                    concurrency=job["concurrency"],
                    seconds=job["seconds"],
                    backend=job["backend"],
                ),
                backend=job["backend"],
            )
        )
    if kind == "loop":
        from _naive import run_loop

        interval, transport = loop_params(job["client"])
        if transport == "aiohttp":
            importlib.import_module("httpx_aiohttp")
        if job.get("backend") == "trio":
            import anyio

            importlib.import_module("novita_async._pool")
            extra = anyio.run(
                lambda: run_loop(job, deliveries, interval=interval, transport_kind=transport),
                backend="trio",
            )
        else:
            extra = asyncio.run(
                run_loop(job, deliveries, interval=interval, transport_kind=transport)
            )
    elif kind in ("library", "webhooks"):
        import anyio

        importlib.import_module("novita_async")
        if kind == "webhooks":
            from _hooks import run_webhooks, run_webhooks_loopback

            loopback = job.get("delivery") == "loopback"
            runner = run_webhooks_loopback if loopback else run_webhooks
            return dict(anyio.run(runner, job, backend=job["backend"]))
        from _forms import run_library

        extra = anyio.run(run_library, job, deliveries, backend=job["backend"])
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    return {"deliveries": deliveries, **extra}


def main() -> None:
    job = json.loads(sys.stdin.read())
    result = run_job(job)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
