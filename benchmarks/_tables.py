"""The Markdown that goes between the README markers (and to stdout)."""

from __future__ import annotations

from typing import Any

from _format import f, label, ratio, state_of
from _forms import FORMS, KNOB
from _micro import TRANSPORTS
from _notes import NOTES
from _oracle import front_for, oracle_polls
from _polls import queue_table, small_table
from _scenarios import CLIENTS
from _workloads import WORKLOADS

__all__ = ["render"]

GOAL_FORMS = 1.15  # issue #8: bare within 1.15x of `async with`
BASIS = 16  # in-flight level of the transport cost basis (the library's default poll cap)
#: AsyncNovita's default transport per backend (the in-situ basis uses its 1 s loop).
DEFAULTS = {"asyncio": "httpx-aiohttp", "trio": "httpx-shards"}
PNG = "benchmarks/tradeoff.png"


def _header(results: dict[str, Any]) -> list[str]:
    facts, z = results["facts"], results["sizes"]
    command = f"`{results['command']}`"
    if results["command"].split()[2:] == ["--write-readme"]:
        command += " (what `nox -s bench` runs)"
    kind = "QUICK smoke run (small sizes; not for conclusions)" if results["quick"] else "full run"
    defaults = sorted(
        {f"{r['backend']}: `{r['transport']}`" for r in results["rows"] if r["kind"] == "library"}
    )
    return [
        f"Command: {command}, {results['date']}, {results.get('total_s', 0) / 60:.1f} min in all "
        f"({kind}).",
        "",
        f"Machine: {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable, "
        f"{facts['cpu_model']}), {facts['python']}, {facts['platform']}; "
        + ", ".join(f"{k} {v}" for k, v in facts["packages"].items())
        + f". Library measured: {facts.get('library', '?')}.",
        "",
        f"Library at default settings (no `PollPolicy` tweaks, `AsyncNovita`'s default transport: "
        f"{', '.join(defaults) or '-'}), except the trade-off sweep of "
        f"`PollPolicy.{KNOB}`. Workloads ({z['main']} prompts each unless said; warm = the same "
        f"client first ran {z['warmup']} other tasks): "
        + "; ".join(f"`{w.name}`: {w.label}" for w in WORKLOADS.values())
        + ".",
    ]


def _forms_table(rows: list[dict[str, Any]]) -> list[str]:
    lib = [r for r in rows if r["section"] in ("workloads", "forms") and r["client"] == "novita"]
    keys = sorted(
        {(r["workload"], r["backend"], state_of(r)) for r in lib},
        key=lambda k: (list(WORKLOADS).index(k[0]), k[1], k[2]),
    )
    by = {(r["workload"], r["backend"], state_of(r), r["form"]): r for r in lib}
    out = [
        "### Usage forms side by side",
        "",
        "Each cell: wall s / client CPU ms per task / polls per task / added latency p95 s. "
        f"Ratios are bare ÷ `async with` and single ÷ `async with` (wall / CPU / polls); "
        f"goal (#8): bare within {GOAL_FORMS}x on all three at 1000 prompts. Cold bare and "
        "`async with` cells are the mean of "
        f"{max((len(r.get('runs', [])) for r in lib), default=1)} runs each, bare and "
        "`async with` run alternately (`results.json` keeps every run).",
        "",
        f"| workload | backend | state | {FORMS['with']} | {FORMS['bare']} | bare ÷ with | "
        f"{FORMS['single']} | single ÷ with |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        return (
            f"{f(r['wall_s'], 1)} / {f(r['client_cpu_ms_per_task'])} / "
            f"{f(r['polls_per_task'])} / {f(r['latency_p95_s'])}"
        )

    def ratios(r: dict[str, Any] | None, w: dict[str, Any] | None, flag: bool) -> str:
        if r is None or w is None:
            return "-"
        keys_ = ("wall_s", "client_cpu_ms_per_task", "polls_per_task")
        rs = [ratio(r[k], w[k]) for k in keys_]
        ok = all(x <= GOAL_FORMS for x in rs)
        return " / ".join(f(x) for x in rs) + (("" if ok else " ✗") if flag else "")

    for w, backend, state in keys:
        row = {form: by.get((w, backend, state, form)) for form in FORMS}
        out.append(
            f"| {w} | {backend} | {state} | {cell(row['with'])} | {cell(row['bare'])} | "
            f"{ratios(row['bare'], row['with'], True)} | {cell(row['single'])} | "
            f"{ratios(row['single'], row['with'], False)} |"
        )
    return out


