"""Speed, polling and memory benchmarks against the emulator over loopback HTTP.

Usage (from the repository root; ``nox -s bench`` runs the second line)::

    python benchmarks/run.py                 # print the tables, save benchmarks/results.json
    python benchmarks/run.py --write-readme  # ... rewrite README.md's bench section + the PNG
    python benchmarks/run.py --quick         # smaller, a smoke run (~10 min)
    python benchmarks/run.py --sections forms,curve --tasks 1000   # a part of it

Every scenario gets a fresh emulator process (``_server.py``) and a fresh
client process (``_scenarios.py``), so client CPU and peak RSS are the client's
alone (the in-process webhook scenarios run the emulator in the client's
process; the loopback ones deliver over HTTP from the emulator process:
``_hooks.py``).
Added latency compares the emulator's completion instant with the client's
delivery stamp; both are ``time.monotonic()`` (CLOCK_MONOTONIC, system-wide on
Linux, so comparable across the two processes). A scenario that fails or
outlives its timeout is reported and skipped; the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _jobs import JobError, emulator, run_worker  # noqa: E402
from _plan import (  # noqa: E402
    MICRO_ROUNDS,
    SECTIONS,
    loop_deadline,
    micro_plan,
    plan,
    sizes,
    timeout_for,
)
from _report import (  # noqa: E402
    machine_facts,
    merge_loopback,
    summarize,
    summarize_hooks,
    write_readme,
)
from _tables import render  # noqa: E402
from _workloads import WORKLOADS, request_dicts  # noqa: E402

ROOT = HERE.parent
PLOT = HERE / "tradeoff.png"


def run_scenario(spec: dict[str, Any], seed: int) -> dict[str, Any]:
    workload = WORKLOADS[spec["workload"]]
    job = {
        **spec,
        "requests": request_dicts(spec["tasks"], seed=seed),
        # Other prompts, hence other (deterministic) durations than the measured batch.
        "warmup": request_dicts(spec["warmup"], seed=seed + 1000) if spec["warmup"] else [],
        "waves": workload.waves,
        "pause": workload.pause,
        "seed": seed,
        "durations": workload.durations,
        "deadline": loop_deadline(spec),
    }
    if spec["kind"] == "webhooks" and spec.get("delivery") != "loopback":
        return summarize_hooks(spec, run_worker(job, timeout_for(spec)))
    if spec["kind"] == "webhooks":  # the emulator in its own process, delivering over HTTP
        options = {"delay": [0.05, 0.2], "duplicate_rate": spec["duplicate_rate"]}
        options["loss_rate"] = spec["loss_rate"]
        with emulator(workload.durations, seed, eta=workload.eta, webhooks=options) as hooks:
            job["base_url"] = hooks.base_url

            def measuring() -> None:
                if spec["webhooks"]:
                    hooks.forge(spec["forged"])

            worker = run_worker(job, timeout_for(spec), measuring)
            return summarize_hooks(spec, merge_loopback(worker, hooks.stats()))
    with emulator(workload.durations, seed, eta=workload.eta, workers=workload.workers) as emu:
        marks: list[float] = []
        job["base_url"] = emu.base_url
        worker = run_worker(job, timeout_for(spec), lambda: marks.append(emu.cpu()))
        server = emu.stats()
        server["cpu_s"] = emu.cpu() - marks[0] if marks else float("nan")
    return summarize(spec, worker, server)


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for repeated runs of a scenario: the mean of each measured number (the
    first run's other fields), with every run's wall, CPU, polls and p95 kept."""
    if len(rows) == 1:
        return rows[0]
    out = dict(rows[0])
    for key, value in rows[0].items():
        numbers = [r.get(key) for r in rows]
        if isinstance(value, float) and all(isinstance(v, (int, float)) for v in numbers):
            out[key] = sum(numbers) / len(numbers)
    kept = ("wall_s", "client_cpu_ms_per_task", "polls_per_task", "latency_p95_s")
    out["runs"] = [{k: r.get(k) for k in kept} for r in rows]
    return out


