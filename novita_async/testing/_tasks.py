"""Emulated tasks: clocks, durations, the task record and its task-result body.

A task's status is never stored: it is derived from the emulator's clock and
the task's ``started_at``/``completed_at``, so nothing runs in the background.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeAlias

import attrs

from .._results import TaskStatus
from ._wire import format_seconds

__all__ = [
    "DurationSpec",
    "EmulatedTask",
    "ManualClock",
    "Proportional",
    "duration_source",
    "request_cost",
    "request_info",
    "result_body",
]

DurationSpec: TypeAlias = "float | tuple[float, float] | Callable[[Mapping[str, Any]], float]"
TERMINAL = (TaskStatus.SUCCEED, TaskStatus.FAILED)


class ManualClock:
    """A clock that only moves when told to: ``clock.advance(2.5)``.

    Pass it as ``NovitaEmulator(clock=clock)`` to step task states without
    sleeping (for raw-HTTP tests; the client itself sleeps on anyio's clock).
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self.now += seconds


def request_cost(body: Mapping[str, Any]) -> float:
    """steps x megapixels x image_num of a POST body (or its ``request`` object).

    Mirrors :attr:`novita_async.Txt2ImgRequest.cost` (hires_fix pixels included).
    """
    req = body.get("request", body)
    if not isinstance(req, Mapping):
        return 0.0
    pixels = float(req.get("width", 512)) * float(req.get("height", 512))
    hires = req.get("hires_fix")
    if isinstance(hires, Mapping):
        pixels += float(hires.get("target_width", 0)) * float(hires.get("target_height", 0))
    return float(req.get("steps", 20)) * pixels / 1_000_000 * float(req.get("image_num", 1))


class Proportional:
    """Durations proportional to GPU work, like real GPUs.

    ``base + seconds_per_cost * cost``, times ``1 ± jitter`` (uniform, seeded),
    where cost = steps x megapixels x image_num (:func:`request_cost`).
    """

    def __init__(
        self, seconds_per_cost: float, *, jitter: float = 0.05, base: float = 0.0, seed: int = 0
    ) -> None:
        if seconds_per_cost < 0 or base < 0 or not 0 <= jitter < 1:
            raise ValueError("need seconds_per_cost >= 0, base >= 0 and 0 <= jitter < 1")
        self.seconds_per_cost = seconds_per_cost
        self.jitter = jitter
        self.base = base
        self._rng = random.Random(seed)

    def __repr__(self) -> str:
        return (
            f"Proportional(seconds_per_cost={self.seconds_per_cost!r}, "
            f"jitter={self.jitter!r}, base={self.base!r})"
        )

    def __call__(self, body: Mapping[str, Any]) -> float:
        seconds = self.base + self.seconds_per_cost * request_cost(body)
        if self.jitter:
            seconds *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        return seconds


def duration_source(
    spec: DurationSpec, rng: random.Random, *, name: str = "durations"
) -> Callable[[Mapping[str, Any]], float]:
    """``durations=`` (or another span of seconds, ``name``) as a function of the POST
    body (``(lo, hi)`` draws from ``rng``); what a callable gives is checked as drawn."""
    if callable(spec):
        draw = spec

        def checked(body: Mapping[str, Any]) -> float:
            seconds = float(draw(body))
            if not (math.isfinite(seconds) and seconds >= 0):
                raise ValueError(f"{name} gave {seconds!r}; need a finite number >= 0")
            return seconds

        return checked
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not (math.isfinite(spec) and spec >= 0):
            raise ValueError(f"{name} must be a finite number >= 0")
        fixed = float(spec)
        return lambda _body: fixed
    if isinstance(spec, tuple) and len(spec) == 2:
        lo, hi = float(spec[0]), float(spec[1])
        if not (0 <= lo <= hi and math.isfinite(hi)):
            raise ValueError(f"{name}=(lo, hi) needs finite 0 <= lo <= hi")
        return lambda _body: rng.uniform(lo, hi)
    raise TypeError(f"{name} must be a number, a (lo, hi) tuple or a callable")


@attrs.define(kw_only=True, eq=False)
class EmulatedTask:
    """One created task. Times are on the emulator's clock; ``status`` is derived from it."""

    task_id: str
    request: dict[str, Any] = attrs.field(repr=False)
    extra: dict[str, Any] = attrs.field(repr=False)
    created_at: float
    started_at: float
    completed_at: float
    #: Until this instant task-result answers 404 (``not_found_for``).
    visible_at: float
    failed: bool
    reason: str
    seed: int
    image_type: str
    image_num: int
    nsfw_confidences: tuple[float, ...] | None = attrs.field(repr=False)
    request_info: str = attrs.field(repr=False)
    #: When task-result first served this task as SUCCEED/FAILED (None: not yet).
    first_terminal_poll_at: float | None = None
    _clock: Callable[[], float] = attrs.field(repr=False, alias="clock")

    @property
    def duration(self) -> float:
        return self.completed_at - self.started_at

    @property
    def queue_wait(self) -> float:
        return self.started_at - self.created_at

    @property
    def status(self) -> TaskStatus:
        """The status at the emulator clock's current time."""
        return self.status_at(self._clock())

    @property
    def webhook_url(self) -> str | None:
        """``extra.webhook.url`` of the submission, if any."""
        webhook = self.extra.get("webhook")
        url = webhook.get("url") if isinstance(webhook, Mapping) else None
        return url if isinstance(url, str) else None

    def status_at(self, now: float) -> TaskStatus:
        if now < self.started_at:
            return TaskStatus.QUEUED
        if now < self.completed_at:
            return TaskStatus.PROCESSING
        return TaskStatus.FAILED if self.failed else TaskStatus.SUCCEED


def request_info(req: Mapping[str, Any], seed: int) -> str:
    """``extra.debug_info.request_info``: a JSON string, as Novita sends it."""
    image_num = int(req["image_num"])
    negative = req.get("negative_prompt") or ""
    return json.dumps(
        {
            "model": req["model_name"],
            "prompts": [req["prompt"]],
            "negative_prompts": [negative],
            "seeds": [seed + i for i in range(image_num)],
            "height": req["height"],
            "width": req["width"],
            "guidance_scale": req["guidance_scale"],
            "num_images_per_prompt": image_num,
            "num_inference_steps": req["steps"],
            "sampler_name": req["sampler_name"],
            "clip_skip": req.get("clip_skip", 1),
        },
        separators=(",", ":"),
    )


def result_body(
    task: EmulatedTask,
    now: float,
    *,
    report_eta: bool | Literal["whole"],
    image_url_ttl: float,
    image_url: Callable[[str, str], str],
    epoch_ms: Callable[[float], str],
) -> dict[str, Any]:
    """The task-result body of ``task`` at ``now``.

    ``image_url(key, expires)`` signs an image URL; ``epoch_ms(instant)`` turns
    an emulator-clock instant into Novita's epoch-milliseconds string.
    """
    status = task.status_at(now)
    if status is TaskStatus.PROCESSING and task.duration > 0:
        progress = min(99, int((now - task.started_at) / task.duration * 100))
    else:
        progress = 0  # like Novita: 0 while queued and (!) on finished tasks
    eta = 0.0
    if report_eta and status not in TERMINAL:
        eta = round(task.completed_at - now, 3)
        if report_eta == "whole":  # whole seconds left, rounded up
            eta = float(math.ceil(eta))
    images = []
    if status is TaskStatus.SUCCEED:
        expires = f"{task.completed_at + image_url_ttl:.3f}"
        for n in range(task.image_num):
            nsfw = None
            if task.nsfw_confidences is not None:
                nsfw = {"valid": True, "confidence": task.nsfw_confidences[n]}
            images.append(
                {
                    "image_url": image_url(f"{task.task_id}/{n}.{task.image_type}", expires),
                    "image_url_ttl": format_seconds(image_url_ttl),
                    "image_type": task.image_type,
                    "nsfw_detection_result": nsfw,
                }
            )
    started = now >= task.started_at
    return {
        "extra": {
            "seed": str(task.seed),
            "enable_nsfw_detection": task.nsfw_confidences is not None,
            "debug_info": {
                "request_info": task.request_info,
                "submit_time_ms": epoch_ms(task.created_at),
                "execute_time_ms": epoch_ms(task.started_at) if started else "",
                "complete_time_ms": epoch_ms(task.completed_at) if status in TERMINAL else "",
            },
        },
        "task": {
            "task_id": task.task_id,
            "task_type": "TXT_TO_IMG",
            "status": status.value,
            "reason": task.reason if status is TaskStatus.FAILED else "",
            "eta": eta,
            "progress_percent": progress,
        },
        "images": images,
        "videos": [],
        "audios": [],
    }
