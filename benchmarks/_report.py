"""Summaries, Markdown tables and the README section between the bench markers."""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["machine_facts", "render", "summarize", "write_readme"]

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
TARGET_POLLS, TARGET_P95 = 1.3, 0.5
_PACKAGES = (
    "novita-async", "httpx", "httpcore", "anyio", "httpx-aiohttp", "aiohttp", "trio",
    "attrs", "cattrs", "psutil",
)  # fmt: skip


NOTES = [
    "How to read it:",
    "",
    "- *polls/task* counts task-result GETs the emulator received per measured task; "
    "*added latency* is the caller getting the result minus the emulator's completion "
    "instant (both `time.monotonic()`, CLOCK_MONOTONIC, one clock for both processes); "
    "CPU and peak RSS are the client process's own (`time.process_time()`, "
    "`ru_maxrss`; growth = peak minus RSS when the batch started), server CPU is the "
    "emulator's. *max in flight*: most HTTP requests inside the client's transport at "
    "once, including those queued for a pooled connection.",
    "- `uniform` cannot reach 1.3 polls/task at <= 0.5 s p95 by construction: the "
    "request tells nothing about its duration, so a first poll late enough to find "
    "70 % of tasks done (~2.4 s) leaves the early finishers > 0.5 s late; with an exact "
    "eta the best is one early poll plus one at the eta (~1.7 polls/task). `cost` is "
    "the realistic case (GPU time follows steps x pixels x images): a client that has "
    "seen some tasks predicts each first poll.",
    "- `cold` rows submit the whole burst before any task has finished, so the first "
    "polls of every task are planned with nothing learned (and, with eta 0, no probe "
    "can teach anything either).",
    "- On this 2-core machine httpx's connection pool costs milliseconds of CPU per "
    "request, 3-5x httpx-aiohttp's (micro-benchmark): the naive loop, with every task's "
    "request in flight at once, saturates the client CPU and its latency explodes; the "
    "same loop on httpx-aiohttp shows what its fixed 1 s sleep alone costs. With the "
    "library's bounded polls (`max_concurrent_polls=16`) httpx stays usable, but the "
    "client CPU per task halves with httpx-aiohttp (`AsyncNovita(transport="
    "AiohttpTransport(...))`, asyncio only).",
    "- Under overload httpx-aiohttp's pool is not fair: with 500 GETs waiting for 64 "
    "connections its median stays ~50 ms but its p95 approaches the whole run (some "
    "waiters starve).",
]


def machine_facts() -> dict[str, Any]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": cpu_model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "packages": versions,
    }


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summarize(
    workload: str, client: str, label: str, worker: dict[str, Any], server: dict[str, Any]
) -> dict[str, Any]:
    """Join the client's delivery stamps with the emulator's completion times."""
    skip = set(worker.get("warmup_task_ids", ()))
    tasks: dict[str, dict[str, Any]] = {
        tid: t for tid, t in server["tasks"].items() if tid not in skip
    }
    deliveries: dict[str, float] = worker["deliveries"]
    n = len(tasks)
    polls = [int(t["polls"]) for t in tasks.values()]
    latencies = [
        deliveries[tid] - t["completed_at"]
        for tid, t in tasks.items()
        if tid in deliveries and t.get("completed_at") is not None
    ]
    # Split: completion -> the terminal poll reaching the server (poll timing),
    # then that poll -> the caller (response, parsing, hand-off).
    lags = [
        t["first_terminal_poll_at"] - t["completed_at"]
        for t in tasks.values()
        if t.get("first_terminal_poll_at") is not None and t.get("completed_at") is not None
    ]
    handoffs = [
        deliveries[tid] - t["first_terminal_poll_at"]
        for tid, t in tasks.items()
        if tid in deliveries and t.get("first_terminal_poll_at") is not None
    ]
    created = [t["created_at"] for t in tasks.values() if t.get("created_at") is not None]
    durations = [
        t["completed_at"] - t["created_at"]
        for t in tasks.values()
        if t.get("completed_at") is not None and t.get("created_at") is not None
    ]
    return {
        "workload": workload,
        "client": client,
        "label": label,
        "tasks": n,
        "delivered": len(latencies),
        "failures": worker.get("failures", 0) + (n - len(latencies)),
        "polls_per_task": sum(polls) / n if n else float("nan"),
        "polls_max": max(polls, default=0),
        "latency_p50_s": _pct(latencies, 50),
        "latency_p95_s": _pct(latencies, 95),
        "latency_max_s": max(latencies, default=float("nan")),
        "latency_min_s": min(latencies, default=float("nan")),
        "poll_lag_p50_s": _pct(lags, 50),
        "poll_lag_p95_s": _pct(lags, 95),
        "handoff_p50_s": _pct(handoffs, 50),
        "handoff_p95_s": _pct(handoffs, 95),
        "handoff_max_s": max(handoffs, default=float("nan")),
        "submit_span_s": max(created) - min(created) if created else float("nan"),
        "mean_duration_s": statistics.fmean(durations) if durations else float("nan"),
        "client_cpu_ms_per_task": worker["cpu_s"] / n * 1e3 if n else float("nan"),
        "server_cpu_ms_per_task": server.get("cpu_s", float("nan")) / n * 1e3 if n else 0.0,
        "wall_s": worker["wall_s"],
        "peak_rss_mb": worker["peak_rss_mb"],
        "rss_before_mb": worker["rss_before_mb"],
        "http_requests": worker.get("http_requests"),
        "max_in_flight": worker.get("max_in_flight"),
        "scheduler_stats": worker.get("scheduler_stats"),
    }


