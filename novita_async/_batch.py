"""Concurrent fan-out: :meth:`AsyncNovita.txt2img_many` returns a :class:`BatchRun`.

A run yields one :class:`BatchItem` per request, as each finishes. It works two ways:

* ``async with client.txt2img_many(reqs) as run: async for item in run: ...`` —
  submissions and waits run in a task group owned by the ``async with`` block,
  at full concurrency even while the loop body runs. Leaving the block (break,
  exception, outer cancellation) cancels whatever is pending.
* ``async for item in client.txt2img_many(reqs): ...`` — no task outlives a
  ``__anext__`` call: each call runs the engine until at least one item is
  ready, then cancels the rest. Progress (task ids, retry counts, timeout
  budgets) is kept between calls, so after a ``break`` nothing runs any more and
  no request is ever sent again.

Money rules. A POST that is on the wire when cancellation hits is shielded (for
at most the transport's timeouts) so its task id is not lost; no POST starts
after cancellation (the engine retries 429/503/never-sent failures itself,
outside the shield). Tasks that were submitted but whose item was never handed
out keep running and are billed: they are logged as a warning when the run
closes and listed in :attr:`BatchRun.pending_task_ids`; with a journal, a rerun
picks them up without paying again.

Pacing: every POST first takes its ``image_num`` from a
:class:`~novita_async.WeightedRateLimiter` (429s refund and slow it down, then
the same request is resent: a 429 created no task), at most
``max_concurrent_submissions`` POSTs are in flight and waits share the client's
poll scheduler, so one batch never needs more than ``max_concurrent_submissions
+ max_concurrent_polls`` connections. ``timeout`` bounds each task's wait for
its result, counted while the run is active (bare iteration: not while your
loop body runs).

A bare loop restarts the waits of all submitted tasks at each item (cheap, but
O(tasks) per item): prefer ``async with`` for thousands of prompts.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import os
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
import attrs

from ._errors import (
    APIConnectionError,
    APIStatusError,
    InvalidRequestError,
    NovitaError,
    RateLimitError,
    ServerError,
    SubmissionUncertainError,
    TaskFailedError,
    TaskTimeoutError,
)
from ._journal import Journal, request_key
from ._models import Extra, Task, TaskResult, TaskStatus, Txt2ImgRequest
from ._poller import PollHint
from ._ratelimit import Admission, WeightedRateLimiter

if TYPE_CHECKING:
    from ._client import AsyncNovita

__all__ = ["RATE_LIMIT_ATTEMPTS", "BatchItem", "BatchRun"]

logger = logging.getLogger("novita_async")

#: 429 answers one request may get before it becomes an error item.
RATE_LIMIT_ATTEMPTS = 10
#: Default number of POSTs in flight (lowered to fit the connection pool).
DEFAULT_CONCURRENT_SUBMISSIONS = 8
_SHOWN_IDS = 20


@attrs.frozen(kw_only=True)
class BatchItem:
    """The outcome of one request of a fan-out.

    ``index`` is the request's position in the input; ``task_id`` is None if no
    task was created (or it is unknown: :class:`SubmissionUncertainError`).
    Exactly one of ``result`` and ``error`` is set. ``error`` is a
    :class:`NovitaError` (``TaskFailedError``, ``TaskTimeoutError``,
    ``SubmissionUncertainError``, ``BadRequestError``, ``InvalidRequestError``, …)
    or, for an unexpected failure of that one request, any exception.
    ``from_journal``: the outcome was read from the journal of an earlier run.
    """

    index: int
    request: Txt2ImgRequest
    task_id: str | None = None
    result: TaskResult | None = None
    error: BaseException | None = None
    from_journal: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.result is not None

    def unwrap(self) -> TaskResult:
        """The result, or raise the item's error."""
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class _Entry:
    """Mutable progress of one request across engine runs."""

    __slots__ = ("budget", "index", "rate_limited", "request", "retries", "submitted_at", "task_id")

    def __init__(self, index: int, request: Txt2ImgRequest, budget: float | None) -> None:
        self.index = index
        self.request = request
        self.budget = budget  # seconds of waiting left (None: unbounded)
        self.task_id: str | None = None
        self.submitted_at: float | None = None
        self.rate_limited = 0
        self.retries = 0


def _never_created(exc: Exception) -> bool:
    """Errors after which Novita certainly created no task (safe to resend)."""
    if isinstance(exc, APIConnectionError):  # _submit raises these only if never sent
        return True
    return isinstance(exc, ServerError) and exc.status_code == 503


