"""Speed and memory benchmarks against the emulator over loopback HTTP.

Usage (from the repository root; ``nox -s bench`` runs the second line)::

    python benchmarks/run.py                 # print the tables, save benchmarks/results.json
    python benchmarks/run.py --write-readme  # ... and rewrite README.md's bench section
    python benchmarks/run.py --quick         # smaller, for a smoke run (~2 min)

Every scenario gets a fresh emulator process (``_server.py``) and a fresh
client process (``_scenarios.py``), so client CPU and peak RSS are the client's
alone. Completion -> caller latency compares the emulator's completion instant
with the client's delivery stamp; both are ``time.monotonic()`` (CLOCK_MONOTONIC,
system-wide on Linux, so comparable across the two processes).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _report import machine_facts, render, summarize, write_readme  # noqa: E402
from _scenarios import CLIENTS  # noqa: E402
from _workloads import WORKLOADS, request_dicts  # noqa: E402

ROOT = HERE.parent
JOB_TIMEOUT = 120.0


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
            raise RuntimeError(f"emulator exited (code {self.proc.poll()})")
        return dict(json.loads(line))

    def cpu(self) -> float:
        """The emulator process's CPU seconds so far."""
        return float(self._ask("cpu")["cpu_s"])

    def stats(self) -> dict[str, Any]:
        return self._ask("stats")


