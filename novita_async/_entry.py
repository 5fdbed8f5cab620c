"""One tracked task of the poll scheduler: what its waiters share and its plan."""

from __future__ import annotations

import math
from typing import Literal

import anyio

from ._policy import PollHint
from ._results import TaskResult

__all__ = ["Entry", "Plan"]

#: How an entry's next poll was planned (``"probe"``/``"probed"``: one of a cold
#: start's first tasks, followed to its end to learn durations).
Plan = Literal["now", "probe", "probed", "cold", "learned", "webhook"]


class Entry:
    """One tracked task, shared by all its waiters."""

    __slots__ = (
        "answered",
        "asked",
        "backoff",
        "confirming",
        "cost",
        "created_at",
        "done",
        "dropped",
        "error",
        "errors",
        "event",
        "finish_by",
        "heap_seq",
        "last",
        "listed",
        "malformed",
        "next_at",
        "plan",
        "polling",
        "polls",
        "queued",
        "rank",
        "recheck",
        "result",
        "resume_at",
        "sampled",
        "scope",
        "sent",
        "split",
        "submitted_at",
        "task_id",
        "waiters",
        "webhook",
    )

    def __init__(self, task_id: str, now: float, backoff: float) -> None:
        self.task_id = task_id
        self.created_at = now
        self.submitted_at: float | None = None
        self.cost: float | None = None
        self.waiters = 0
        self.event = anyio.Event()  # set when done (or dropped)
        self.plan: Plan = "now"
        self.next_at = now
        self.heap_seq = -1  # seq of this entry's one valid heap item, -1: none
        self.polling = False  # handed to the workers, answer not applied yet
        self.scope: anyio.CancelScope | None = None  # the poll in flight
        self.sent = 0
        self.polls = 0
        self.answered = False
        self.asked: float | None = None  # when its last unfinished no-eta answer's poll was sent
        self.sampled = False
        self.backoff = backoff
        self.errors = 0
        self.malformed: tuple[int, str] = (0, "")  # identical malformed answers in a row
        self.finish_by: float | None = None  # a whole-second eta's upper bound
        self.split = False  # the last second of a whole-second eta was split once
        self.queued = False  # it waited in the server's queue: paced by the queue (_queue)
        self.rank = 0  # the order it was tracked in (polled tasks with a submission time)
        self.last: TaskResult | None = None
        self.done = False
        self.dropped = False
        self.result: TaskResult | None = None
        self.error: Exception | None = None
        self.webhook = False  # submitted with a webhook: polls held back
        self.confirming: anyio.Event | None = None  # a delivery waits for a poll's answer
        self.recheck = False  # a delivery came while a GET was on the wire: poll once more
        self.resume_at: float | None = None  # the plan a delivery's poll interrupted
        self.listed: float | None = None  # its submission time in the planner's running list

    @property
    def live(self) -> bool:
        return not (self.done or self.dropped)

    def absorb(self, hint: PollHint, now: float) -> None:
        """Take what ``hint`` knows and this entry does not (for learning)."""
        submitted, cost = hint.submitted_at, hint.cost
        if self.submitted_at is None and submitted is not None and math.isfinite(submitted):
            self.submitted_at = min(submitted, now)
        if self.cost is None and cost is not None and math.isfinite(cost) and cost > 0:
            self.cost = float(cost)
        self.webhook = self.webhook or hint.webhook
