"""The best polls-vs-latency trade-off any client could reach on a workload.

An *oracle* scheduler knows each task's duration distribution given its request
exactly (what a learner that had seen every task could know). With eta 0 nothing
observable before a task ends says where in that distribution it falls, so the
oracle only chooses when to poll: the first poll at the q-quantile of the task's
distribution, then one every y seconds. Sweeping q and y gives its lower-left
frontier of (added latency p95, polls per task).

Where what the request leaves unexplained is spread evenly (``uniform``;
``affine``'s fixed part, uniform over W = 0.6 s) no policy does better: the
tightest schedule for a lag <= L polls every L seconds, and the 5 % a p95 may
leave later buy the most when spent on the first poll, which then moves every
later poll (and so every task's chance of needing it) back by 0.05 W. On
``affine`` a first poll at t leaves a task later than L with probability
(t - a - L) / W and needs a second with probability 1 - (t - a) / W: at least
0.95 - L / W extra polls per task, >= 1.45 polls at a p95 of 0.3 s (1.53 with the
x U(0.95, 1.05) jitter on top). A measured p95 over a few hundred tasks is a
sample quantile, a few hundredths of a second either way: a client's point can
land just below the line.

Durations are drawn from ``_workloads.duration_for`` itself (the emulator's
function), ``SAMPLES`` per request with other prompts; needs numpy (matplotlib's
dependency): without it there is no frontier.
"""

from __future__ import annotations

import math
from typing import Any

from _workloads import WORKLOADS, duration_for, request_dicts

__all__ = ["ORACLE_DURATIONS", "front_for", "frontier", "oracle_polls"]

#: Duration models of the workloads whose tasks tell nothing before they end (eta 0);
#: ``uniform-eta``'s integer eta would let an oracle do better (:func:`front_for`).
ORACLE_DURATIONS = ("uniform", "cost", "affine", "affine-const")

SAMPLES = 100  # duration draws per request
QUANTILES = 101  # first poll at q = 0, 0.01, ..., 1 of the task's distribution
INTERVALS = tuple(round(0.02 * i, 2) for i in range(1, 51))  # then every 0.02 ... 1 s


def frontier(durations: str, count: int, *, seed: int = 0) -> list[tuple[float, float]] | None:
    """[(p95 s, polls per task)] of the oracle over ``count`` prompts of the benchmark's
    mix at ``seed`` with the ``durations`` model, p95 rising and polls falling; ``None``
    without numpy."""
    try:
        import numpy as np
    except ImportError:
        return None
    duration = duration_for(durations, seed=seed)
    draws = np.array(
        [
            [duration({**r, "prompt": f"oracle {i}-{j}"}) for j in range(SAMPLES)]
            for i, r in enumerate(request_dicts(count, seed=seed))
        ]
    )
    points: list[tuple[float, float]] = []
    for q in np.linspace(0.0, 1.0, QUANTILES):
        first = np.quantile(draws, q, axis=1, keepdims=True)
        late = np.maximum(draws - first, 0.0)
        for y in INTERVALS:
            extra = np.ceil(late / y)  # polls after the first
            lag = first + extra * y - draws
            points.append((float(np.quantile(lag, 0.95)), 1.0 + float(extra.mean())))
    out: list[tuple[float, float]] = []
    for p95, polls in sorted(points):
        if not out or polls < out[-1][1] - 1e-9:
            out.append((p95, polls))
    return out


def front_for(results: dict[str, Any], workload: str) -> list[Any] | None:
    """The oracle frontier that holds for ``workload``'s tasks (``results["oracle"]``, by
    duration model: ``bursts`` has ``affine``'s)."""
    w = WORKLOADS.get(workload)
    if w is None or w.eta != "zero":
        return None
    front: list[Any] | None = (results.get("oracle") or {}).get(w.durations)
    return front


def oracle_polls(front: list[Any] | None, p95: float) -> float | None:
    """The oracle's fewest polls per task at an added latency p95 of at most ``p95``."""
    if not front:
        return None
    fits = [polls for at, polls in front if at <= p95]
    return min(fits) if fits else math.inf
