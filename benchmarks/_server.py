"""The emulator process: serves ``NovitaEmulator`` on 127.0.0.1 and answers on stdin.

Prints ``{"base_url": ..., "pid": ...}`` once listening, then reads commands,
one per line, answering each with one JSON line on stdout:

* ``cpu``   -> ``{"cpu_s": <this process's CPU seconds>}``
* ``stats`` -> ``{"tasks_created": n, "tasks": {task_id: {created_at, completed_at,
  first_terminal_poll_at, polls}}}`` (times are ``time.monotonic()``)

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
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workloads import duration_for

from novita_async.testing import NovitaEmulator


def durations(model: str, seed: int) -> Callable[[Mapping[str, Any]], float]:
    if model == "never":  # the micro-benchmark polls a task that stays PROCESSING
        return lambda _body: 1e6
    return duration_for(model, seed=seed)


def make_emulator(model: str, seed: int, eta: str) -> NovitaEmulator:
    report = {"int": "whole", "zero": False}.get(eta, True)
    return NovitaEmulator(
        durations=durations(model, seed),
        # int: whole seconds left, rounded up; zero: ``eta`` stays 0, as on Novita's image tasks
        report_eta=report,  # type: ignore[arg-type]
        workers=None,  # every task runs at once: no queueing on the emulated GPUs
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


async def serve(model: str, seed: int, eta: str) -> None:
    emu = make_emulator(model, seed, eta)
    async with emu.serve() as server:
        sys.stdout.write(json.dumps({"base_url": server.base_url, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            command = line.strip()
            if not line:
                break
            if command == "cpu":
                answer: dict[str, Any] = {"cpu_s": time.process_time()}
            elif command == "stats":
                answer = task_stats(emu)
            else:
                answer = {"error": f"unknown command {command!r}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--durations", required=True, help="a duration model, or 'never'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", choices=("int", "exact", "zero"), default="zero")
    args = p.parse_args()
    anyio.run(serve, args.durations, args.seed, args.eta)


if __name__ == "__main__":
    main()
