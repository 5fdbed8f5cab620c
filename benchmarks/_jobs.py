"""Processes: the emulator (``_server.py``) and one fresh client process per job.

Every job runs in a process of its own (``_scenarios.py``), so client CPU and
peak RSS are the client's alone; the emulator runs in another. A watchdog kills
a job that outlives its timeout, so one stuck scenario costs its timeout, never
the whole run.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Emulator", "JobError", "emulator", "run_worker"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class JobError(RuntimeError):
    """A job failed, timed out or printed no result."""


class Emulator:
    """Handle on an emulator process: its URL, CPU time and per-task counters."""

    def __init__(self, proc: subprocess.Popen[str], info: dict[str, Any]) -> None:
        self.proc = proc
        self.base_url: str = info["base_url"]
        self.pid: int = info["pid"]

    def _ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise JobError(f"emulator exited (code {self.proc.poll()})")
        return dict(json.loads(line))

    def cpu(self) -> float:
        """The emulator process's CPU seconds so far."""
        return float(self._ask("cpu")["cpu_s"])

    def stats(self) -> dict[str, Any]:
        return self._ask("stats")

    def forge(self, count: int) -> None:
        """Start posting ``count`` forgeries for running tasks and ``count`` for random ids."""
        self._ask(f"forge {count}")


@contextmanager
def emulator(
    durations: str,
    seed: int,
    *,
    eta: str = "zero",
    webhooks: dict[str, Any] | None = None,
    workers: int | None = None,
) -> Iterator[Emulator]:
    """An emulator process serving the ``durations`` model with ``eta`` reporting.

    ``webhooks``: deliver webhooks over HTTP (``emu.webhooks()``'s keyword arguments);
    ``workers``: run that many tasks at once, the others queued.
    """
    command = [sys.executable, str(HERE / "_server.py"), "--durations", durations]
    command += ["--seed", str(seed), "--eta", eta]
    if workers is not None:
        command += ["--workers", str(workers)]
    if webhooks is not None:
        command += ["--webhooks", json.dumps(webhooks)]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(30.0, proc.kill)  # start-up only
    watchdog.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        watchdog.cancel()
        if not line:
            raise JobError(f"emulator failed to start (code {proc.wait()})")
        yield Emulator(proc, json.loads(line))
    finally:
        watchdog.cancel()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # EOF: the server shuts down
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_worker(
    job: dict[str, Any], timeout: float, on_measuring: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Run one job in a fresh client process; returns its JSON result.

    The worker prints ``{"event": "measuring"}`` as its meter starts (after
    imports and any warm-up); ``on_measuring`` is called right then. Raises
    :class:`JobError` on a non-zero exit, no result, or after ``timeout`` s.
    """
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_scenarios.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    reader.start()
    result: dict[str, Any] | None = None
    try:
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        for line in proc.stdout:
            message = json.loads(line)
            if message.get("event") == "measuring":
                if on_measuring is not None:
                    on_measuring()
            else:
                result = message
        code = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    if timed_out.is_set():
        raise JobError(f"timed out after {timeout:.0f} s")
    if code != 0 or result is None:
        tail = "".join(errors).strip().splitlines()[-3:]
        raise JobError(f"exit code {code}: " + " | ".join(tail))
    return result
