"""The emulator process: serves ``NovitaEmulator`` on 127.0.0.1 and answers on stdin.

Prints ``{"base_url": ..., "pid": ...}`` once listening, then reads commands,
one per line, answering each with one JSON line on stdout:

* ``cpu``   -> ``{"cpu_s": <this process's CPU seconds>}``
* ``stats`` -> ``{"tasks_created": n, "tasks": {task_id: {created_at, completed_at,
  first_terminal_poll_at, polls}}}`` (times are ``time.monotonic()``), plus
  ``webhooks`` (see below) when serving with ``--webhooks``
* ``forge N`` -> ``{"forging": N}``: starts posting N forged "succeeded" deliveries
  for running tasks and N for random ids, spread out (``--webhooks`` only)

``--webhooks JSON`` delivers webhooks over HTTP (``emu.serve(webhooks=...)``,
the JSON its keyword arguments; POSTed with aiohttp) to each task's
``extra.webhook.url``, stamping
the first genuine POST of each task (``time.monotonic()``, before sending);
forgeries carry images on ``forged.invalid`` and are posted to the URL the
client's tasks carry. ``stats`` then adds ``webhooks``: ``first_delivery``
(task_id -> stamp), ``random_ids``, ``forged_running`` (task ids),
``gets_unknown_ids`` (task-result GETs for the random ids) and ``sender``
(the sender's counters).

``--eta zero`` answers ``eta: 0`` for running tasks, as Novita's image tasks do;
``--eta int`` answers whole seconds left, rounded up (Novita's eta when it gives
one); ``--eta exact`` the emulator's own float.

EOF on stdin shuts the server down. Using a pipe instead of an admin HTTP
endpoint keeps the measurement out of the HTTP path the clients are timed on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workloads import duration_for

from novita_async.testing import NovitaEmulator

FORGED_HOST = "forged.invalid"


def durations(model: str, seed: int) -> Callable[[Mapping[str, Any]], float]:
    if model == "never":  # the micro-benchmark polls a task that stays PROCESSING
        return lambda _body: 1e6
    return duration_for(model, seed=seed)


def make_emulator(model: str, seed: int, eta: str, workers: int | None = None) -> NovitaEmulator:
    report = {"int": "whole", "zero": False}.get(eta, True)
    return NovitaEmulator(
        durations=durations(model, seed),
        # int: whole seconds left, rounded up; zero: ``eta`` stays 0, as on Novita's image tasks
        report_eta=report,  # type: ignore[arg-type]
        workers=workers,  # None: every task runs at once, no queueing on the emulated GPUs
        images_per_minute=None,  # no IPM quota: measure polling, not the rate limiter
        clock=time.monotonic,
        seed=seed,
    )


def task_stats(emu: Any) -> dict[str, Any]:
    out = {}
    for task_id, record in emu.tasks.items():
        out[task_id] = {
            "created_at": _get(record, "created_at"),
            "completed_at": _get(record, "completed_at"),
            "first_terminal_poll_at": _get(record, "first_terminal_poll_at"),
            "polls": emu.polls.get(task_id, 0),
        }
    return {"tasks_created": emu.tasks_created, "tasks": out}


def _get(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name, None)


class Hooks:
    """Webhook delivery over HTTP with a first-delivery stamp per task, and forgeries."""

    def __init__(self, emu: NovitaEmulator, seed: int) -> None:
        self.emu = emu
        self.first_delivery: dict[str, float] = {}
        self.random_ids: list[str] = []
        self.forged_running: list[str] = []
        self.rng = random.Random(f"bench-forgeries:{seed}")
        self.http: Any = None  # an aiohttp session, made inside the event loop
        self.sender: Any = None

    async def deliver(self, url: str, body: bytes) -> int:
        # aiohttp, not the sender's default httpx client: at ~1000 POSTs/s to a receiver
        # that closes each connection, httpcore's pool collapses (PoolTimeout, minutes late).
        import aiohttp

        if self.http is None:
            connector = aiohttp.TCPConnector(limit=64)
            self.http = aiohttp.ClientSession(connector=connector)
        if FORGED_HOST.encode() not in body:
            task_id = json.loads(body)["payload"]["task"]["task_id"]
            self.first_delivery.setdefault(task_id, time.monotonic())
        headers = {"content-type": "application/json"}
        async with self.http.post(url, data=body, headers=headers) as response:
            await response.read()
            return int(response.status)

    async def forge(self, count: int) -> None:
        """``count`` forgeries for running tasks and as many for random ids, spread out."""
        await anyio.sleep(0.5)
        for _ in range(count):
            now = time.monotonic()
            url = next((t.webhook_url for t in self.emu.tasks.values() if t.webhook_url), None)
            if url is None:
                await anyio.sleep(0.02)
                continue
            running = [
                t.task_id
                for t in self.emu.tasks.values()
                if t.completed_at > now + 0.3 and t.task_id not in self.forged_running
            ]
            if running:
                self.forged_running.append(self.rng.choice(running))
                await self.sender.forge(url, self.forged_running[-1])
            self.random_ids.append(str(uuid.UUID(int=self.rng.getrandbits(128), version=4)))
            await self.sender.forge(url, self.random_ids[-1])
            await anyio.sleep(0.02)

    def stats(self) -> dict[str, Any]:
        wh = self.emu.webhook_stats
        return {
            "first_delivery": self.first_delivery,
            "random_ids": self.random_ids,
            "forged_running": self.forged_running,
            "gets_unknown_ids": sum(self.emu.polls.get(t, 0) for t in self.random_ids),
            "sender": {
                k: getattr(wh, k)
                for k in ("sent", "acknowledged", "retries", "duplicates", "lost", "forgeries")
            },
        }


async def serve(
    model: str, seed: int, eta: str, webhooks: dict[str, Any] | None, workers: int | None
) -> None:
    emu = make_emulator(model, seed, eta, workers)
    hooks = Hooks(emu, seed) if webhooks is not None else None
    options = None if hooks is None else {"deliver": hooks.deliver, "seed": seed, **webhooks}
    async with emu.serve(webhooks=options) as server, anyio.create_task_group() as tg:
        if hooks is not None:
            hooks.sender = server.webhooks
        sys.stdout.write(json.dumps({"base_url": server.base_url, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            command, _, arg = line.strip().partition(" ")
            if not line:
                break
            if command == "cpu":
                answer: dict[str, Any] = {"cpu_s": time.process_time()}
            elif command == "stats":
                answer = task_stats(emu)
                if hooks is not None:
                    answer["webhooks"] = hooks.stats()
            elif command == "forge" and hooks is not None:
                tg.start_soon(hooks.forge, int(arg))
                answer = {"forging": int(arg)}
            else:
                answer = {"error": f"unknown command {command!r}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
        tg.cancel_scope.cancel()
    if hooks is not None and hooks.http is not None:
        await hooks.http.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--durations", required=True, help="a duration model, or 'never'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", choices=("int", "exact", "zero"), default="zero")
    p.add_argument("--webhooks", default=None, help="deliver webhooks: emu.webhooks() kwargs")
    p.add_argument("--workers", type=int, default=None, help="tasks run at once (default: all)")
    args = p.parse_args()
    webhooks = None if args.webhooks is None else dict(json.loads(args.webhooks))
    anyio.run(serve, args.durations, args.seed, args.eta, webhooks, args.workers)


if __name__ == "__main__":
    main()
