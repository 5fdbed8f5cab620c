"""The README tables of polls and latency against the 1 s loop: 100 prompts, and a
server that queues."""

from __future__ import annotations

from typing import Any

from _format import f, label, ratio
from _workloads import QUEUE_WORKERS

__all__ = ["queue_table", "small_table"]


def small_table(rows: list[dict[str, Any]]) -> list[str]:
    sel = [r for r in rows if r["section"] == "small"]
    if not sel:
        return []
    loops = {r["workload"]: r for r in sel if r["client"] == "loop-1"}
    out = [
        f"### {sel[0]['tasks']} prompts: where the 1 s loop is not CPU-bound",
        "",
        "Goal (#9), as at 1000 prompts above: polls per task <= the fixed 1 s loop's and "
        "added latency p95 below it, cold, default settings. Each cell is the mean of "
        f"{max(len(r.get('runs', [])) for r in sel) or 1} runs, the clients of a workload "
        "run in turn.",
        "",
        "| workload | client | polls/task | added latency p50 / p95 (s) | client CPU ms/task | "
        "polls ÷ 1 s loop | p95 ÷ 1 s loop | wall (s) | failures |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sel:
        cells = _against(r, loops.get(r["workload"], {}), "latency_p50_s", "latency_p95_s")
        out.append(f"| {r['workload']} | {label(r)} | {cells} |")
    return out


def _against(r: dict[str, Any], loop: dict[str, Any], *latencies: str) -> str:
    """Polls, the ``latencies``, CPU, both against ``loop``, wall and failures: cells."""
    return (
        f"{f(r['polls_per_task'])} | {' / '.join(f(r[k]) for k in latencies)} | "
        f"{f(r['client_cpu_ms_per_task'])} | "
        f"{f(ratio(r['polls_per_task'], loop.get('polls_per_task')))} | "
        f"{f(ratio(r['latency_p95_s'], loop.get('latency_p95_s')))} | "
        f"{f(r['wall_s'], 1)} | {r['failures']}"
    )


def queue_table(results: dict[str, Any]) -> list[str]:
    rows, z = results["rows"], results["sizes"]
    sel = [r for r in rows if r["section"] == "queue"]
    if not sel:
        return []
    loops = {(r["tasks"], r["backend"]): r for r in sel if r["kind"] == "loop"}
    out = [
        "### A server that queues (`queued`)",
        "",
        f"The emulator runs {QUEUE_WORKERS} tasks at once and answers `QUEUED` for the others "
        "until a worker is free, first come, first served (of 1000 prompts the last wait "
        f"about 20 s). *after the queue*: the same client, once those {z['main']} are done, "
        f"gets {z['small']} more on the now idle server: what it learnt during the queue must "
        "not make them late (the loop, which learns nothing, runs them on an idle server). "
        "Default settings, one run each; ÷ 1 s loop: the loop on the same backend.",
        "",
        "| phase | client | polls/task | added latency p50 / p95 / max (s) | "
        "client CPU ms/task | polls ÷ 1 s loop | p95 ÷ 1 s loop | wall (s) | failures |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(sel, key=lambda r: (r["tasks"] != z["main"], r["kind"] == "loop")):
        after = r["tasks"] != z["main"]
        phase = f"{r['tasks']} after the queue" if after else f"{r['tasks']} queued"
        loop = loops.get((r["tasks"], r["backend"])) or loops.get((r["tasks"], "asyncio"), {})
        cells = _against(r, loop, "latency_p50_s", "latency_p95_s", "latency_max_s")
        out.append(f"| {phase} | {label(r)} | {cells} |")
    return out
