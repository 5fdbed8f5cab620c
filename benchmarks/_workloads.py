"""Request mixes, workloads and the emulated task durations they map to.

Durations are a pure function of the request body (keyed on its prompt and its
shape), so every client sees exactly the same tasks whatever order it submits in.

Duration models (``Workload.durations``):

* ``uniform``: U(1, 3) s, unrelated to the request (the cost the client knows
  carries no information).
* ``cost``: cost / ``COST_PER_SECOND`` x U(0.95, 1.05), cost = steps x
  megapixels x image_num; the request mix makes that 1-3 s.
* ``affine``: a fixed part (model load, VAE decode, upload, queueing) drawn per
  task from U(0.6, 1.2) s, plus cost / ``AFFINE_COST_PER_SECOND``, x U(0.95, 1.05):
  about 1.3-3.3 s over the same mix of sizes, step counts and image counts.
* ``affine-const``: the same with a fixed part of ``AFFINE_CONST`` s for every task:
  what is left unexplained is the x U(0.95, 1.05) jitter alone. (With ``affine``'s
  per-task fixed part, one poll per task at the 85 % quantile -- <= 1.15 polls --
  leaves about a third of the tasks over 0.3 s late even when the distribution is
  known exactly: its 5-85 % quantile range is 0.48-0.52 s at every size.)
* ``fast``: U(0.2, 1) s, unrelated to the request (the 10,000-prompt scale runs).

``Workload.workers``: the emulated server runs that many tasks at once and
answers ``QUEUED`` for the others until a worker is free (first come, first served).

``Workload.eta``: what task-result says while a task runs -- ``int``: whole
seconds left, rounded up (Novita's eta); ``exact``: the emulator's float;
``zero``: always 0, as Novita's image tasks mostly answer.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DURATIONS", "WORKLOADS", "Workload", "duration_for", "request_dicts"]

MODEL = "sd_xl_base_1.0.safetensors"
#: cost units per emulated second (cost 20 = 20 steps at 1 MP, 1 image = 1 s).
COST_PER_SECOND = 20.0
AFFINE_COST_PER_SECOND = 30.0
AFFINE_FIXED = (0.6, 1.2)
AFFINE_CONST = 0.9
MIN_DURATION, MAX_DURATION = 1.0, 3.0
FAST = (0.2, 1.0)
_SIZES = ((512, 512), (768, 768), (832, 1216), (1024, 1024), (1152, 896))
_STEPS = tuple(range(10, 61, 5))
DURATIONS = ("uniform", "cost", "affine", "affine-const", "fast")
#: Tasks the ``queued`` workload's server runs at once (1000 prompts wait up to ~20 s).
QUEUE_WORKERS = 100


@dataclass(frozen=True)
class Workload:
    """One benchmark workload: duration model, eta reporting, submission pattern."""

    name: str
    durations: str
    eta: str  # "int" | "exact" | "zero"
    label: str
    waves: int = 1  # > 1: the prompts come in this many waves ...
    pause: float = 0.0  # ... started this many seconds apart
    workers: int | None = None  # the emulator runs this many at once and queues the rest


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("uniform-eta", "uniform", "int", "U(1,3) s, integer eta"),
        Workload("uniform", "uniform", "zero", "U(1,3) s, eta 0"),
        Workload("cost", "cost", "zero", "cost-proportional 1-3 s, eta 0"),
        Workload("affine", "affine", "zero", "0.6-1.2 s fixed + per-cost part, eta 0"),
        Workload("affine-const", "affine-const", "zero", "0.9 s fixed + per-cost part, eta 0"),
        Workload("bursts", "affine", "zero", "affine, 5 waves 2 s apart", waves=5, pause=2.0),
        Workload("fast", "fast", "zero", "U(0.2,1) s, eta 0"),
        Workload(
            "queued",
            "affine",
            "zero",
            f"affine on a server that runs {QUEUE_WORKERS} at once and queues the rest "
            "(QUEUED, in order)",
            workers=QUEUE_WORKERS,
        ),
    )
}


def _cost(steps: int, width: int, height: int, image_num: int) -> float:
    return steps * width * height / 1_000_000 * image_num


def _shapes() -> list[tuple[int, int, int, int]]:
    """(steps, width, height, image_num) whose cost gives a 1-3 s ``cost`` task."""
    lo, hi = MIN_DURATION * COST_PER_SECOND, MAX_DURATION * COST_PER_SECOND
    return [
        (steps, w, h, n)
        for steps, (w, h), n in itertools.product(_STEPS, _SIZES, range(1, 5))
        if lo / 0.95 <= _cost(steps, w, h, n) <= hi / 1.05
    ]


def request_dicts(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` keyword dicts for ``Txt2ImgRequest`` (same mix for every workload)."""
    rng = random.Random(seed)
    shapes = _shapes()
    out = []
    for i in range(count):
        steps, width, height, image_num = rng.choice(shapes)
        out.append(
            {
                "model_name": MODEL,
                "prompt": f"bench task {seed}-{i}: a lighthouse at dusk",
                "width": width,
                "height": height,
                "image_num": image_num,
                "steps": steps,
                "guidance_scale": 7.5,
                "sampler_name": "Euler a",
            }
        )
    return out


def duration_for(durations: str, *, seed: int = 0) -> Callable[[Mapping[str, Any]], float]:
    """The emulator's ``durations`` callable for a duration model (takes the POST JSON)."""
    if durations not in DURATIONS:
        raise ValueError(f"unknown duration model {durations!r}; choose from {DURATIONS}")

    def duration(body: Mapping[str, Any]) -> float:
        req = body.get("request", body)
        rng = random.Random(f"{seed}:{req.get('prompt', '')}")
        u = rng.random()
        if durations == "uniform":
            return MIN_DURATION + (MAX_DURATION - MIN_DURATION) * u
        if durations == "fast":
            return FAST[0] + (FAST[1] - FAST[0]) * u
        cost = _cost(
            int(req.get("steps", 20)),
            int(req.get("width", 512)),
            int(req.get("height", 512)),
            int(req.get("image_num", 1)),
        )
        jitter = 0.95 + 0.10 * u
        if durations == "cost":
            return cost / COST_PER_SECOND * jitter
        fixed = AFFINE_FIXED[0] + (AFFINE_FIXED[1] - AFFINE_FIXED[0]) * rng.random()
        if durations == "affine-const":
            fixed = AFFINE_CONST
        return (fixed + cost / AFFINE_COST_PER_SECOND) * jitter

    return duration
