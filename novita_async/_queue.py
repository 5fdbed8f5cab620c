"""A server that queues: when a task it answered ``QUEUED`` for will end.

A burst larger than the account's share of GPUs waits on the server
(``TASK_STATUS_QUEUED``), and its tasks start, in the order they came, as earlier
ones end. Their durations from submission then grow with the queue: a waiting task
is past every duration learnt, and a growing backoff put its polls seconds late.
:class:`Backlog` follows the queue instead:

* its *front*: the last-submitted task seen started (``debug_info.execute_time_ms``)
  and the pace at which tasks that had waited moved it lately, in tasks per second
  (a task that started at once was paced by the client: a trickle of requests
  before a burst says nothing of the queue); a waiting task starts once the tasks
  submitted between the front and it have, at that pace;
* its *runs*: execution start to end (both server stamps, so no queueing and no
  clock offset in them), learnt per cost by a :class:`~._learn.Learner` of its own;
  a task that has started ends where runs of its cost end;
* its *waits*: submission to execution; past the shortest one seen lately by more
  than a slack, a wait is a queue's, not the task's: such a task is not learnt as a
  duration (else the first polls after a queue has drained come as late as it was
  long).

A server without execution stamps still says ``QUEUED``: the front is then the
last-submitted task seen ended, and a waiting task ends once the tasks between it and
that front have. Pure computation: no I/O, no clock of its own.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from ._entry import Entry
from ._learn import MAX_SECONDS, Learner
from ._policy import PollPolicy
from ._results import TaskResult, TaskStatus

__all__ = ["Backlog"]

#: Moves of a front before its pace says how fast the queue drains.
_MIN_MOVES = 8
#: The pace is that of at most this many moves, those within ``_PACE_SPANS`` times the
#: time the last ``_MIN_MOVES`` took (at least ``_PACE_SECONDS``): a queue's pace,
#: not that of a trickle before it.
_PACE_MOVES, _PACE_SPANS, _PACE_SECONDS = 64, 4, 5.0
#: The shortest wait is that of about the last ``_WAIT_BLOCK x _WAIT_BLOCKS`` waits.
_WAIT_BLOCK, _WAIT_BLOCKS = 64, 16
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
    """(rank, instant, waited) of tasks, each submitted after the last: how far a queue
    got, and how fast it moves."""

    __slots__ = ("_moves",)

    def __init__(self, size: int) -> None:
        self._moves: deque[tuple[int, float, bool]] = deque(maxlen=size)

    def move(self, rank: int, at: float, *, waited: bool = True) -> None:
        moves = self._moves
        if not moves or (rank > moves[-1][0] and at >= moves[-1][1]):
            moves.append((rank, at, waited))

    def reaches(self, rank: int) -> float | None:
        """When the front reaches the ``rank``-th task, at the recent pace of the tasks
        that waited to move it (``None`` before ``_MIN_MOVES`` did): those that did not
        were paced by the client (a trickle before a burst), not by a queue."""
        moves = self._moves
        paced = [move for move in moves if move[2]]
        if len(paced) < _MIN_MOVES:
            return None
        last, at, _ = moves[-1]
        horizon = at - max(_PACE_SECONDS, _PACE_SPANS * (at - paced[-_MIN_MOVES][1]))
        first, since, _ = next(move for move in paced if move[1] >= horizon)
        end, until, _ = paced[-1]
        if until <= since:
            return None
        return at + max(rank - last, 0) * (until - since) / (end - first)


class _Lowest:
    """The lowest of the last ``block x blocks`` values or so (minima of whole blocks,
    and of the block being filled): a shift that lasts is followed, a queue is not."""

    __slots__ = ("_block", "_filled", "_lowest", "_minima")

    def __init__(self, block: int, blocks: int) -> None:
        self._minima: deque[float] = deque(maxlen=blocks)
        self._block, self._filled, self._lowest = block, 0, math.inf

    @property
    def lowest(self) -> float:
        """The lowest of the recent values (``inf`` before any)."""
        return min(min(self._minima, default=math.inf), self._lowest)

    def add(self, value: float) -> float:
        """Take ``value``; return the lowest of the recent values."""
        self._lowest = min(self._lowest, value)
        self._filled += 1
        lowest = min(self._minima, default=math.inf)
        lowest = min(lowest, self._lowest)
        if self._filled == self._block:
            self._minima.append(self._lowest)
            self._filled, self._lowest = 0, math.inf
        return lowest


class Backlog:
    """Where a server's queue is, how long its tasks run, and how long they waited.

    ``local`` turns a server stamp (epoch milliseconds) into local-clock seconds
    (``None`` while the clocks' offset is unknown). Tasks are ranked in the order
    they were submitted (``Entry.rank``; ``Entry.listed``: ranked and running).
    """

    __slots__ = ("_budget", "_ends", "_learner", "_local", "_pending", "_starts", "_waits")

    def __init__(self, policy: PollPolicy, *, local: Callable[[int | None], float | None]) -> None:
        self._starts = _Front(_PACE_MOVES)  # stamped starts (local clock)
        self._ends = _Front(_PACE_MOVES)  # ends seen, where starts cannot be placed
        self._waits = _Lowest(_WAIT_BLOCK, _WAIT_BLOCKS)
        self._local, self._budget = local, policy.latency_budget
        #: Execution-start-to-end seconds, per cost: (seconds, cost) held until a queue
        #: asks for them (a learner's fit costs ~0.07 ms a task; most servers never queue).
        self._pending: deque[tuple[float, float | None]] | None = deque(
            maxlen=policy.learning_window
        )
        self._learner = Learner(
            window=policy.learning_window,
            warmup=policy.warmup_samples,
            quantile=policy.first_poll_quantile,
            latency_budget=policy.latency_budget,
        )

    @property
    def runs(self) -> Learner:
        """The learner of runs, with every run held so far."""
        if self._pending is not None:
            for seconds, cost in self._pending:
                self._learner.add(seconds, cost)
            self._pending = None
        return self._learner

    def delay(self, entry: Entry, result: TaskResult, now: float) -> float | None:
        """Seconds to ``entry``'s next poll after an unfinished answer, if the server
        queued it. ``QUEUED``: :meth:`until_end`. Running after it said ``QUEUED``
        more than ``_WAIT_SLACK`` after submission, or its stamps show a queue's wait:
        :meth:`after_start` if its start is stamped, else ``latency_budget`` (if not
        0 or ``None``). ``None``: not queued, or not known."""
        submitted = entry.submitted_at
        if submitted is None or entry.listed is None:
            return None
        if result.status is TaskStatus.QUEUED:
            entry.queued = entry.queued or now - submitted > _WAIT_SLACK
            return self.until_end(entry.rank, entry.cost, now)
        start = self._started(entry, result, now)
        if start is None:
            return self._budget if entry.queued and self._budget else None
        started, waited = start
        if entry.queued or waited:
            entry.queued = True
            return self.after_start(started, entry.cost, now)
        return None

    def ended(self, entry: Entry, result: TaskResult, now: float) -> None:
        """``entry`` was seen ended at ``now``: where it started moves the front of
        starts (if it cannot be placed, its end moves the front of ends); a success
        teaches its run (a failure may end early)."""
        if self._started(entry, result, now) is None and entry.listed is not None:
            self._ends.move(entry.rank, now)
        info = result.extra.debug_info
        if info is None or result.status is not TaskStatus.SUCCEED:
            return
        run = _seconds(info.complete_time_ms, info.execute_time_ms)
        if run is not None:
            if self._pending is not None:
                self._pending.append((run, entry.cost))
            else:
                self._learner.add(run, entry.cost)

    def _started(self, entry: Entry, result: TaskResult, now: float) -> tuple[float, bool] | None:
        """When ``entry`` started (its ``execute_time_ms`` on the local clock), if
        stamped and plausible, and whether it waited in a queue first
        (:meth:`queue_wait`); it moves the front of starts."""
        info = result.extra.debug_info
        started = None if info is None else self._local(info.execute_time_ms)
        submitted = entry.submitted_at
        if started is None or submitted is None or entry.listed is None:
            return None
        if not submitted - 1.0 <= started <= now:  # (1 s: the clocks' offset is estimated)
            return None
        waited = self.queue_wait(result, record=False) > 0
        self._starts.move(entry.rank, started, waited=waited)
        return started, waited

    def queue_wait(self, result: TaskResult, *, record: bool = True) -> float:
        """Seconds of ``result``'s wait (submission to execution, stamped) that were a
        queue's: all of it past the shortest wait seen lately, when that is over
        ``_WAIT_SLACK``; else 0, and 0 without stamps. ``record``: count this wait
        among the recent ones (once per task: at its end)."""
        info = result.extra.debug_info
        if info is None:
            return 0.0
        wait = _seconds(info.execute_time_ms, info.submit_time_ms)
        if wait is None:
            return 0.0
        lowest = self._waits.add(wait) if record else min(self._waits.lowest, wait)
        extra = wait - lowest
        return extra if extra > _WAIT_SLACK else 0.0

    def until_end(self, rank: int, cost: float | None, now: float) -> float | None:
        """Seconds from ``now`` to poll the ``rank``-th task submitted, waiting: when
        the front of starts reaches it (now, if it has passed it: tasks may come a
        little out of order), plus what the first runs of its ``cost`` took. Without
        stamped starts, when the front of ends reaches it; ``None`` if that has passed
        (this queue does not serve in order) or while neither front is known."""
        runs = self.runs
        run = runs.early(cost) if runs.warm else None
        start = self._starts.reaches(rank)
        if run is not None and start is not None:
            return max(start, now) - now + run
        end = self._ends.reaches(rank)
        return None if end is None or end < now else end - now

    def after_start(self, started: float, cost: float | None, now: float) -> float | None:
        """Seconds from ``now`` to poll a task that started at ``started`` (local
        clock): where the runs of its cost that lasted longer ended."""
        offset = self.runs.next_poll(max(0.0, now - started), cost)
        return None if offset is None else max(0.0, started + offset - now)
