"""Request mixes and the emulated task durations they map to.

Durations are a pure function of the request body (keyed on its prompt), so
every client sees exactly the same task durations whatever order it submits in.

* ``uniform``: duration ~ U(1, 3) s, unrelated to the request (the cost the
  client knows carries no information).
* ``cost``: duration = cost / ``COST_PER_SECOND`` x U(0.95, 1.05), where
  cost = steps x megapixels x image_num, and the mix is chosen so that
  durations span 1-3 s (real GPUs behave like this; the scheduler may learn it).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["WORKLOADS", "duration_for", "request_dicts"]

WORKLOADS = ("uniform", "cost")
MODEL = "sd_xl_base_1.0.safetensors"
#: cost units per emulated second (cost 20 = 20 steps at 1 MP, 1 image = 1 s).
COST_PER_SECOND = 20.0
MIN_DURATION, MAX_DURATION = 1.0, 3.0
_SIZES = ((512, 512), (768, 768), (832, 1216), (1024, 1024), (1152, 896))
_STEPS = tuple(range(10, 61, 5))


def _cost(steps: int, width: int, height: int, image_num: int) -> float:
    return steps * width * height / 1_000_000 * image_num


def _shapes() -> list[tuple[int, int, int, int]]:
    """(steps, width, height, image_num) whose cost gives a 1-3 s task."""
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


def duration_for(workload: str, *, seed: int = 0) -> Callable[[Mapping[str, Any]], float]:
    """The emulator's ``durations`` callable for ``workload`` (takes the POST JSON)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")

    def duration(body: Mapping[str, Any]) -> float:
        req = body.get("request", body)
        u = random.Random(f"{seed}:{req.get('prompt', '')}").random()
        if workload == "uniform":
            return MIN_DURATION + (MAX_DURATION - MIN_DURATION) * u
        cost = _cost(
            int(req.get("steps", 20)),
            int(req.get("width", 512)),
            int(req.get("height", 512)),
            int(req.get("image_num", 1)),
        )
        return cost / COST_PER_SECOND * (0.95 + 0.10 * u)

    return duration
