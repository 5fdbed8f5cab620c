"""A server that queues: when a task it answered ``QUEUED`` for will end.

A burst larger than the account's share of GPUs waits on the server
(``TASK_STATUS_QUEUED``), and its tasks start, in the order they came, as earlier
ones end. Their durations from submission then grow with the queue: a waiting task
is past every duration learnt, and a growing backoff put its polls seconds late.
:class:`Backlog` follows the queue instead:

* its *front*: the last-submitted task seen started (``debug_info.execute_time_ms``)
  and the pace at which the front moved lately, in tasks per second; a waiting task
  starts once the tasks submitted between the front and it have, at that pace;
* its *runs*: execution start to end (both server stamps, so no queueing and no
  clock offset in them), learnt per cost by a :class:`~._learn.Learner` of its own;
  a task that has started ends where runs of its cost end;
* its *waits*: submission to execution; past the shortest one seen plus a slack, a
  wait is the queue's, not the task's, and comes off the durations the scheduler
  learns (else the first polls after a queue has drained come as late as it was long).

A server without execution stamps still says ``QUEUED``: the front is then the
last-submitted task seen ended, and a waiting task ends once the tasks between it and
that front have. Pure computation: no I/O, no clock of its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ._entry import Entry
from ._learn import MAX_SECONDS, Learner
from ._policy import PollPolicy
from ._results import TaskResult, TaskStatus

__all__ = ["Backlog"]

#: Moves of a front before its pace says how fast the queue drains.
_MIN_MOVES = 8
#: A wait this much longer than the shortest seen (seconds) was spent in a queue.
_WAIT_SLACK = 0.5


def _seconds(later: int | None, earlier: int | None) -> float | None:
    """Seconds between two server stamps (epoch milliseconds), if both are there."""
    if not later or not earlier:
        return None
    try:
        seconds = (later - earlier) / 1000
    except OverflowError:  # ints beyond any float: not epoch milliseconds
        return None
    return seconds if 0 <= seconds <= MAX_SECONDS else None


class _Front:
    """(rank, instant) of tasks, each submitted after the last: how far a queue got."""

    __slots__ = ("_moves",)

    def __init__(self, size: int) -> None:
        self._moves: deque[tuple[int, float]] = deque(maxlen=size)

    def move(self, rank: int, at: float) -> None:
        moves = self._moves
        if not moves or (rank > moves[-1][0] and at >= moves[-1][1]):
            moves.append((rank, at))

    def reaches(self, rank: int) -> float | None:
        """When the front reaches the ``rank``-th task, at its recent pace (``None``
        before ``_MIN_MOVES`` moves)."""
        moves = self._moves
        if len(moves) < _MIN_MOVES:
            return None
        (first, since), (last, at) = moves[0], moves[-1]
        if at <= since:
            return None
        return at + max(rank - last, 0) * (at - since) / (last - first)


class Backlog:
    """Where a server's queue is, how long its tasks run, and how long they waited.

    ``local`` turns a server stamp (epoch milliseconds) into local-clock seconds
    (``None`` while the clocks' offset is unknown). Tasks are ranked in the order
    they were submitted (``Entry.rank``; ``Entry.listed``: ranked and running).
    """

    __slots__ = ("_budget", "_ends", "_local", "_shortest_wait", "_starts", "runs")

    def __init__(self, policy: PollPolicy, *, local: Callable[[int | None], float | None]) -> None:
        size = max(policy.learning_window // 4, _MIN_MOVES)
        self._starts = _Front(size)  # stamped starts (local clock)
        self._ends = _Front(size)  # ends seen, for a server without execution stamps
        self._shortest_wait: float | None = None
        self._local, self._budget = local, policy.latency_budget
        #: Execution-start-to-end seconds, per cost.
        self.runs = Learner(
            window=policy.learning_window,
            warmup=policy.warmup_samples,
            quantile=policy.first_poll_quantile,
            latency_budget=policy.latency_budget,
        )

    def delay(self, entry: Entry, result: TaskResult, now: float) -> float | None:
        """Seconds to ``entry``'s next poll after an unfinished answer, if the server
        queued it. ``QUEUED``: :meth:`until_end`. Running after a wait longer than
        ``_WAIT_SLACK`` (it said ``QUEUED`` that late, or its stamps say so):
        :meth:`after_start` if its start is stamped, else ``latency_budget``.
        ``None``: not queued, or not known."""
        submitted = entry.submitted_at
        if submitted is None or entry.listed is None:
            return None
        if result.status is TaskStatus.QUEUED:
            entry.queued = entry.queued or now - submitted > _WAIT_SLACK
            return self.until_end(entry.rank, entry.cost, now)
        started = self._started(entry, result, now)
        if started is None:
            return self._budget if entry.queued else None
        if entry.queued or self.excess_wait(result) > 0:
            entry.queued = True
            return self.after_start(started, entry.cost, now)
        return None

    def ended(self, entry: Entry, result: TaskResult, now: float) -> None:
        """``entry`` was seen ended at ``now``: learn its run (and where it started), or
        move the front of ends."""
        self._started(entry, result, now)
        info = result.extra.debug_info
        run = None if info is None else _seconds(info.complete_time_ms, info.execute_time_ms)
        if run is not None:
            self.runs.add(run, entry.cost)
        elif entry.listed is not None:
            self._ends.move(entry.rank, now)

    def _started(self, entry: Entry, result: TaskResult, now: float) -> float | None:
        """When ``entry`` started (its ``execute_time_ms`` on the local clock), if
        stamped and plausible; it moves the front of starts."""
        info = result.extra.debug_info
        started = None if info is None else self._local(info.execute_time_ms)
        submitted = entry.submitted_at
        if started is None or submitted is None or entry.listed is None:
            return None
        if not submitted - 1.0 <= started <= now:  # (1 s: the clocks' offset is estimated)
            return None
        self._starts.move(entry.rank, started)
        return started

    def excess_wait(self, result: TaskResult) -> float:
        """Seconds ``result``'s task waited beyond the shortest wait seen plus
        ``_WAIT_SLACK`` (a queue's share of its duration; 0 without stamps)."""
        info = result.extra.debug_info
        wait = None if info is None else _seconds(info.execute_time_ms, info.submit_time_ms)
        if wait is None:
            return 0.0
        if self._shortest_wait is None or wait < self._shortest_wait:
            self._shortest_wait = wait
        return max(0.0, wait - self._shortest_wait - _WAIT_SLACK)

    def until_end(self, rank: int, cost: float | None, now: float) -> float | None:
        """Seconds from ``now`` to poll the ``rank``-th task submitted, waiting: when
        the front of starts reaches it, plus what the first runs of its ``cost`` took;
        without stamped starts, when the front of ends reaches it. ``None`` while
        neither is known, or when the task should have ended already: this queue does
        not serve in order (or not only this client's tasks at that pace)."""
        run = self.runs.early(cost) if self.runs.warm else None
        start = self._starts.reaches(rank)
        end = None if run is None or start is None else start + run
        if end is None:
            end = self._ends.reaches(rank)
        return None if end is None or end < now else end - now

    def after_start(self, started: float, cost: float | None, now: float) -> float | None:
        """Seconds from ``now`` to poll a task that started at ``started`` (local
        clock): where the runs of its cost that lasted longer ended."""
        offset = self.runs.next_poll(max(0.0, now - started), cost)
        return None if offset is None else max(0.0, started + offset - now)