def compared(specs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The specs in running order, in groups: consecutive repeated specs of one comparison
    (same section, workload, size and warm-up: bare against ``async with``; at 100 prompts
    the backends and the 1 s loop too)
    form one group, every other spec a group of its own."""
    groups: list[list[dict[str, Any]]] = []

    def key(spec: dict[str, Any]) -> tuple[Any, ...]:
        fields = ("section", "workload", "tasks", "warmup", "repeat")
        return tuple(spec.get(field) for field in fields)

    for spec in specs:
        last = groups[-1] if groups else None
        if last and spec.get("repeat", 1) > 1 and key(last[0]) == key(spec):
            last.append(spec)
        else:
            groups.append([spec])
    return groups


def run_round_robin(group: list[dict[str, Any]], seed: int) -> list[dict[str, Any] | Exception]:
    """Each spec of ``group`` ``repeat`` times, round-robin (bare, with, bare, with, ...:
    a slow moment of the machine hits one run of each form, not every run of one);
    per spec, :func:`mean_row` of its runs, or the error that stopped one."""
    runs: list[list[dict[str, Any]]] = [[] for _ in group]
    failed: list[Exception | None] = [None] * len(group)
    for _ in range(max((spec.get("repeat", 1) for spec in group), default=0)):
        for i, spec in enumerate(group):
            if failed[i] is None and len(runs[i]) < spec.get("repeat", 1):
                try:
                    runs[i].append(run_scenario(spec, seed))
                except (JobError, OSError, KeyError, ValueError) as exc:
                    failed[i] = exc
    return [error if error else mean_row(rows) for error, rows in zip(failed, runs, strict=True)]


def run_micro_round(
    specs: list[dict[str, Any]],
    seed: int,
    errors: list[dict[str, Any]],
    runs: list[list[dict[str, Any]]],
) -> None:
    """One round of every micro spec, each result appended to its ``runs`` list. The
    rounds are spread over the whole run (:func:`micro_at`): the cost basis of the
    ``÷ requests x cost`` cells sees the machine the scenarios saw, not only its state at
    the end (two full runs on one machine had it 20 % apart)."""
    with emulator("never", seed) as emu:
        marks: list[float] = []

        def mark() -> None:
            marks.append(emu.cpu())

        for i, spec in enumerate(specs):
            job = {**spec, "base_url": emu.base_url}
            try:
                result = run_worker(job, timeout_for(spec), mark)
            except JobError as exc:
                print(f"  micro {spec['transport']} {spec['backend']} FAILED: {exc}")
                errors.append({**spec, "error": str(exc)})
                continue
            server_cpu = emu.cpu() - marks[-1]
            result["server_cpu_us_per_request"] = server_cpu / result["requests"] * 1e6
            runs[i].append(result)
            rate, cpu = result["requests_per_s"], result["cpu_us_per_request"]
            print(
                f"  micro {result['transport']:>13} {result['backend']:<7} "
                f"x{result['concurrency']:<4} "
                f"{rate:6.0f} req/s {cpu:6.0f} us CPU/req",
                flush=True,
            )


def micro_at(groups: int) -> list[int]:
    """Before which scenario group each micro round runs (``groups``: after the last):
    the start, the end and evenly between."""
    if MICRO_ROUNDS == 1:
        return [groups]
    return [round(k * groups / (MICRO_ROUNDS - 1)) for k in range(MICRO_ROUNDS)]


def micro_medians(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per spec, the round with the median CPU per request, with every round's kept in
    ``cpu_us_runs``."""
    out = []
    for done in runs:
        if done:
            ordered = sorted(done, key=lambda r: r["cpu_us_per_request"])
            median = dict(ordered[len(ordered) // 2])
            median["cpu_us_runs"] = [r["cpu_us_per_request"] for r in done]
            out.append(median)
    return out


def _line(row: dict[str, Any]) -> str:
    who = row.get("form") or row.get("client")
    head = f"  {row['section']:>9} {row['workload']:>11} {who:<9} {row['backend']:<7}"
    head += f" n={row['tasks']}"
    head += " warm" if row.get("warmup") else " cold"
    if row.get("policy"):
        head += " " + ",".join(f"{k}={v}" for k, v in row["policy"].items())
    if row["kind"] == "webhooks":
        return (
            f"{head} {row.get('delivery', 'in-process')} webhooks={row['webhooks']}: "
            f"GETs/task {row['gets_per_task']:.2f}, "
            f"p95 after delivery {row['after_delivery_p95_s']:.2f} s, after completion "
            f"{row['after_completion_p95_s']:.2f} s, failures {row['failures']}, "
            f"wall {row['wall_s']:.1f} s"
        )
    return (
        f"{head}: polls/task {row['polls_per_task']:.2f} p95 {row['latency_p95_s']:.2f} s "
        f"CPU {row['client_cpu_ms_per_task']:.2f} ms/task wall {row['wall_s']:.1f} s "
        f"RSS +{row['rss_growth_mb']:.0f} MB failures {row['failures']}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller: a smoke run")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument("--tasks", type=int, default=None, help="prompts per workload/forms scenario")
    p.add_argument("--write-readme", action="store_true", help="rewrite README.md's section")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=HERE / "results.json", help="raw results file")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: render --json's results (and --write-readme them)",
    )
    return p.parse_args(argv)


def publish(results: dict[str, Any], args: argparse.Namespace) -> None:
    from _oracle import ORACLE_DURATIONS, frontier
    from _plot import plot_tradeoff

    count = results["sizes"]["curve"]  # the request mix; computed, not measured
    fronts = {d: frontier(d, count, seed=results["seed"]) for d in ORACLE_DURATIONS}
    results["oracle"] = {d: front for d, front in fronts.items() if front}
    results["curve_png"] = plot_tradeoff(results, PLOT)
    body = render(results)
    print()
    print(body)
    if args.write_readme:
        write_readme(args.readme, body)
        print(f"\nwrote {args.readme}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        publish(json.loads(args.json.read_text()), args)
        return 0
    started = time.monotonic()
    sections = [s for s in args.sections.split(",") if s]
    for name in sections:
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    z = sizes(args.quick, args.tasks)
    specs = plan(sections, z)
    trio = importlib.util.find_spec("trio") is not None
    if not trio:
        print("trio is not installed: skipping the trio scenarios", file=sys.stderr)
        specs = [s for s in specs if s["backend"] != "trio"]
    transports = ["httpx", "httpx-shards", "httpx-aiohttp", "aiohttp"]
    httpx2 = importlib.util.find_spec("httpx2") is not None
    transports += ["httpx2"] if httpx2 else []
    results: dict[str, Any] = {
        "command": "python benchmarks/run.py " + shlex.join(argv or sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "facts": machine_facts(),
        "quick": args.quick,
        "sizes": z.__dict__,
        "seed": args.seed,
        "httpx2_installed": httpx2,
        "rows": [],
        "micro": [],
        "errors": [],
    }
    print(f"{len(specs)} scenarios", flush=True)
    groups = list(compared(specs))
    micro = micro_plan(z, transports, trio) if "micro" in sections else []
    micro_runs: list[list[dict[str, Any]]] = [[] for _ in micro]
    rounds = micro_at(len(groups)) if micro else []
    for at in range(len(groups) + 1):
        for _ in range(rounds.count(at)):
            run_micro_round(micro, args.seed, results["errors"], micro_runs)
        group = groups[at] if at < len(groups) else []
        for spec, row in zip(group, run_round_robin(group, args.seed), strict=True):
            if isinstance(row, Exception):
                error = {**spec, "error": f"{type(row).__name__}: {row}"}
                results["errors"].append(error)
                print(f"  FAILED {spec['section']} {spec['workload']} {spec.get('form')}: {row}")
                continue
            results["rows"].append(row)
            print(_line(row), flush=True)
    results["micro"] = micro_medians(micro_runs)
    results["total_s"] = time.monotonic() - started
    args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    publish(results, args)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