@contextmanager
def emulator(workload: str, seed: int, *, eta: bool = True) -> Iterator[Emulator]:
    command = [
        sys.executable,
        str(HERE / "_server.py"),
        "--workload",
        workload,
        "--seed",
        str(seed),
    ]
    proc = subprocess.Popen(
        command if eta else [*command, "--no-eta"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"emulator failed to start (code {proc.wait()})")
        yield Emulator(proc, json.loads(line))
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # EOF: the server shuts down
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_worker(job: dict[str, Any], on_measuring: Callable[[], None]) -> dict[str, Any]:
    """Run one job in a fresh client process; returns its JSON result.

    The worker prints ``{"event": "measuring"}`` as its meter starts (after
    imports and any warm-up); ``on_measuring`` is called right then.
    """
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_scenarios.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(json.dumps(job))
    proc.stdin.close()
    result: dict[str, Any] | None = None
    try:
        for line in proc.stdout:
            message = json.loads(line)
            if message.get("event") == "measuring":
                on_measuring()
            else:
                result = message
        code = proc.wait(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0 or result is None:
        raise RuntimeError(f"job {job.get('client') or job['kind']} failed (exit code {code})")
    return result


def scenario(
    workload: str,
    eta: bool,
    client: str,
    tasks: int,
    warmup: int,
    seed: int,
    policy: dict[str, Any],
) -> dict[str, Any]:
    requests = request_dicts(tasks, seed=seed)
    # Other prompts, hence other (deterministic) durations than the measured batch.
    warm = request_dicts(warmup, seed=seed + 1000) if warmup else []
    with emulator(workload, seed, eta=eta) as emu:
        marks: list[float] = []
        job = {
            "kind": "scenario",
            "client": client,
            "base_url": emu.base_url,
            "requests": requests,
            "warmup": warm,
            "policy": policy,
        }
        worker = run_worker(job, lambda: marks.append(emu.cpu()))
        server = emu.stats()
        server["cpu_s"] = emu.cpu() - marks[0]
    row = summarize(workload, client, CLIENTS[client], worker, server)
    row["eta"] = eta
    row["warm"] = bool(warmup)
    return row


def micro(levels: list[int], seconds: float, seed: int) -> list[dict[str, Any]]:
    out = []
    with emulator("never", seed) as emu:
        marks: list[float] = []

        def mark() -> None:
            marks.append(emu.cpu())

        for concurrency in levels:
            for transport in ("httpx", "aiohttp"):
                job = {
                    "kind": "micro",
                    "base_url": emu.base_url,
                    "transport": transport,
                    "concurrency": concurrency,
                    "seconds": seconds,
                }
                result = run_worker(job, mark)
                server_cpu = emu.cpu() - marks[-1]
                result["server_cpu_us_per_request"] = server_cpu / result["requests"] * 1e6
                out.append(result)
                print(_micro_line(out[-1]), flush=True)
    return out


def _micro_line(m: dict[str, Any]) -> str:
    return (
        f"  micro {m['transport']:>7} x{m['concurrency']:<4} {m['requests_per_s']:7.0f} req/s "
        f"{m['cpu_us_per_request']:6.0f} us CPU/req"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=None, help="tasks per scenario (default 400)")
    p.add_argument("--quick", action="store_true", help="fewer tasks, shorter micro-benchmark")
    p.add_argument("--write-readme", action="store_true", help="rewrite README.md's bench section")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    p.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated")
    p.add_argument(
        "--eta",
        choices=("both", "on", "off"),
        default="both",
        help="emulator reports the exact eta (on) or eta 0 like Novita's image tasks (off)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="tasks a client runs before the measured batch, for warm rows (default 100)",
    )
    p.add_argument(
        "--cold-clients",
        default="novita-httpx",
        help="clients also measured cold: a fresh client, nothing learned (comma-separated)",
    )
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="PollPolicy override for the library's clients (repeatable; for experiments)",
    )
    p.add_argument("--micro-levels", default=None, help="in-flight GETs, e.g. 50,200,500")
    p.add_argument("--micro-seconds", type=float, default=None)
    p.add_argument("--no-micro", action="store_true", help="skip the transport micro-benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=HERE / "results.json", help="raw results file")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: render --json's results (and --write-readme them)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        body = render(json.loads(args.json.read_text()))
        print(body)
        if args.write_readme:
            write_readme(args.readme, body)
        return 0
    started = time.monotonic()
    tasks = args.tasks or (120 if args.quick else 400)
    warmup = args.warmup if args.warmup is not None else (40 if args.quick else 100)
    policy = {}
    for item in args.policy:
        name, _, value = item.partition("=")
        policy[name] = None if value == "None" else json.loads(value)
    levels = [
        int(x) for x in (args.micro_levels or ("50,500" if args.quick else "50,200,500")).split(",")
    ]
    seconds = args.micro_seconds or (1.0 if args.quick else 2.0)
    workloads = [w for w in args.workloads.split(",") if w]
    clients = [c for c in args.clients.split(",") if c]
    for name in clients:
        if name not in CLIENTS:
            raise SystemExit(f"unknown client {name!r}; choose from {', '.join(CLIENTS)}")
    if "novita-trio" in clients and importlib.util.find_spec("trio") is None:
        print("trio is not installed: skipping the novita-trio rows", file=sys.stderr)
        clients.remove("novita-trio")

    results: dict[str, Any] = {
        "command": "python benchmarks/run.py " + shlex.join(argv or sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "facts": machine_facts(),
        "tasks": tasks,
        "warmup": warmup,
        "policy": policy,
        "seed": args.seed,
        "scenarios": [],
        "micro": [],
        "micro_seconds": seconds,
    }
    etas = {"both": [False, True], "on": [True], "off": [False]}[args.eta]
    cold = {c for c in args.cold_clients.split(",") if c}
    plan: list[tuple[str, bool, str, int]] = []
    for workload in workloads:
        for eta in etas:
            if warmup:  # with no warm-up every row is cold already
                plan += [(workload, eta, c, 0) for c in clients if c in cold]
            plan += [
                (workload, eta, c, warmup)
                for c in clients
                # the naive loop ignores eta: it runs once per workload; trio (a
                # backend check, its transport is httpx's) only where eta is 0
                if (not c.startswith("naive") and c != "novita-trio") or eta == etas[0]
            ]
    for workload, eta, client, warm in plan:
        row = scenario(workload, eta, client, tasks, warm, args.seed, policy)
        results["scenarios"].append(row)
        print(
            f"  {workload:>7} eta={'on ' if eta else 'off'} {'warm' if warm else 'cold'} "
            f"{client:<15} "
            f"polls/task {row['polls_per_task']:.2f}  "
            f"p95 {row['latency_p95_s']:.2f} s  CPU {row['client_cpu_ms_per_task']:.2f} ms/task"
            f"  RSS {row['peak_rss_mb']:.0f} MB  wall {row['wall_s']:.1f} s\n   "
            f"  p95 poll lag {row['poll_lag_p95_s']:.2f} s, hand-off {row['handoff_p95_s']:.2f} s",
            flush=True,
        )
    if not args.no_micro:
        results["micro"] = micro(levels, seconds, args.seed)
    results["total_s"] = time.monotonic() - started

    body = render(results)
    print()
    print(body)
    args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if args.write_readme:
        write_readme(args.readme, body)
        print(f"\nwrote {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