def _pending_ids(waiting: dict[int, _Entry], ready: deque[BatchItem]) -> list[str]:
    found = [(e.index, e.task_id) for e in waiting.values() if e.task_id is not None]
    found += [(i.index, i.task_id) for i in ready if i.task_id is not None]
    return [task_id for _, task_id in sorted(found)]


def _report_abandoned(waiting: dict[int, _Entry], ready: deque[BatchItem]) -> None:
    ids = _pending_ids(waiting, ready)
    if not ids:
        return
    shown = ", ".join(ids[:_SHOWN_IDS]) + (", …" if len(ids) > _SHOWN_IDS else "")
    logger.warning(
        "txt2img_many stopped with %d submitted task(s) whose result was not delivered; "
        "Novita runs and bills them anyway (see BatchRun.pending_task_ids, or rerun "
        "with the same journal): %s",
        len(ids),
        shown,
    )


class BatchRun:
    """A fan-out of txt2img requests; see the module docstring.

    Iterate it (``async for``) for :class:`BatchItem` s in completion order,
    preferably inside ``async with``. Created by :meth:`AsyncNovita.txt2img_many`.
    """

    def __init__(
        self,
        client: AsyncNovita,
        requests: Iterable[Txt2ImgRequest],
        *,
        extra: Extra | None = None,
        timeout: float | None = None,
        max_concurrent_submissions: int | None = None,
        images_per_minute: float | WeightedRateLimiter | None = None,
        journal: str | os.PathLike[str] | Journal | None = None,
        resubmit_uncertain: bool = False,
    ) -> None:
        if extra is not None and not isinstance(extra, Extra):
            raise InvalidRequestError(f"extra must be an Extra, got {type(extra).__name__}")
        if timeout is not None and not (timeout > 0 and not math.isnan(timeout)):
            raise ValueError(f"timeout must be None or > 0, got {timeout!r}")
        polls = client.scheduler.max_concurrent_polls
        room = client.max_connections - polls
        if max_concurrent_submissions is None:
            workers = max(1, min(DEFAULT_CONCURRENT_SUBMISSIONS, room))
        else:
            workers = max_concurrent_submissions
            if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
                raise ValueError(
                    f"max_concurrent_submissions must be an int >= 1, got {workers!r}"
                )
            if workers > room:
                raise ValueError(
                    f"max_concurrent_submissions={workers} plus the client's "
                    f"max_concurrent_polls={polls} exceeds its max_connections="
                    f"{client.max_connections}; raise max_connections or lower one of them"
                )
        if isinstance(images_per_minute, WeightedRateLimiter):
            limiter = images_per_minute
        else:
            limiter = WeightedRateLimiter(images_per_minute)
        self._client = client
        self._extra = extra
        self._timeout = timeout
        self._workers = workers
        self._limiter = limiter
        self._resubmit_uncertain = resubmit_uncertain
        self._journal_spec = journal
        self._journal: Journal | None = journal if isinstance(journal, Journal) else None
        self._source: Iterator[tuple[int, Any]] | None = enumerate(requests)
        self._queue: list[tuple[int, _Entry]] = []  # heap: taken, not (yet) submitted
        self._posting: set[int] = set()  # taken by a worker, not submitted yet
        self._waiting: dict[int, _Entry] = {}  # submitted, outcome unknown
        self._ready: deque[BatchItem] = deque()  # finished, not handed out yet
        self._wakeup = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None  # the running engine's
        self._host: anyio.abc.TaskGroup | None = None  # the ``async with`` block's
        self._stop_on_item = False
        self._prepared = False
        self._entered = False
        self._iterated_bare = False
        self._in_anext = False
        self._engine_done = False
        self._engine_stopped = anyio.Event()
        self._closed = False
        self._failure: BaseException | None = None
        self._submitted = 0
        self._delivered = 0
        self._finalizer = weakref.finalize(self, _report_abandoned, self._waiting, self._ready)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<BatchRun {state} submitted={self._submitted} delivered={self._delivered} "
            f"pending={len(self.pending_task_ids)}>"
        )

    # ----------------------------------------------------------------- inspection

    @property
    def pending_task_ids(self) -> tuple[str, ...]:
        """Tasks created by this run whose item was not handed out (yet), by index.

        After an early exit these keep running on Novita and are billed;
        ``await client.wait(task_id)`` still gets their results.
        """
        return tuple(_pending_ids(self._waiting, self._ready))

    @property
    def submitted(self) -> int:
        """Tasks this run created."""
        return self._submitted

    @property
    def delivered(self) -> int:
        """Items handed out so far."""
        return self._delivered

    @property
    def limiter(self) -> WeightedRateLimiter:
        return self._limiter

    @property
    def max_concurrent_submissions(self) -> int:
        return self._workers

    @property
    def closed(self) -> bool:
        return self._closed

    # ----------------------------------------------------------------- context manager

    async def __aenter__(self) -> BatchRun:
        if self._entered or self._iterated_bare or self._closed:
            raise RuntimeError("a BatchRun can be entered once, before it is iterated")
        self._entered = True
        opened = self._open_journal()
        try:
            self._prepare()
            host = anyio.create_task_group()
            await host.__aenter__()
        except BaseException:
            if opened:
                self._close_journal()
            self._closed = True
            self._finalizer.detach()
            raise
        self._host = host
        host.start_soon(self._run_hosted)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        host, self._host = self._host, None
        if host is None:
            return
        host.cancel_scope.cancel()
        try:
            # Not handing ``exc`` to the group keeps the caller's exception unwrapped
            # (it propagates as is since we return None).
            await host.__aexit__(None, None, None)
        finally:
            self._close()

    async def _run_hosted(self) -> None:
        try:
            await self._engine(stop_on_item=False)
        except Exception as exc:
            self._fail(exc)
        finally:
            self._engine_done = True
            self._engine_stopped.set()
            self._wakeup.set()

    async def aclose(self) -> None:
        """Stop: pending work is cancelled, no request is sent any more. Idempotent.

        Inside ``async with`` this waits until a POST on the wire has its answer
        (so :attr:`pending_task_ids` is complete); the block's exit reports.
        """
        if self._host is None:
            self._close()
            return
        self._closed = True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._engine_stopped.wait()

    # ----------------------------------------------------------------- iteration

    def __aiter__(self) -> BatchRun:
        return self

    async def __anext__(self) -> BatchItem:
        if self._in_anext:
            raise RuntimeError("this BatchRun is already being iterated by another task")
        self._in_anext = True
        try:
            return await self._next()
        finally:
            self._in_anext = False

    async def _next(self) -> BatchItem:
        hosted = self._host is not None
        if not hosted and not self._entered:
            self._iterated_bare = True
        while True:
            if self._failure is not None:
                if not hosted:
                    self._close()
                raise self._failure
            if self._closed:
                raise StopAsyncIteration
            if self._ready:
                self._delivered += 1
                return self._ready.popleft()
            if not self._work_left():
                if not hosted:
                    self._close()
                raise StopAsyncIteration
            if hosted:
                if self._engine_done:
                    raise StopAsyncIteration
                event = self._wakeup = anyio.Event()
                await event.wait()
            elif self._entered:  # after the ``async with`` block
                raise StopAsyncIteration
            else:
                opened = self._open_journal()
                try:
                    await self._engine(stop_on_item=True)
                finally:
                    if opened:
                        self._close_journal()

    # ----------------------------------------------------------------- lifecycle helpers

    def _open_journal(self) -> bool:
        """Open the journal file for this engine run; True if opened here."""
        spec = self._journal_spec
        if spec is None or isinstance(spec, Journal) or self._journal is not None:
            return False
        self._journal = Journal(spec)
        return True

    def _close_journal(self) -> None:
        journal = self._journal
        if journal is not None and not isinstance(self._journal_spec, Journal):
            self._journal = None
            journal.close()

    def _close(self) -> None:
        if self._finalizer.detach() is not None:
            _report_abandoned(self._waiting, self._ready)
        self._closed = True
        self._close_journal()

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        self._wakeup.set()

    def _work_left(self) -> bool:
        return bool(self._source is not None or self._queue or self._posting or self._waiting)

    # ----------------------------------------------------------------- engine

    def _prepare(self) -> None:
        """Once: with a journal, read every request and replay what is known."""
        if self._prepared:
            return
        self._prepared = True
        journal = self._journal
        if journal is None or self._source is None:
            return
        pairs = list(self._source)
        self._source = None
        entries: list[_Entry] = []
        keys: list[tuple[int, str]] = []
        for index, request in pairs:
            entry = self._entry(index, request)
            if entry is not None:
                entries.append(entry)
                keys.append((index, request_key(request, self._extra)))
        records = journal.begin(keys)
        for entry in entries:
            record = records.get(entry.index)
            state = "new" if record is None else record.state
            if record is None or state in ("new", "rejected"):
                heapq.heappush(self._queue, (entry.index, entry))
            elif state == "succeeded" and record.result is not None:
                self._deliver(entry, task_id=record.task_id, result=record.result, replay=True)
            elif state in ("succeeded", "failed") and record.task_id is not None:
                reason = record.error or ""
                result = record.result or TaskResult(
                    task=Task(task_id=record.task_id, status=TaskStatus.FAILED, reason=reason)
                )
                failed = TaskFailedError(record.task_id, reason, result)
                self._deliver(entry, task_id=record.task_id, error=failed, replay=True)
            elif state == "submitted" and record.task_id is not None:
                entry.task_id = record.task_id
                self._waiting[entry.index] = entry
            elif state in ("submitting", "uncertain") and self._resubmit_uncertain:
                heapq.heappush(self._queue, (entry.index, entry))
            else:
                message = (
                    f"request #{entry.index}: an earlier run may have created its task "
                    f"(journal state {state!r}: {record.error or 'interrupted during the POST'}); "
                    "not resubmitted (pass resubmit_uncertain=True to pay again)"
                )
                if state == "submitting":
                    journal.mark_uncertain(entry.index, message)
                uncertain = SubmissionUncertainError(
                    message, request=entry.request, extra=self._extra
                )
                self._deliver(entry, error=uncertain, replay=True)

    def _entry(self, index: int, request: Any) -> _Entry | None:
        """A new entry, or None after handing out an InvalidRequestError item."""
        from ._client import check_submission

        try:
            check_submission(request, self._extra)
        except InvalidRequestError as exc:
            self._ready.append(BatchItem(index=index, request=request, error=exc))
            self._notify()
            return None
        return _Entry(index, request, self._timeout)

    def _take(self) -> _Entry | None:
        """The next request to submit: interrupted ones first, then the input."""
        if self._queue:
            return heapq.heappop(self._queue)[1]
        while self._source is not None and self._failure is None:
            try:
                index, request = next(self._source)
            except StopIteration:
                self._source = None
                return None
            except BaseException:
                self._source = None
                raise
            entry = self._entry(index, request)
            if entry is not None:
                return entry
        return None

    async def _engine(self, *, stop_on_item: bool) -> None:
        """Submit and wait until every item is ready, or until cancelled.

        With ``stop_on_item`` the engine cancels itself once an item is ready.
        """
        self._prepare()
        if self._closed or (stop_on_item and self._ready):
            return
        self._stop_on_item = stop_on_item
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for entry in sorted(self._waiting.values(), key=lambda e: e.index):
                    tg.start_soon(self._wait, entry)
                for _ in range(self._workers):
                    tg.start_soon(self._worker)
        finally:
            self._tg = None

    def _notify(self) -> None:
        self._wakeup.set()
        if self._stop_on_item and self._tg is not None:
            self._tg.cancel_scope.cancel()

    def _deliver(
        self,
        entry: _Entry,
        *,
        task_id: str | None = None,
        result: TaskResult | None = None,
        error: BaseException | None = None,
        replay: bool = False,
    ) -> None:
        self._waiting.pop(entry.index, None)
        item = BatchItem(
            index=entry.index,
            request=entry.request,
            task_id=task_id if task_id is not None else entry.task_id,
            result=result,
            error=error,
            from_journal=replay,
        )
        self._ready.append(item)
        self._notify()

    async def _worker(self) -> None:
        try:
            while self._failure is None:
                entry = self._take()
                if entry is None:
                    return
                self._posting.add(entry.index)
                try:
                    await self._submit(entry)
                finally:
                    self._posting.discard(entry.index)
        except Exception as exc:  # the input iterator, the journal, or a bug: fatal
            self._fail(exc)

    async def _submit(self, entry: _Entry) -> None:
        """POST ``entry`` (pacing, retrying what certainly created no task)."""
        retry = self._client._transport.retry
        posted = False
        try:
            while True:
                admission = await self._limiter.acquire(entry.request.image_num)
                # No checkpoint between admission and POST: acquire() raises if the
                # run was cancelled, and once the POST starts it is seen through,
                # its task_id recorded and journaled.
                with anyio.CancelScope(shield=True):
                    posted = True
                    outcome = await self._post(entry)
                    if isinstance(outcome, str):
                        await self._on_submitted(entry, outcome)
                if isinstance(outcome, str):
                    return
                if isinstance(outcome, RateLimitError):
                    self._limiter.on_rate_limited(outcome.retry_after, admission)
                    entry.rate_limited += 1
                    if entry.rate_limited < RATE_LIMIT_ATTEMPTS:
                        posted = False
                        await self._journal_no_task(entry, outcome)
                        continue
                elif _never_created(outcome) and entry.retries < retry.max_retries:
                    self._limiter.refund(admission)
                    retry_after = (
                        outcome.retry_after if isinstance(outcome, APIStatusError) else None
                    )
                    delay = retry.delay(entry.retries, retry_after)
                    entry.retries += 1
                    posted = False
                    await self._journal_no_task(entry, outcome)
                    await anyio.sleep(delay)
                    continue
                await self._on_refused(entry, outcome, admission)
                return
        except BaseException:
            if not posted:  # cancelled before its POST: submit it in a later run
                heapq.heappush(self._queue, (entry.index, entry))
            raise

    async def _record(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Call ``journal.<method>`` in a worker thread (each write is a commit + fsync).

        Shielded: the write always happens, even in a cancelled run (it is short),
        and a cancellation lands after it.
        """
        journal = self._journal
        if journal is not None:
            write = functools.partial(getattr(journal, method), *args, **kwargs)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(write)

    async def _post(self, entry: _Entry) -> str | Exception:
        """One POST (runs shielded); the task_id, or the error it ended with."""
        await self._record("mark_submitting", entry.index)  # durable before the POST
        entry.submitted_at = anyio.current_time()
        try:
            return await self._client._submit(
                entry.request, self._extra, retry_429=False, max_retries=0
            )
        except Exception as exc:
            return exc

    async def _journal_no_task(self, entry: _Entry, exc: Exception) -> None:
        """Before a retry: Novita certainly created no task, so a crash while waiting to
        resend must not leave the prompt ``submitting`` (uncertain) in the journal."""
        await self._record("mark_rejected", entry.index, f"{exc} (retrying)")

    async def _on_submitted(self, entry: _Entry, task_id: str) -> None:
        entry.task_id = task_id
        self._waiting[entry.index] = entry
        self._submitted += 1
        await self._record("mark_submitted", entry.index, task_id)
        assert self._tg is not None
        self._tg.start_soon(self._wait, entry)

    async def _on_refused(self, entry: _Entry, exc: Exception, admission: Admission) -> None:
        if isinstance(exc, SubmissionUncertainError):
            await self._record("mark_uncertain", entry.index, str(exc))
        else:
            if _never_created(exc) or isinstance(exc, (RateLimitError, InvalidRequestError)):
                self._limiter.refund(admission)
            await self._record("mark_rejected", entry.index, str(exc))
        self._deliver(entry, error=exc)

    async def _wait(self, entry: _Entry) -> None:
        try:
            await self._wait_inner(entry)
        except Exception as exc:  # the journal or a bug: fatal
            self._fail(exc)

    async def _wait_inner(self, entry: _Entry) -> None:
        task_id = entry.task_id
        assert task_id is not None
        budget = entry.budget
        if budget is not None and budget <= 0:
            self._deliver(entry, error=TaskTimeoutError(task_id, None, self._timeout or 0.0))
            return
        hint = PollHint(submitted_at=entry.submitted_at, cost=entry.request.cost)
        started = anyio.current_time()
        try:
            result = await self._client.scheduler.wait(task_id, timeout=budget, hint=hint)
        except TaskFailedError as exc:
            error = exc.reason or str(exc)
            await self._record("mark_finished", entry.index, result=exc.result, error=error)
            self._deliver(entry, error=exc)
        except TaskTimeoutError as exc:  # journal keeps "submitted": a rerun waits again
            self._deliver(
                entry, error=TaskTimeoutError(task_id, exc.last_result, self._timeout or 0.0)
            )
        except NovitaError as exc:
            self._deliver(entry, error=exc)
        except Exception as exc:  # one request's unexpected failure is still an item
            self._deliver(entry, error=exc)
        except BaseException:  # cancelled: a later run waits for what is left
            if budget is not None:
                entry.budget = budget - (anyio.current_time() - started)
            raise
        else:
            await self._record("mark_finished", entry.index, result=result, error=None)
            self._deliver(entry, result=result)