def _meets(row: dict[str, Any]) -> str:
    ok_polls = row["polls_per_task"] <= TARGET_POLLS
    ok_p95 = row["latency_p95_s"] <= TARGET_P95
    return (
        ("yes" if ok_polls and ok_p95 else "no")
        + ("" if ok_polls else " (polls)")
        + ("" if ok_p95 else " (p95)")
    )


def render(results: dict[str, Any]) -> str:
    """The Markdown that goes between the README markers (and to stdout)."""
    facts = results["facts"]
    pk = facts["packages"]
    command = f"`{results['command']}`"
    if results["command"].split()[2:] == ["--write-readme"]:
        command += " (what `nox -s bench` runs)"
    lines = [
        f"Command: {command}, {results['date']}, {results['total_s']:.0f} s in all.",
        "",
        f"Machine: {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable, "
        f"{facts['cpu_model']}), {facts['python']}, {facts['platform']}; "
        + ", ".join(f"{k} {v}" for k, v in pk.items())
        + ".",
        "",
        f"Workload: {results['tasks']} txt2img tasks submitted at once to the emulator in a "
        "separate process over loopback HTTP (no IPM rate limit, unbounded workers). "
        "`uniform`: durations U(1, 3) s unrelated to the request; `cost`: duration "
        "proportional to steps x megapixels x images (1-3 s), +-5% jitter. "
        "eta `exact`: task-result reports the seconds left; eta `0`: it always says 0, "
        "as Novita's image tasks do (the naive loop ignores eta, so it runs once). "
        f"`warm`: the same client first ran {results['warmup']} other tasks (unmeasured), "
        "as a long-lived client would have; `cold`: a fresh client. "
        f"Targets: <= {TARGET_POLLS} polls/task and <= {TARGET_P95} s p95 added latency.",
        "",
        "| workload | eta | client | state | polls/task | added latency p50 / p95 / max (s) | "
        "client CPU ms/task | server CPU ms/task | wall (s) | peak RSS MB (growth) | "
        "max in flight | targets |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["scenarios"]:
        target = _meets(r) if r["client"].startswith("novita") else "-"
        eta = "-" if r["client"].startswith("naive") else ("exact" if r.get("eta") else "0")
        state = "warm" if r.get("warm") else "cold"
        growth = max(0.0, r["peak_rss_mb"] - r["rss_before_mb"])
        lines.append(
            f"| {r['workload']} | {eta} | {r['label']} | {state} | {r['polls_per_task']:.2f} | "
            f"{r['latency_p50_s']:.2f} / {r['latency_p95_s']:.2f} / {r['latency_max_s']:.2f} | "
            f"{r['client_cpu_ms_per_task']:.2f} | {r['server_cpu_ms_per_task']:.2f} | "
            f"{r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} (+{growth:.0f}) | {r['max_in_flight']} | "
            f"{target} |"
        )
    if results.get("micro"):
        lines += [
            "",
            f"Transport micro-benchmark: N concurrent coroutines loop task-result GETs for "
            f"{results['micro_seconds']:g} s through one pool of 64 connections "
            "(AsyncNovita's default); above 64 the rest wait in the pool.",
            "",
            "| in flight | transport | requests/s | client CPU us/request | "
            "latency p50 / p95 (ms) |",
            "|---:|---|---:|---:|---:|",
        ]
        for m in results["micro"]:
            name = "httpx (httpcore pool)" if m["transport"] == "httpx" else "httpx-aiohttp"
            lines.append(
                f"| {m['concurrency']} | {name} | {m['requests_per_s']:.0f} | "
                f"{m['cpu_us_per_request']:.0f} | "
                f"{m['latency_p50_ms']:.1f} / {m['latency_p95_ms']:.1f} |"
            )
    lines += ["", *NOTES]
    return "\n".join(lines)


def write_readme(readme: Path, body: str) -> None:
    """Replace the text between the markers (append a marked section if absent)."""
    text = readme.read_text() if readme.exists() else ""
    section = f"{START}\n{body}\n{END}"
    if START in text and END in text:
        pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    readme.write_text(text)


def fail(message: str) -> None:
    sys.stderr.write(message + "\n")
    raise SystemExit(1)