def baseline_cpu(
    rows: list[dict[str, Any]], client: str, *, per_request: bool = False
) -> dict[str, float]:
    """workload -> CPU ms/task of a baseline loop at the main size (only if it delivered all);
    ``per_request``: ms per request instead (its CPU ÷ its requests, 1 POST + polls)."""
    out = {
        r["workload"]: r["client_cpu_ms_per_task"] / (1 + r["polls_per_task"] if per_request else 1)
        for r in rows
        if r["section"] in ("workloads", "forms") and r["client"] == client and r["failures"] == 0
    }
    if "uniform" in out:
        out["uniform-eta"] = out["uniform"]  # the loops ignore eta
    return out


def _spread(runs: list[float] | None) -> str:
    if not runs or len(runs) < 2:
        return ""
    return f" ({min(runs):.0f}-{max(runs):.0f})"


def _workloads_table(results: dict[str, Any]) -> list[str]:
    rows = results["rows"]
    sel = [r for r in rows if r["section"] == "workloads"]
    sel += [r for r in rows if r["section"] == "forms" and r["client"] != "novita"]
    sel.sort(key=lambda r: list(WORKLOADS).index(r["workload"]))  # stable: run order within
    naive, loop = baseline_cpu(rows, "naive"), baseline_cpu(rows, "loop-1")
    out = [
        "### Workloads: the library (`async with`) against the hand-written loops",
        "",
        "*oracle polls at this p95*: the fewest polls per task a scheduler that knew each "
        "task's duration distribution exactly would make at that added latency p95 (first "
        "poll at a quantile, then a fixed interval; where the durations' spread is even, as "
        "on `uniform` and `affine`, no policy does better; `benchmarks/_oracle.py`, over "
        f"the request mix of {results['sizes']['curve']} prompts; eta 0 workloads only).",
        "",
        "| workload | client | state | polls/task | oracle polls at this p95 | "
        "added latency p50 / p95 / max (s) | "
        "client CPU ms/task | CPU ÷ naive / ÷ 1 s loop | wall (s) | RSS growth MB | "
        "max in flight | failures |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sel:
        if r["client"] == "novita" and r["form"] != "with":
            continue
        cpu = r["client_cpu_ms_per_task"]
        vs = f"{f(ratio(cpu, naive.get(r['workload'])))} / {f(ratio(cpu, loop.get(r['workload'])))}"
        best = oracle_polls(front_for(results, r["workload"]), r["latency_p95_s"])
        out.append(
            f"| {r['workload']} | {label(r)} | {state_of(r)} | {f(r['polls_per_task'])} | "
            f"{f(best)} | "
            f"{f(r['latency_p50_s'])} / {f(r['latency_p95_s'])} / {f(r['latency_max_s'])} | "
            f"{f(cpu)} | {vs} | "
            f"{f(r['wall_s'], 1)} | {f(r['rss_growth_mb'], 0)} | {f(r['max_in_flight'])} | "
            f"{r['failures']}{' ' + '; '.join(r['errors']) if r.get('errors') else ''} |"
        )
    return out


def _scale_table(rows: list[dict[str, Any]]) -> list[str]:
    sel = [r for r in rows if r["section"] == "scale"]
    base = {}
    for r in sorted(sel, key=lambda r: r["tasks"]):
        base.setdefault((r["client"], r.get("form"), r["backend"]), r["client_cpu_ms_per_task"])
    out = [
        "### Scale: 0.2-1 s tasks (`fast`, eta 0), cold client",
        "",
        "Goals (#9): CPU per task at 10,000 within 1.3x of that at 200, RSS growth < 50 MB, "
        "added latency p95 < 1 s.",
        "",
        "| prompts | client | wall (s) | client CPU ms/task | ÷ smallest | RSS growth MB | "
        "added latency p95 (s) | polls/task | failures |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(sel, key=lambda r: (r["tasks"], r["client"] != "novita", r["backend"])):
        first = base[(r["client"], r.get("form"), r["backend"])]
        out.append(
            f"| {r['tasks']} | {label(r)} | {f(r['wall_s'], 1)} | "
            f"{f(r['client_cpu_ms_per_task'])} | {f(ratio(r['client_cpu_ms_per_task'], first))} | "
            f"{f(r['rss_growth_mb'], 0)} | {f(r['latency_p95_s'])} | {f(r['polls_per_task'])} | "
            f"{r['failures']} |"
        )
    return out


def _curve_table(results: dict[str, Any]) -> list[str]:
    sel = [r for r in results["rows"] if r["section"] == "curve"]
    if not sel:
        return []
    out = [
        "### Trade-off: polls per task against added latency p95",
        "",
        f"The library (`async with`, warm, asyncio) sweeping `PollPolicy.{KNOB}` against "
        f"fixed-interval loops (on httpx-aiohttp, so the loop's interval, not httpcore's pool, "
        f"sets its latency), {results['sizes']['curve']} prompts. *Beaten*: some library point "
        "has no more polls and no more p95 than that loop.",
        "",
    ]
    if results.get("curve_png"):
        out += [f"![trade-off curve]({PNG})", ""]
    out += [
        "| workload | client | polls/task | oracle polls at this p95 | "
        "added latency p50 / p95 (s) | CPU ms/task | beaten |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in sel:
        lib = [x for x in sel if x["workload"] == r["workload"] and x["client"] == "novita"]
        if r["client"] == "novita":
            who, beaten = f"novita_async, {KNOB}={r['policy'][KNOB]}", ""
        else:
            who = CLIENTS[r["client"]]
            polls, p95 = r["polls_per_task"], r["latency_p95_s"]
            won = any(x["polls_per_task"] <= polls and x["latency_p95_s"] <= p95 for x in lib)
            beaten = "yes" if won else "no"
        best = oracle_polls(front_for(results, r["workload"]), r["latency_p95_s"])
        out.append(
            f"| {r['workload']} | {who} | {f(r['polls_per_task'])} | {f(best)} | "
            f"{f(r['latency_p50_s'])} / "
            f"{f(r['latency_p95_s'])} | {f(r['client_cpu_ms_per_task'])} | {beaten} |"
        )
    return out


def _webhooks_table(rows: list[dict[str, Any]]) -> list[str]:
    sel = [r for r in rows if r["section"] == "webhooks"]
    if not sel:
        return []
    # Rows from before the loopback variant have no ``delivery``: they ran in-process.
    sel.sort(key=lambda r: r.get("delivery", "in-process") != "in-process")
    out = [
        f"### Webhooks (#12): {sel[0]['tasks']} prompts, `affine`, in-process and over loopback",
        "",
        "Two setups. *In-process*: the emulator runs in the client's process and delivers "
        "in-process (its `deliver=` callable calls `client.receive_webhook(body)` and answers "
        "200), so at 1000 prompts that one process also does the emulator's work. *Separate "
        "process, loopback*: the emulator runs in its own process (as in the other sections) "
        "and POSTs each delivery (aiohttp, 64 connections) over HTTP to a receiver in the "
        "client's process that hands the body to `client.receive_webhook`: a minimal aiohttp "
        "route (keep-alive; asyncio only) or the CLI's `WebhookReceiver` (`--webhook-listen`: "
        "answers 204 at once, hands the body over in a task of its own; keep-alive). "
        "Transit: the emulator's POST to the body reaching the receiver's handler. "
        "Deliveries come U(0.05, 0.25) s after a task ends; 20 % duplicated, 5 % lost; forged "
        '"succeeded" deliveries for running tasks and for random ids, images on '
        "`forged.invalid` (loopback: the emulator process posts them as the measured batch "
        "starts). Added latency after delivery: the client's delivery stamp minus the "
        "emulator's first genuine POST of that task (both `time.monotonic()`). Goal: <= 1.1 "
        "GETs/task, p95 <= 0.3 s after the delivery, every prompt delivered, no forged field, "
        "0 GETs for unknown ids.",
        "",
        "| delivery | mode | backend | state | task-result GETs/task | added latency after "
        "delivery p50 / p95 (s) | transit p50 / p95 (s) | after completion p95 / max (s) | "
        "lost: tasks, max (s) | delivered | forgeries (running + random) | forged images in "
        "results | results before completion | GETs for unknown ids | wall (s) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sel:
        where = "in-process"
        if r.get("delivery") == "loopback":
            who = {"aiohttp": "aiohttp route", "cli": "CLI `WebhookReceiver`"}[r["receiver"]]
            where = f"separate process, loopback, {who}" if r["webhooks"] else "separate process"
        mode = "webhooks" if r["webhooks"] else "polling alone"
        out.append(
            f"| {where} | {mode} | {r['backend']} | {state_of(r)} | {f(r['gets_per_task'])} | "
            f"{f(r['after_delivery_p50_s'])} / {f(r['after_delivery_p95_s'])} | "
            f"{f(r.get('transit_p50_s'))} / {f(r.get('transit_p95_s'))} | "
            f"{f(r['after_completion_p95_s'])} / {f(r['after_completion_max_s'])} | "
            f"{r['lost_tasks']}, {f(r['lost_max_s'])} | {r['delivered']}/{r['tasks']} | "
            f"{r['forged_running']} + {r['forged_random']} | {r['forged_images_in_results']} | "
            f"{r['results_before_completion']} | {r['gets_unknown_ids']} | {f(r['wall_s'], 1)} |"
        )
    return out


def _transport_key(name: str | None) -> str | None:
    if not name:
        return None
    if "aiohttp" in name:
        return "httpx-aiohttp"
    if name == "httpx-shards":
        return name
    return "httpx" if name == "httpx" or name.startswith("httpx.") else None


def _transport_tables(results: dict[str, Any]) -> list[str]:
    micro = results.get("micro") or []
    out = [
        "### Transports",
        "",
        "Client CPU per task-result GET, N coroutines looping GETs through ONE pool of 64 "
        f"connections for {results['sizes']['micro_seconds']:g} s. 16 is the library's default "
        "cap on polls in flight; above 64 the rest wait in the pool. Where it was measured "
        "more than once (rounds at the start, middle and end of the run, so that the cost "
        "basis below sees the machine the scenarios saw), the round with the median CPU, and "
        "the range of all rounds in brackets.",
        "",
        "| in flight | backend | transport | requests/s | client CPU µs/request | "
        "latency p50 / p95 (ms) |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for m in micro:
        out.append(
            f"| {m['concurrency']} | {m.get('backend', 'asyncio')} | "
            f"{TRANSPORTS[m['transport']]} | "
            f"{f(m['requests_per_s'], 0)} | "
            f"{f(m['cpu_us_per_request'], 0)}{_spread(m.get('cpu_us_runs'))} | "
            f"{f(m['latency_p50_ms'], 1)} / "
            f"{f(m['latency_p95_ms'], 1)} |"
        )
    if not results.get("httpx2_installed"):
        out += ["", "httpx2 is not installed (or not installable on this Python): no httpx2 rows."]
    cost: dict[tuple[str, str], float] = {}
    for level in (64, BASIS):  # the basis wins where both were measured
        for m in micro:
            if m["concurrency"] == level:
                cost[(m.get("backend", "asyncio"), m["transport"])] = m["cpu_us_per_request"]
    lib = [
        r
        for r in results["rows"]
        if r["section"] in ("workloads", "forms")
        and r["client"] == "novita"
        and not r.get("warmup")
        and r["form"] != "single"
    ]
    naive, loop = baseline_cpu(results["rows"], "naive"), baseline_cpu(results["rows"], "loop-1")
    in_situ = {  # backend -> workload -> ms per request of the 1 s loop on the default transport
        "asyncio": baseline_cpu(results["rows"], "loop-1", per_request=True),
        "trio": baseline_cpu(results["rows"], "trio-loop-1", per_request=True),
    }
    out += [
        "",
        "Library CPU per task against what its requests cost on its default transport "
        f"(requests/task = 1 POST + polls; µs/request: the table above at {BASIS} in flight, "
        "same backend). Goals (#9): CPU ÷ (requests x cost) <= 1.5 and CPU ÷ naive <= 0.25, "
        "cold, both forms (÷ naive: only where the hand-written httpx loop delivered every "
        "prompt; ÷ 1 s loop: the same loop on httpx-aiohttp). *÷ in situ*: the same, with "
        "the cost per request the 1 s loop paid on the same workload in this run (its CPU "
        "÷ its requests: nothing but the transport and JSON), on the library's default "
        "transport: asyncio's `fixed 1 s loop (httpx-aiohttp)`, trio's `fixed 1 s loop "
        "(trio, httpx-shards)` (at most 16 requests in flight, the library's cap on polls). "
        "*1 s loop ÷ requests x cost*: what the same metric gives that loop, a client with "
        "no library code (its CPU ÷ (its requests x the micro-benchmark's cost)).",
        "",
        "| workload | backend | form | requests/task | default transport | µs/request | "
        "requests x cost (ms) | library CPU ms/task | ÷ requests x cost | ÷ in situ | "
        "1 s loop ÷ requests x cost | ÷ naive | ÷ 1 s loop |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in lib:
        key = _transport_key(r.get("transport"))
        per = cost.get((r["backend"], key)) if key else None
        budget = r["requests_per_task"] * per / 1e3 if per else None
        cpu = r["client_cpu_ms_per_task"]
        situ = floor = None
        backend_situ = in_situ.get(r["backend"], {})
        if key == DEFAULTS.get(r["backend"]) and r["workload"] in backend_situ:
            situ = r["requests_per_task"] * backend_situ[r["workload"]]
            floor = ratio(backend_situ[r["workload"]], per / 1e3 if per else None)
        out.append(
            f"| {r['workload']} | {r['backend']} | {r['form']} | {f(r['requests_per_task'])} | "
            f"{key or r.get('transport')} | {f(per, 0)} | {f(budget)} | {f(cpu)} | "
            f"{f(ratio(cpu, budget))} | "
            f"{f(ratio(cpu, situ))} | "
            f"{f(floor)} | "
            f"{f(ratio(cpu, naive.get(r['workload'])))} | "
            f"{f(ratio(cpu, loop.get(r['workload'])))} |"
        )
    return out


def render(results: dict[str, Any]) -> str:
    rows = results["rows"]
    lines = _header(results)
    for part in (
        _forms_table(rows),
        _workloads_table(results),
        small_table(rows),
        queue_table(results),
        _scale_table(rows),
        _curve_table(results),
        _webhooks_table(rows),
        _transport_tables(results),
    ):
        if part:
            lines += ["", *part]
    if results.get("errors"):
        lines += ["", "Scenarios that failed or timed out (not in the tables):", ""]
        for e in results["errors"]:
            what = [e.get(k) for k in ("section", "workload", "form", "client", "transport")]
            what += [e.get("backend"), f"n={e.get('tasks') or e.get('concurrency')}"]
            lines.append(f"- {' '.join(str(w) for w in what if w)}: {e['error']}")
    lines += ["", *NOTES]
    return "\n".join(lines)
