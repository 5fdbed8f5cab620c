"""The polling scheduler's tunables, its counters, and what a caller knows of a task.

:class:`PollPolicy` (the tunables: one knob, ``latency_budget``, trades polls for
latency), :class:`PollStats` (live counters) and :class:`PollHint` (a task's
submission time, cost and webhook). The decisions themselves are :mod:`._plan`'s.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["PollHint", "PollPolicy", "PollStats"]

_nonneg = attrs.validators.ge(0.0)
_positive = attrs.validators.gt(0.0)
_fraction = attrs.validators.and_(attrs.validators.gt(0.0), attrs.validators.lt(1.0))


def _optional_nonneg(_: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"{attribute.name} must be None or >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class PollPolicy:
    """Tunables of the polling scheduler (durations in seconds).

    * After an unfinished answer the next poll comes ``eta + eta_margin`` later
      when the server gives an ``eta``; else, for a task the server queued
      (``QUEUED``), when the queue's front should reach it plus the first runs
      of its cost, and once it runs after such a wait, where the runs of its cost
      end (its ``debug_info`` start stamp), or every ``latency_budget`` without
      stamps; else where the learned durations of slower tasks put it (at most
      ``latency_budget`` later); else, past every
      learned duration while ``warmup_samples`` tasks as old still run (a
      burst whose samples are its first finishers), every ``2 x
      latency_budget`` or a quarter of its age if longer; else after a backoff
      that starts at ``backoff_initial`` and grows by ``backoff_factor``. All
      are clamped to [``min_interval``, ``max_interval``]. Errors that
      survived the transport's retries back off the same way, until the
      caller's deadline.
    * The first poll of a submitted task comes at the ``first_poll_quantile`` of
      the learned durations, but at most ``latency_budget`` after the
      ``5 %`` quantile (``None`` disables that guard). Learning keeps the last
      ``learning_window`` durations; until ``warmup_samples`` are known, a few
      tasks are *probed* ``probe_delay`` after submission (their ``eta`` is a
      sample) and the others wait ``first_poll_delay`` or, once some durations
      are known, ``latency_budget`` after their 5 % quantile; a server without
      ``eta`` makes them wait for the probes' first duration (at most a minute).
      Once the probes that ended cost clearly less than those still running
      (durations grow with cost), a cold first poll goes by what the first
      finishers' costs predict at its own cost. A task that waited in a queue
      (its stamps: over half a second longer than the shortest wait seen lately)
      is not learnt once ``warmup_samples`` durations are known: its duration
      was the queue's.
    * ``TASK_NOT_FOUND`` is retried for ``not_found_grace`` after submission;
      a 429 pauses every poll for its ``Retry-After``, at most ``max_pause``.
    * One tick polls every task due within ``tick_coalesce`` of it (so a poll
      may come that much early). A task whose answers stay malformed (the
      transport's retries included) ``max_malformed`` polls in a row ends with
      :class:`~novita_async.MalformedResponseError`.
    * With webhooks (``AsyncNovita(webhook_url=...)``) a task is not polled
      until its delivery is clearly late: at ``1.25 x`` the learned 99 %
      quantile of submission-to-delivery times plus ``webhook_grace``
      (``webhook_cold_delay`` after submission while nothing is learned).
    """

    min_interval: float = attrs.field(default=0.2, validator=_nonneg)
    max_interval: float = attrs.field(default=5.0, validator=_positive)
    backoff_initial: float = attrs.field(default=0.5, validator=_positive)
    backoff_factor: float = attrs.field(default=1.5, validator=attrs.validators.ge(1.0))
    eta_margin: float = attrs.field(default=0.05, validator=_nonneg)
    first_poll_delay: float = attrs.field(default=1.0, validator=_nonneg)
    first_poll_quantile: float = attrs.field(default=0.9, validator=_fraction)
    latency_budget: float | None = attrs.field(default=0.4, validator=_optional_nonneg)
    probe_delay: float = attrs.field(default=0.25, validator=_nonneg)
    warmup_samples: int = attrs.field(default=20, validator=attrs.validators.ge(1))
    learning_window: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    not_found_grace: float = attrs.field(default=10.0, validator=_nonneg)
    max_pause: float = attrs.field(default=60.0, validator=_nonneg)
    tick_coalesce: float = attrs.field(default=0.02, validator=_nonneg)
    max_malformed: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    webhook_grace: float = attrs.field(default=1.0, validator=_nonneg)
    webhook_cold_delay: float = attrs.field(default=20.0, validator=_nonneg)

    def __attrs_post_init__(self) -> None:
        if self.min_interval > self.max_interval:
            raise ValueError("min_interval must not exceed max_interval")
        if self.warmup_samples > self.learning_window:
            raise ValueError("warmup_samples must not exceed learning_window")


@attrs.define(kw_only=True, eq=False)
class PollStats:
    """Live counters of a :class:`PollScheduler` (read them, don't write them).

    ``polls_total`` counts GETs sent, ``polls_cancelled`` those cut short (a
    dropped task, the loop stopping); ``polls_by_task`` counts answered polls of the
    tasks being tracked right now; ``poll_histogram`` maps "answered polls a
    finished task needed" to a task count. ``ticks`` counts scheduler ticks
    that started polls (``max_polls_per_tick``: the most one tick started).
    ``waits`` counts :meth:`PollScheduler.wait` calls and ``heap_pushes`` the
    scheduling operations: both grow with tasks and polls, never with the
    number of tasks already tracked. ``webhooks_received`` counts deliveries for
    tasks tracked here (duplicates included), ``webhooks_unknown`` the others, and
    ``webhooks_confirmed`` the tasks whose end a delivery announced and its GET
    found (one per task, however many deliveries; a forgery counts nothing).
    """

    polls_total: int = 0
    polls_by_task: dict[str, int] = attrs.field(factory=dict)
    poll_histogram: dict[int, int] = attrs.field(factory=dict)
    tasks_succeeded: int = 0
    tasks_failed: int = 0
    tasks_errored: int = 0
    tasks_abandoned: int = 0
    timeouts: int = 0
    transient_errors: int = 0
    not_found_retries: int = 0
    rate_limit_pauses: int = 0
    polls_cancelled: int = 0
    ticks: int = 0
    max_polls_per_tick: int = 0
    waits: int = 0
    heap_pushes: int = 0
    webhooks_received: int = 0
    webhooks_confirmed: int = 0
    webhooks_unknown: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    probes: int = 0
    first_poll_hits: int = 0
    first_poll_misses: int = 0
    duration_samples: int = 0
    duration_p50: float | None = None
    seconds_per_cost_p50: float | None = None

    @property
    def tasks_completed(self) -> int:
        """Tasks seen finished (SUCCEED or FAILED)."""
        return self.tasks_succeeded + self.tasks_failed

    @property
    def mean_polls_per_task(self) -> float:
        """Mean polls over finished tasks (0.0 before any)."""
        tasks = sum(self.poll_histogram.values())
        polls = sum(n * count for n, count in self.poll_histogram.items())
        return polls / tasks if tasks else 0.0


@attrs.frozen(kw_only=True)
class PollHint:
    """What the caller knows about a task it waits for.

    ``submitted_at``: ``anyio.current_time()`` taken just before the POST;
    ``cost``: :attr:`Txt2ImgRequest.cost` (relative GPU work); ``webhook``:
    the task was submitted with a webhook, so polls are held back.
    """

    submitted_at: float | None = None
    cost: float | None = None
    webhook: bool = False
