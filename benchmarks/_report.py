"""Machine facts, per-scenario summaries and the README section between the markers."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import statistics
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "END",
    "START",
    "machine_facts",
    "merge_loopback",
    "pct",
    "summarize",
    "summarize_hooks",
    "write_readme",
]

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
_PACKAGES = (
    "novita-async", "httpx", "httpcore", "anyio", "httpx-aiohttp", "aiohttp", "httpx2",
    "trio", "attrs", "cattrs", "psutil",
)  # fmt: skip
NAN = float("nan")


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
    spec = importlib.util.find_spec("novita_async")
    where = Path(spec.origin).parent.parent if spec and spec.origin else None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": cpu_model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "packages": versions,
        "library": f"commit {_git_state(where)}" if where else "not found",
    }


def _git_state(where: Path) -> str:
    """``<short commit>`` (+ ``, uncommitted changes``) of the library's checkout."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True)
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "no git"
    dirty = git("status", "--porcelain", "--", "novita_async")
    return commit + (", uncommitted changes in novita_async/" if dirty else "")


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return NAN
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summarize(
    spec: dict[str, Any], worker: dict[str, Any], server: dict[str, Any]
) -> dict[str, Any]:
    """Join the client's delivery stamps with the emulator's completion times."""
    skip = set(worker.get("warmup_task_ids", ()))
    tasks = {tid: t for tid, t in server["tasks"].items() if tid not in skip}
    deliveries: dict[str, float] = worker["deliveries"]
    n = len(tasks)
    polls = [int(t["polls"]) for t in tasks.values()]
    done = {tid: t for tid, t in tasks.items() if t.get("completed_at") is not None}
    latencies = [deliveries[t] - done[t]["completed_at"] for t in done if t in deliveries]
    lags = [
        t["first_terminal_poll_at"] - t["completed_at"]
        for t in done.values()
        if t.get("first_terminal_poll_at") is not None
    ]
    durations = [t["completed_at"] - t["created_at"] for t in done.values()]
    stats = worker.get("scheduler_stats") or {}
    return {
        **{k: v for k, v in spec.items() if k not in ("requests", "base_url")},
        "tasks": n,
        "expected": spec["tasks"],
        "delivered": len(latencies),
        "failures": worker.get("failures", 0) + (spec["tasks"] - len(latencies)),
        "polls_per_task": sum(polls) / n if n else NAN,
        "requests_per_task": 1 + sum(polls) / n if n else NAN,
        "polls_max": max(polls, default=0),
        "latency_p50_s": pct(latencies, 50),
        "latency_p95_s": pct(latencies, 95),
        "latency_max_s": max(latencies, default=NAN),
        "poll_lag_p95_s": pct(lags, 95),
        "mean_duration_s": statistics.fmean(durations) if durations else NAN,
        "client_cpu_ms_per_task": worker["cpu_s"] / n * 1e3 if n else NAN,
        "server_cpu_ms_per_task": server.get("cpu_s", NAN) / n * 1e3 if n else NAN,
        "wall_s": worker["wall_s"],
        "peak_rss_mb": worker["peak_rss_mb"],
        "rss_growth_mb": max(0.0, worker["peak_rss_mb"] - worker["rss_before_mb"]),
        "max_in_flight": worker.get("max_in_flight"),
        "transport": worker.get("transport"),
        "probes": stats.get("probes"),
        "errors": worker.get("errors") or [],
        "scheduler_stats": stats,
    }


def summarize_hooks(spec: dict[str, Any], worker: dict[str, Any]) -> dict[str, Any]:
    """The webhook scenario's row (it measures itself: emulator in-process)."""
    out = {k: v for k, v in spec.items() if k not in ("requests", "warmup_requests")}
    after, total = worker["after_delivery"], worker["after_completion"]
    lost = worker["lost_latencies"]
    out.update({k: v for k, v in worker.items() if k not in ("after_delivery", "after_completion")})
    out.update(
        after_delivery_p50_s=pct(after, 50),
        after_delivery_p95_s=pct(after, 95),
        after_completion_p95_s=pct(total, 95),
        after_completion_max_s=max(total, default=NAN),
        lost_max_s=max(lost, default=NAN),
        lost_tasks=len(lost),
        failures=worker["failures"] + worker["tasks"] - worker["delivered"],
    )
    return out


def merge_loopback(worker: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    """A loopback webhook job's client and emulator sides, as ``run_webhooks`` reports."""
    warm = set(worker.pop("warm_ids"))
    stamps = worker.pop("stamps")
    arrived = worker.pop("arrived", {})
    tasks = {t: rec for t, rec in server["tasks"].items() if t not in warm}
    hooks = server.get("webhooks") or {}
    first = hooks.get("first_delivery", {})
    done = {t: tasks[t]["completed_at"] for t in stamps if t in tasks}
    lost = [stamps[t] - done[t] for t in done if t not in first]
    transit = sorted(arrived[t] - first[t] for t in arrived if t in first)
    return {
        **worker,
        "tasks": len(tasks),
        "delivered": len(stamps),
        "gets_per_task": sum(rec["polls"] for rec in tasks.values()) / max(1, len(tasks)),
        "gets_unknown_ids": hooks.get("gets_unknown_ids", 0),
        "forged_running": len(hooks.get("forged_running", [])),
        "forged_random": len(hooks.get("random_ids", [])),
        "results_before_completion": sum(stamps[t] < done[t] for t in done),
        "after_delivery": sorted(stamps[t] - first[t] for t in stamps if t in first),
        "after_completion": sorted(stamps[t] - done[t] for t in done),
        "lost_latencies": sorted(lost) if worker["webhooks"] else [],
        "sender": hooks.get("sender", {}),
        # the delivery's trip: the emulator's POST -> its body in the client's receiver
        "transit_p50_s": pct(transit, 50),
        "transit_p95_s": pct(transit, 95),
    }


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
