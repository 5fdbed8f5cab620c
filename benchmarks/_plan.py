"""What a run measures: the sections and the scenarios in each.

A *spec* is a flat dict: ``section``, ``kind`` (``library`` | ``loop`` |
``webhooks``), ``workload`` (a ``_workloads.WORKLOADS`` name), ``form`` or
``client``, ``backend``, ``tasks``, ``warmup`` (tasks a warm client ran first),
``policy`` (``PollPolicy`` overrides; only the trade-off sweep sets any);
webhook specs add ``delivery`` (``in-process`` | ``loopback``), ``receiver``
(loopback: ``aiohttp`` | ``cli``), ``webhooks``
(on, or polling alone), ``forged``, ``duplicate_rate`` and ``loss_rate``.
The transport micro-benchmark has its own list (:func:`micro_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from _forms import KNOB, KNOB_VALUES, KNOB_VALUES_QUICK

__all__ = ["MICRO_ROUNDS", "SECTIONS", "Sizes", "micro_plan", "plan", "sizes"]

SECTIONS = ("workloads", "small", "queue", "forms", "scale", "curve", "webhooks", "micro")
FORM_WORKLOADS = ("uniform-eta", "uniform", "cost", "affine", "affine-const", "bursts")
CURVE_WORKLOADS = ("uniform", "affine")
#: #9's "polls and p95 against the 1 s loop", also where that loop is not CPU-bound.
SMALL_WORKLOADS = ("uniform-eta", "uniform")
#: The hand-written httpx loop (slow when its pool collapses) runs on these only.
NAIVE_WORKLOADS = ("uniform",)
WARM_FORMS = ("with", "single")
FORMS = ("bare", "with")  # the fan-out forms
TIMEOUT_BASE = 90.0
LOOPS = ("loop-0.25", "loop-0.5", "loop-1", "loop-2")
#: Runs of each cold bare / ``async with`` cell; the table shows their mean.
FORM_REPEATS = 3
#: Rounds of the transport micro-benchmark, spread over the run (the median is the cost basis).
MICRO_ROUNDS = 3


@dataclass(frozen=True)
class Sizes:
    main: int  # prompts per workload/forms scenario
    warmup: int  # tasks a warm client runs first
    scale: tuple[int, ...]
    curve: int
    webhooks: int
    forged: int
    knob_values: tuple[float, ...]
    micro_levels: tuple[int, ...]
    micro_seconds: float
    small: int = 100  # prompts where the 1 s loop is not CPU-bound


def sizes(quick: bool, tasks: int | None = None) -> Sizes:
    if quick:
        s = Sizes(200, 50, (100, 500, 2000), 100, 300, 15, KNOB_VALUES_QUICK, (16, 64, 512), 1.0)
        s = replace(s, small=50)
    else:
        s = Sizes(1000, 150, (200, 1000, 10000), 200, 1000, 50, KNOB_VALUES, (16, 64, 512), 2.0)
    if tasks:
        s = Sizes(tasks, *list(s.__dict__.values())[1:])
    return s


def _spec(section: str, workload: str, tasks: int, **kw: Any) -> dict[str, Any]:
    spec = {"section": section, "workload": workload, "tasks": tasks, "warmup": 0}
    spec.update(kind="library", backend="asyncio", policy={}, client="novita")
    spec.update(kw)
    return spec


def _repeat(form: str) -> dict[str, Any]:
    """The cold bare and ``async with`` cells (#8's comparison) run ``FORM_REPEATS`` times,
    alternately (``run.run_round_robin``): single runs vary by 10-20 % on this machine, more
    than the 1.15x they are held to, and a slow spell must not hit the runs of one form."""
    return {"repeat": FORM_REPEATS} if form in ("bare", "with") else {}


def plan(sections: list[str], z: Sizes) -> list[dict[str, Any]]:
    """Every scenario spec of ``sections``, in running order."""
    out: list[dict[str, Any]] = []
    forms = ("bare", "with", "single")
    if "workloads" in sections:
        # Every workload, every form, cold and warm, on asyncio; the baselines once
        # per duration model (they ignore eta, so uniform-eta would repeat uniform).
        for w in FORM_WORKLOADS:
            out += [_spec("workloads", w, z.main, form=f, **_repeat(f)) for f in forms]
            # warm: bare tracks `async with` cold; the budget (~25 min) keeps with + single
            out += [_spec("workloads", w, z.main, form=f, warmup=z.warmup) for f in WARM_FORMS]
            if w != "uniform-eta":
                out.append(_spec("workloads", w, z.main, kind="loop", client="loop-1"))
            if w in NAIVE_WORKLOADS:
                out.append(_spec("workloads", w, z.main, kind="loop", client="naive"))
    if "small" in sections:  # each cell the mean of FORM_REPEATS runs: 100 prompts vary more
        for w in SMALL_WORKLOADS:
            again = {"repeat": FORM_REPEATS}
            out += [_spec("small", w, z.small, form=f, **again) for f in ("bare", "with")]
            out.append(_spec("small", w, z.small, form="with", backend="trio", **again))
            out.append(_spec("small", w, z.small, kind="loop", client="loop-1", **again))
    if "queue" in sections:  # a server that queues: a cold burst, then one once it drained
        for backend, loop in (("asyncio", "loop-1"), ("trio", "trio-loop-1")):
            out += [_spec("queue", "queued", z.main, form=f, backend=backend) for f in FORMS]
            looped = {"kind": "loop", "client": loop, "backend": backend}
            out.append(_spec("queue", "queued", z.main, **looped))
            after = {"form": "with", "backend": backend, "warmup": z.main}
            out.append(_spec("queue", "queued", z.small, **after))
        out.append(_spec("queue", "queued", z.small, kind="loop", client="loop-1"))
    if "forms" in sections:  # trio; the asyncio side comes from "workloads"
        for w in FORM_WORKLOADS:
            out += [_spec("forms", w, z.main, form=f, backend="trio", **_repeat(f)) for f in forms]
            if w != "uniform-eta":  # what a request costs on trio on this workload
                trio_loop = {"kind": "loop", "client": "trio-loop-1", "backend": "trio"}
                out.append(_spec("forms", w, z.main, **trio_loop))
    if "scale" in sections:
        for n in z.scale:
            for backend in ("asyncio", "trio"):
                for form in ("bare", "with"):
                    out.append(_spec("scale", "fast", n, form=form, backend=backend))
            if n == min(z.scale):  # beyond, httpcore's pool collapses (see "workloads")
                out.append(_spec("scale", "fast", n, kind="loop", client="naive"))
    if "curve" in sections:
        for w in CURVE_WORKLOADS:
            for value in z.knob_values:
                out.append(
                    _spec("curve", w, z.curve, form="with", warmup=z.warmup, policy={KNOB: value})
                )
            out += [_spec("curve", w, z.curve, kind="loop", client=c) for c in LOOPS]
    if "webhooks" in sections:
        # (delivery, receiver, webhooks on, backend, warm-up): loopback receivers are a
        # minimal aiohttp route (keep-alive; asyncio only) or the CLI's ``WebhookReceiver``
        # (keep-alive; both backends).
        cases = [("in-process", None, True, "asyncio", 0)]
        cases += [("in-process", None, True, b, z.warmup) for b in ("asyncio", "trio")]
        cases += [("in-process", None, False, "asyncio", z.warmup)]
        cases += [("loopback", "aiohttp", True, "asyncio", w) for w in (0, z.warmup)]
        cases += [("loopback", "cli", True, b, z.warmup) for b in ("asyncio", "trio")]
        cases += [("loopback", "aiohttp", False, "asyncio", z.warmup)]
        for delivery, receiver, hooks, backend, warm in cases:
            out.append(
                _spec(
                    "webhooks",
                    "affine",
                    z.webhooks,
                    kind="webhooks",
                    delivery=delivery,
                    receiver=receiver,
                    backend=backend,
                    warmup=warm,
                    webhooks=hooks,
                    forged=z.forged if hooks else 0,
                    duplicate_rate=0.2,
                    loss_rate=0.05,
                )
            )
    return out


def micro_plan(z: Sizes, transports: list[str], trio: bool) -> list[dict[str, Any]]:
    """Every transport on asyncio at each level (but trio's default, ``httpx-shards``);
    httpx, httpx-shards and httpx2 on trio up to 64."""
    out = [
        {"kind": "micro", "transport": t, "concurrency": c, "backend": "asyncio"}
        for c in z.micro_levels
        for t in transports
        if t != "httpx-shards"
    ]
    if trio:
        out += [
            {"kind": "micro", "transport": t, "concurrency": c, "backend": "trio"}
            for c in z.micro_levels
            if c <= 64
            for t in transports
            if t in ("httpx", "httpx-shards", "httpx2")
        ]
    for spec in out:
        spec["seconds"] = z.micro_seconds
    return out


def loop_deadline(spec: dict[str, Any]) -> float:
    """Seconds a hand-written loop may take over its measured batch before it gives up."""
    return 30.0 + 0.06 * spec["tasks"]


def timeout_for(spec: dict[str, Any]) -> float:
    """A generous bound on one job's wall time (the watchdog kills it after this)."""
    if spec["kind"] == "micro":
        return 60.0 + 2 * spec["seconds"]
    n = spec["tasks"] + spec.get("warmup", 0)
    if spec["kind"] == "loop":  # the loop stops itself at its deadline
        return loop_deadline(spec) + 60.0
    # 10,000 prompts on trio: ~1-2 minutes; lost webhooks: the 20 s cold safety net.
    return TIMEOUT_BASE + 0.06 * n
