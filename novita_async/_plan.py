"""When to poll: per-task plans.

The :class:`Planner` decides each tracked task's (:class:`~._entry.Entry`'s) next
poll under a :class:`~._policy.PollPolicy`: the first one from the learned durations
(:mod:`._learn`), a probe or a cold delay; after an answer, the server's ``eta``
(split within its last second when etas are whole seconds), the durations of slower
tasks, a steady pace within a burst, or a backoff; after an error, a backoff or the
end of the task; with webhooks, a safety-net poll only when a delivery is late. Pure
decisions: no I/O and no tasks (those are :mod:`._poller`'s).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from statistics import fmean

import anyio
import attrs

from ._entry import Entry
from ._errors import (
    APIConnectionError,
    MalformedResponseError,
    NotFoundError,
    RateLimitError,
    ServerError,
)
from ._learn import MAX_SECONDS, Learner, Peers
from ._policy import PollPolicy, PollStats
from ._queue import Backlog
from ._results import Task, TaskResult, TaskStatus

__all__ = ["Outcome", "Planner"]

logger = logging.getLogger("novita_async")

#: Whole-second etas in a row (and no fraction ever) that make etas "rounded up".
_WHOLE_ETAS = 5
#: Within a burst past every sample, a task is polled at least every this fraction of its age.
_BURST_PACE = 0.25
#: Probes on each side (ended, running) before their costs can say durations grow with cost.
_COHORT_SIDE = 3
#: Ended probes cost less on average than running ones by this factor: durations grow with cost.
_COST_GAP = 0.85
#: A cold first poll held for the probes' next poll comes this long after it (seconds):
#: their answers are in by then.
_PROBE_LEAD = 0.05
#: Longest wait of a cold first poll for the probes' first duration (seconds).
_COLD_HOLD = 60.0
#: Errors that survived the transport's retries but say nothing about the task.
_TRANSIENT = (APIConnectionError, ServerError, RateLimitError, MalformedResponseError)


def _eta(result: TaskResult) -> float | None:
    eta = result.task.eta
    if eta is None or not 0 < eta <= MAX_SECONDS:
        return None
    return float(eta)


@attrs.frozen
class Outcome:
    """What an answer or an error means for a task: finished (``result`` or
    ``error``), or polled again at ``entry.next_at``; ``warmed``: cold first polls
    can be re-planned (the learner has its first duration, learnt one while cold, or
    just got warm)."""

    result: TaskResult | None = None
    error: Exception | None = None
    warmed: bool = False

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None


class Planner:
    """When to poll each task: its first poll, and after each answer or error.

    Holds the policy, the counters, the duration learner, the learner of webhook
    delivery times and the rate-limit pause; it sets ``entry.next_at`` and tells
    the scheduler when a task is finished. No I/O, no tasks.
    """

    def __init__(self, policy: PollPolicy, stats: PollStats) -> None:
        self.policy = policy
        self.stats = stats
        self.learner = Learner(
            window=policy.learning_window,
            warmup=policy.warmup_samples,
            quantile=policy.first_poll_quantile,
            latency_budget=policy.latency_budget,
        )
        #: Submission-to-delivery times of webhooks (when a delivery is late).
        self.deliveries = Learner(
            window=policy.learning_window, warmup=5, quantile=0.99, latency_budget=None
        )
        self.paused_until = -math.inf  # a 429 on a poll pauses every poll
        #: The running tasks (no webhook), and durations held back.
        self.peers = Peers(limit=4 * policy.learning_window)
        #: The server's queue: how fast tasks end, how long they run once started.
        self.backlog = Backlog(policy, local=self.learner.local)
        self._probed = 0  # probes answered and still running
        self._cohort: deque[Entry] = deque(maxlen=policy.warmup_samples)  # the last probes
        self._scales: bool | None = None  # _cost_scales(), until a probe ends or starts
        self._leans = False  # _leaning(), computed with _scales
        self._fastest: float | None = None  # the shortest duration seen (held back or not)
        self._whole_etas = 0  # whole-second etas seen in a row (-1: a fraction was seen)
        self._ranks = 0  # tasks planned so far (a task's rank: the order they were submitted)

    def first(self, entry: Entry) -> None:
        """Plan the first poll of a newly tracked task."""
        submitted, learner = entry.submitted_at, self.learner
        if submitted is None:
            return  # no hint: poll at once
        if entry.webhook:
            entry.plan, entry.next_at = "webhook", submitted + self.safety_offset(entry.cost)
            return
        entry.listed, entry.rank = submitted, self._ranks
        self._ranks += 1
        self.peers.add(submitted)
        offset = learner.first_poll(entry.cost)
        if offset is not None:
            entry.plan, entry.next_at = "learned", submitted + offset
        elif learner.wants_probe() and not self._etas_whole:
            # (whole-second etas bound a duration without giving it: a probe would learn
            # nothing a first poll does not)
            learner.probes_out += 1
            self.stats.probes += 1
            self._cohort.append(entry)
            self._scales = None
            entry.plan, entry.next_at = "probe", submitted + self.policy.probe_delay
        else:
            entry.plan, entry.next_at = "cold", submitted + self.policy.first_poll_delay
            self._cold(entry)

    def safety_offset(self, cost: float | None) -> float:
        """Seconds after submission when a webhook task's delivery is clearly late."""
        late = self.deliveries.first_poll(cost)
        if late is None:
            return self.policy.webhook_cold_delay
        return 1.25 * late + self.policy.webhook_grace

    def replan(self, entry: Entry) -> float:
        """Re-plan a first poll with what was learned since; return when it is due.

        A cold plan moves either way, a learned one only later; a webhook task's
        safety poll follows what is known of deliveries.
        """
        if entry.plan == "webhook":
            if entry.sent == 0 and entry.submitted_at is not None and entry.confirming is None:
                entry.next_at = entry.submitted_at + self.safety_offset(entry.cost)
            return entry.next_at
        if entry.sent == 0 and entry.plan in ("cold", "learned") and self.learner.warm:
            offset = self.learner.first_poll(entry.cost)
            if offset is not None and entry.submitted_at is not None:
                planned = entry.submitted_at + offset
                if entry.plan == "cold" or planned > entry.next_at:
                    entry.plan, entry.next_at = "learned", planned
        elif entry.sent == 0 and entry.plan == "cold":
            self._cold(entry)
        return entry.next_at

    def _cold(self, entry: Entry) -> None:
        """A cold first poll while fewer than ``warmup_samples`` durations are known.

        Once some are: ``latency_budget`` after their 5 % quantile (the first
        finishers), either way from ``first_poll_delay``. Before any, while the
        server gives no ``eta`` and probes are still running, none (for at most a
        minute): a poll before anything finished tells nothing. The probes' first
        duration (or their end, without one) re-plans every cold task
        (``Outcome.warmed``, :meth:`forget`).

        When two probes have ended, too few to tell whether durations grow with cost
        (:meth:`_cost_scales`), and none still running costs less than they do
        (:meth:`_leaning`), a task that would come later if durations did grow waits
        for the probes' next poll: planned from the two cheap probes' seconds alone,
        a burst's first polls came before most dear tasks' end. When due, the tick
        plans it again (:meth:`replan`) with what those probes' answers said.
        """
        submitted = entry.submitted_at
        if submitted is None:
            return
        scales = self._cost_scales()
        early = self.learner.early(entry.cost, scales=scales)
        if early is None:
            early = self._fastest
        if early is not None:
            budget = self.policy.latency_budget or 0.0
            entry.next_at = submitted + max(early + budget, 0.0)
            if not scales and entry.cost is not None and self._leaning():
                scaled = self.learner.early(entry.cost, scales=True)
                upcoming = [e.next_at for e in self._cohort if e.live and not e.sampled]
                if scaled is not None and scaled > early:
                    held = min(submitted + scaled + budget, min(upcoming) + _PROBE_LEAD)
                    entry.next_at = max(entry.next_at, held)
        elif self._holding():  # at most _COLD_HOLD: probes stuck for good must not hang it
            entry.next_at = submitted + max(_COLD_HOLD, self.policy.first_poll_delay)
        else:
            entry.next_at = submitted + self.policy.first_poll_delay

    def _cost_scales(self) -> bool:
        """The probes say durations grow with cost: at least ``_COHORT_SIDE`` of them
        ended and as many still run, and those that ended cost less on average by a
        clear margin (``_COST_GAP``). The probes are the first tasks of a cold start,
        submitted together and all followed to their end, so which of them ended
        first is a fair test; the first finishers alone are not (cheap or not, they
        are the fastest)."""
        if self._scales is None:
            ended = [e.cost for e in self._cohort if e.sampled and e.cost is not None]
            running = [
                e.cost for e in self._cohort if e.live and not e.sampled and e.cost is not None
            ]
            sides = min(len(ended), len(running)) >= _COHORT_SIDE
            self._scales = sides and fmean(ended) < _COST_GAP * fmean(running)
            self._leans = (
                2 <= len(ended) < _COHORT_SIDE and bool(running) and max(ended) <= min(running)
            )
        return self._scales

    def _leaning(self) -> bool:
        """Two probes ended (fewer than ``_COHORT_SIDE``: the probes cannot tell yet),
        some still run, and none of those costs less than either. Where durations grow
        with cost, the first probes to end are the cheapest; where cost says nothing,
        two ends from the cheapest are unlikely (1 in 190 of 20 probes without ties;
        likelier where many tasks share the cheapest cost). Holding a task then costs
        latency only if it ended before the probes' next poll. Judged with
        :meth:`_cost_scales`, from the same probes, once until one ends or starts."""
        self._cost_scales()
        return self._leans

    def _holding(self) -> bool:
        """Cold first polls wait for the probes: no eta, and probes still running."""
        return self.learner.eta_supported is False and self.learner.probes_out + self._probed > 0

    def answered(self, entry: Entry, result: TaskResult, sent: float) -> Outcome:
        now = anyio.current_time()
        policy, learner, stats = self.policy, self.learner, self.stats
        status = result.status
        eta = _eta(result)
        warmed = False
        first, entry.answered = not entry.answered, True
        entry.last, entry.errors, entry.malformed = result, 0, (0, "")
        if first and entry.submitted_at is not None:
            if entry.plan == "probe":
                if not status.is_terminal:
                    if eta is not None:
                        learner.eta_supported = True
                        if eta % 1:  # an exact eta: the duration; a whole one only bounds it
                            seconds = now - entry.submitted_at + eta
                            warmed |= self._sample(entry, seconds, complete=True)
                    elif learner.eta_supported is None:
                        learner.eta_supported = False
                elif status is TaskStatus.SUCCEED:
                    stamped = self._stamped_duration(entry, result, now - entry.submitted_at)
                    seen = sent - entry.submitted_at
                    warmed |= self._sample(entry, seen if stamped is None else stamped)
                self.settle_probe(entry)
            elif entry.plan != "now" and status is not TaskStatus.FAILED:
                if status.is_terminal:
                    stats.first_poll_hits += 1
                else:
                    stats.first_poll_misses += 1
        if status.is_terminal:
            self.backlog.ended(entry, result, now)
            if status is TaskStatus.SUCCEED and not entry.sampled:
                observed = None if entry.submitted_at is None else now - entry.submitted_at
                stamped = self._stamped_duration(entry, result, observed)
                if stamped is None:
                    stamped = self._bracketed(entry, sent)
                if stamped is not None:
                    warmed |= self._sample(entry, stamped)
            return Outcome(result=result, warmed=warmed)
        delay: float | None
        if eta is not None:
            delay = self._eta_delay(entry, eta, now)
            entry.backoff = policy.backoff_initial
            entry.asked = None  # polled by its eta: its last two polls were aimed at its end
        else:  # no eta: the queue, what slower tasks took, a burst's pace, or back off
            entry.asked = sent
            delay = self.backlog.delay(entry, result, now)
            if delay is None:
                delay = self._learned_delay(entry, now)
            budget = policy.latency_budget
            if delay is None and budget is not None and self._censored(entry):
                age = now - entry.listed if entry.listed is not None else 0.0
                delay = max(2 * budget, _BURST_PACE * age)
            if delay is None:
                delay = entry.backoff
                entry.backoff = min(entry.backoff * policy.backoff_factor, policy.max_interval)
        entry.next_at = now + min(max(delay, policy.min_interval), policy.max_interval)
        return Outcome(warmed=warmed)

    @property
    def _etas_whole(self) -> bool:
        """This server's etas are whole seconds, rounded up (``_WHOLE_ETAS`` in a row)."""
        return self._whole_etas >= _WHOLE_ETAS

    def _eta_delay(self, entry: Entry, eta: float, now: float) -> float:
        """When to poll after an answer with ``eta`` seconds left.

        A server whose etas are whole seconds (five in a row, never a fraction)
        rounds up: the task ends within the last second, ``(eta - 1, eta]``.
        Polling at the end of that second costs one poll and up to a second of
        latency; the first time, it is split: a poll at its middle, then (if
        needed) one at its end. Exact etas are polled at ``eta + eta_margin``.
        """
        margin = self.policy.eta_margin
        if eta % 1:
            self._whole_etas = -1  # a fraction: this server's etas are exact
        elif self._whole_etas >= 0:
            self._whole_etas += 1
        if not self._etas_whole:
            return eta + margin
        bound = now + eta
        if entry.finish_by is not None and now < entry.finish_by < bound:
            bound = entry.finish_by
        entry.finish_by = bound
        if entry.split or bound - now <= 0.6 or bound - now > self.policy.max_interval + 0.5:
            return bound - now + margin
        entry.split = True
        return bound - 0.5 - now

    def _stamped_duration(
        self, entry: Entry, result: TaskResult, observed: float | None
    ) -> float | None:
        """Submission-to-end seconds from the server's stamps (``None`` without). A
        task that waited in a queue tells how long the queue was, not how long tasks
        take: ``nan`` once the learner is warm (:meth:`_sample` learns nothing from
        it), else the seconds less the queue's wait."""
        stamped = self.learner.from_timestamps(result, entry.submitted_at, observed)
        waited = self.backlog.queue_wait(result)
        if stamped is None or waited <= 0:
            return stamped
        return math.nan if self.learner.warm else stamped - waited

    @staticmethod
    def _bracketed(entry: Entry, sent: float) -> float | None:
        """A probe's duration without stamps: it ended between its last two polls
        (the midpoint), which its duration did not time (they come at a burst's pace
        from its start). ``None`` for other tasks: their polls were aimed at their
        end, so the tasks that missed them are the slow ones; nor after an eta answer."""
        asked, submitted = entry.asked, entry.submitted_at
        if entry.plan != "probed" or entry.queued or asked is None or submitted is None:
            return None  # (a queued probe's polls bracket the queue's wait too)
        return (asked + sent) / 2 - submitted

    def _learned_delay(self, entry: Entry, now: float) -> float | None:
        if entry.submitted_at is None:
            return None
        offset = self.learner.next_poll(
            now - entry.submitted_at, entry.cost, tail=entry.plan == "learned"
        )
        if offset is None:
            return None
        return entry.submitted_at + offset - now

    def _censored(self, entry: Entry) -> bool:
        """Past what the samples know, yet not slower than its peers: at least
        ``warmup_samples`` running tasks were submitted before it or within
        ``2 x latency_budget`` after it (a burst: the samples so far are its first
        finishers, and the others are as old). Its end is as near as theirs were, so it
        is polled every ``2 x latency_budget`` (late by the budget on average), not after
        a growing backoff, which suits a task slower than everything around it."""
        listed = entry.listed
        if listed is None:
            return False
        horizon = listed + 2 * (self.policy.latency_budget or 0.0)
        return self.peers.as_old(horizon) >= self.policy.warmup_samples

    def forget(self, entry: Entry) -> bool:
        """``entry`` is no longer running here (finished or dropped). ``True`` when cold
        first polls are to be re-planned: it released durations the learner took while
        cold (or that warmed it), or it was the last probe they waited for."""
        self._scales = None
        listed, entry.listed = entry.listed, None
        if listed is None:
            return False
        replan = False
        for seconds, cost in self.peers.discard(listed):
            replan |= self._learn(seconds, cost)
        if entry.plan == "probed":
            held = self._holding()
            self._probed -= 1
            replan |= held and not self._holding()
        return replan

    def failed(self, entry: Entry, exc: Exception) -> Outcome:
        now = anyio.current_time()
        policy, stats = self.policy, self.stats
        if isinstance(exc, NotFoundError) and exc.reason.upper() == "TASK_NOT_FOUND":
            since = entry.submitted_at if entry.submitted_at is not None else entry.created_at
            if now - since < policy.not_found_grace:
                stats.not_found_retries += 1
                entry.next_at = now + self._error_delay(entry)
                return Outcome()
        elif isinstance(exc, ServerError) and exc.reason.upper() == "TASK_FAILED":
            reason = exc.message or exc.reason
            task = Task(task_id=entry.task_id, status=TaskStatus.FAILED, reason=reason)
            return Outcome(result=TaskResult(task=task))
        elif isinstance(exc, _TRANSIENT):
            if isinstance(exc, MalformedResponseError) and self._malformed_again(entry, exc):
                return Outcome(error=exc)
            delay = self._error_delay(entry)
            stats.transient_errors += 1
            if isinstance(exc, RateLimitError):  # account-wide: pause every poll
                pause = exc.retry_after if exc.retry_after is not None else delay
                pause = min(pause, policy.max_pause)
                self.paused_until = max(self.paused_until, now + pause)
                stats.rate_limit_pauses += 1
                delay = max(delay, pause)
            logger.warning(
                "polling task %s failed (%s: %s); next poll in %.2fs",
                entry.task_id,
                type(exc).__name__,
                exc,
                delay,
            )
            entry.next_at = now + delay
            return Outcome()
        return Outcome(error=exc)

    def _malformed_again(self, entry: Entry, exc: MalformedResponseError) -> bool:
        """Count identical malformed answers in a row; True once there are too many."""
        count, body = entry.malformed
        count = count + 1 if body == exc.body else 1
        entry.malformed = (count, exc.body)
        return count >= self.policy.max_malformed

    def _error_delay(self, entry: Entry) -> float:
        policy = self.policy
        entry.errors += 1
        delay = policy.backoff_initial * policy.backoff_factor ** min(entry.errors - 1, 64)
        return min(max(delay, policy.min_interval), policy.max_interval)

    def _sample(self, entry: Entry, seconds: float, *, complete: bool = False) -> bool:
        """One duration of ``entry``, learnt now (``complete``: known before the task
        ended, from an eta) or once its older peers are done (:class:`Peers`). True when
        cold first polls can be re-planned: the first duration seen, one learnt while
        the learner is cold, or it just got warm."""
        entry.sampled, self._scales = True, None
        if not 0 <= seconds <= MAX_SECONDS:
            return False
        first = self._fastest is None
        self._fastest = seconds if self._fastest is None else min(seconds, self._fastest)
        listed = entry.listed
        if complete or listed is None or entry.plan in ("probe", "probed"):
            return self._learn(seconds, entry.cost) or first
        warmed = first
        for learnt, cost in self.peers.offer(listed, seconds, entry.cost):
            warmed |= self._learn(learnt, cost)
        return warmed

    def _learn(self, seconds: float, cost: float | None) -> bool:
        """Hand a duration to the learner; True when cold first polls are to be
        re-planned: that made it warm, or it is still cold and now knows 1, 2, 4, 8 ...
        durations (what they go by moved; at most a few re-plans per cold task)."""
        learner, stats = self.learner, self.stats
        warmed = learner.add(seconds, cost)
        known = len(learner.raw)
        replan = warmed or (not learner.warm and known & (known - 1) == 0)
        stats.duration_samples = known
        stats.duration_p50 = learner.raw.quantile(0.5) if known else None
        if len(learner.per_cost):
            stats.seconds_per_cost_p50 = learner.per_cost.quantile(0.5)
        return replan

    def delivered(self, entry: Entry, arrived: float) -> None:
        """A webhook delivery confirmed ``entry``'s end: learn how long deliveries take."""
        if entry.webhook and entry.submitted_at is not None:
            self.deliveries.add(arrived - entry.submitted_at, entry.cost)

    def settle_probe(self, entry: Entry) -> None:
        """A probe answered (or left): no longer out, and running until forgotten."""
        if entry.plan == "probe":
            entry.plan = "probed"
            self.learner.probes_out -= 1
            if entry.listed is not None:
                self._probed += 1
