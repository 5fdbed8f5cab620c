"""A fan-out's work: :class:`Engine` runs a :class:`~._batch.BatchRun`'s submissions and waits.

It runs in the client's task group: ``workers`` tasks take the requests (replayed
ones from the journal first) and submit them through the client's Submitter
(``_submit``); each submitted task waits on the client's poll scheduler in a task of
its own; every finished request becomes a :class:`BatchItem` sent into a memory
object stream that the run's iterator reads (fan-in). One :class:`BatchState` says
where it is. It never refers to the run's handle, so dropping the handle can stop it.

Money rules. A POST that is on the wire when the run stops is shielded (for at
most the transport's timeouts) so its task id is kept; no POST starts after
the stop. Tasks that were submitted but whose item was never handed out keep
running and are billed: they are logged as a warning and listed in
:attr:`~._batch.BatchRun.pending_task_ids`; with a journal, a rerun picks them up
without paying again.

An authentication or permission error, or an unreachable API before any task
exists, ends the submissions: every prompt not sent yet becomes an item with
that error, without a request.

Pacing and retries belong to the client's Submitter (``_submit``): the run's
limiter (``images_per_minute``) and the client's (``rate_limiter=``) both
admit every POST. ``timeout`` bounds each task's wait for its result, from its
submission.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel
import attrs

from ._errors import (
    APIConnectionError,
    AuthenticationError,
    InvalidRequestError,
    NovitaError,
    PermissionDeniedError,
)
from ._journal import (
    AsyncJournal,
    Journal,
    JournalError,
    as_async_journal,
    replay,
    request_key,
)
from ._models import TASK_REQUESTS, Extra, Txt2ImgRequest
from ._models import check_submission as _check
from ._policy import PollHint
from ._results import Task, TaskResult, TaskStatus
from ._submit import JournalStepFailed
from ._task_errors import SubmissionUncertainError, TaskFailedError, TaskTimeoutError

if TYPE_CHECKING:
    from ._poller import PollScheduler
    from ._submit import RateLimiter, Submitter

__all__ = ["DEFAULT_CONCURRENT_SUBMISSIONS", "BatchItem", "BatchState", "Engine"]

logger = logging.getLogger("novita_async")

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


class BatchState(enum.Enum):
    """Where a run is: ``NEW`` (nothing sent yet), ``RUNNING``, ``STOPPING``
    (asked to stop: no new POST), ``DONE`` (every item handed to the stream),
    ``STOPPED``, ``FAILED`` (the input, the journal or the client failed)."""

    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"


class _Entry:
    """One request on its way."""

    __slots__ = ("index", "request", "submitted_at", "task_id")

    def __init__(self, index: int, request: Txt2ImgRequest) -> None:
        self.index = index
        self.request = request
        self.task_id: str | None = None
        self.submitted_at: float | None = None


class Engine:
    """A run's work, in the client's task group. It never refers to the :class:`BatchRun`
    handle, so dropping the handle can stop it."""

    def __init__(
        self,
        *,
        submitter: Submitter,
        scheduler: PollScheduler,
        requests: Iterable[Any],
        extra: Extra | None,
        timeout: float | None,
        workers: int,
        limiter: RateLimiter | None,
        journal: str | os.PathLike[str] | Journal | AsyncJournal | None,
        resubmit_uncertain: bool,
    ) -> None:
        self.submitter = submitter
        self.scheduler = scheduler
        self.extra = extra
        self.timeout = timeout
        self.workers = workers
        self.limiter = limiter
        self.journal = as_async_journal(journal)[0] if journal is not None else None
        self.resubmit_uncertain = resubmit_uncertain
        self.source: Iterator[tuple[int, Any]] | None = enumerate(requests)
        self.queue: list[_Entry] = []  # replayed entries to send first
        self.waiting: dict[int, _Entry] = {}  # submitted, outcome unknown
        #: Taken by a worker, not submitted nor an item yet: the scope a refusal cancels.
        self.sending: dict[int, anyio.CancelScope] = {}
        self.undelivered: dict[int, str] = {}  # in the stream, with a task id
        self.send, self.receive = anyio.create_memory_object_stream[BatchItem](math.inf)
        self.state = BatchState.NEW
        self.failure: BaseException | None = None
        self.scope: anyio.CancelScope | None = None
        self.done = anyio.Event()
        self.submitted = 0
        self.refusal: NovitaError | None = None  # the key or the API host is unusable
        self.reported = False  # the pending tasks were logged (at the stop, or when freed)
        self.thread = threading.get_ident()

    # ----------------------------------------------------------------- control

    def stop(self) -> None:
        """No new POST from now on (synchronous; safe from a finalizer on this thread)."""
        if self.state is BatchState.NEW or (
            self.state is BatchState.RUNNING and self.scope is None
        ):  # never ran: nothing to wait for
            self.state = BatchState.STOPPED
            self.send.close()
            self.done.set()
        elif self.state is BatchState.RUNNING:
            self.state = BatchState.STOPPING
            assert self.scope is not None
            self.scope.cancel()

    def pending_task_ids(self) -> list[str]:
        found = [(e.index, e.task_id) for e in self.waiting.values() if e.task_id is not None]
        found += list(self.undelivered.items())
        return [task_id for _, task_id in sorted(found)]

    def report_abandoned(self) -> None:
        """Log the paid tasks whose item was not handed out, once: at the stop, or (a run
        that ended otherwise) when its handle is freed; a stopped run is freed later too."""
        if self.reported:
            return
        self.reported = True
        ids = self.pending_task_ids()
        if ids:
            shown = ", ".join(ids[:_SHOWN_IDS]) + (", …" if len(ids) > _SHOWN_IDS else "")
            logger.warning(
                "txt2img_many stopped with %d submitted task(s) whose result was not "
                "delivered; Novita runs and bills them anyway (see "
                "BatchRun.pending_task_ids, or rerun with the same journal): %s",
                len(ids),
                shown,
            )

    # ----------------------------------------------------------------- the task

    def start(self, host: Callable[[Callable[[], Coroutine[Any, Any, None]]], None]) -> None:
        """Schedule :meth:`run` in the client's task group (once)."""
        if self.state is BatchState.NEW:
            host(self.run)
            self.state = BatchState.RUNNING

    async def run(self) -> None:
        """Submit and wait until every item is in the stream, or until stopped."""
        if self.state is not BatchState.RUNNING or self.scope is not None:
            return  # stopped before it ran
        try:
            with anyio.CancelScope() as self.scope:
                await self._run()
        except Exception as exc:  # opening or replaying the journal
            self._fail(exc)
        finally:
            if self.failure is not None:
                self.state = BatchState.FAILED
            elif self.state is BatchState.STOPPING:  # type: ignore[comparison-overlap]
                self.state = BatchState.STOPPED
                self.report_abandoned()
            elif self.source is not None or self.queue or self.waiting or self.sending:
                self.state = BatchState.FAILED  # cancelled from outside: the client closed
                self.failure = NovitaError("the AsyncNovita client closed during the batch")
            else:
                self.state = BatchState.DONE
            self.send.close()
            self.done.set()

    async def _run(self) -> None:
        journal = self.journal
        if journal is None:
            await self._work()
            return
        try:
            await journal.open()
            await self._replay(journal)
            keepalive = getattr(journal, "keepalive", None)
            # A leased journal renews its lease until the work is over, also after a stop:
            # a POST on the wire is waited for (shielded) and its task id journaled then.
            lease = anyio.CancelScope(shield=True)
            async with anyio.create_task_group() as outer:
                if keepalive is not None:
                    outer.start_soon(self._keepalive, keepalive, lease)
                try:
                    await self._work()
                finally:
                    lease.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await journal.aclose()

    async def _keepalive(
        self, keepalive: Callable[[], Awaitable[None]], scope: anyio.CancelScope
    ) -> None:
        with scope:
            try:
                await keepalive()
            except Exception as exc:  # the lease is lost: no write may follow
                self._fail(exc)

    async def _work(self) -> None:
        async with anyio.create_task_group() as tg:
            for entry in sorted(self.waiting.values(), key=lambda e: e.index):
                tg.start_soon(self._wait, entry)
            for _ in range(self.workers):
                tg.start_soon(self._worker, tg)

    async def _replay(self, journal: AsyncJournal) -> None:
        """With a journal: read every request and act on what an earlier run recorded."""
        assert self.source is not None
        pairs = list(self.source)
        self.source = None
        entries = [e for e in (self._entry(i, r) for i, r in pairs) if e is not None]
        keys = [(e.index, request_key(e.request, self.extra)) for e in entries]
        records = await journal.begin(keys)
        for entry in entries:
            record = records.get(entry.index)
            action = replay(record, resubmit_uncertain=self.resubmit_uncertain)
            if action == "send":
                self.queue.append(entry)
            elif action == "wait":
                assert record is not None
                entry.task_id = record.task_id
                self.waiting[entry.index] = entry
            elif action == "succeeded":
                assert record is not None
                self._deliver(entry, task_id=record.task_id, result=record.result, replay=True)
            elif action == "failed":
                assert record is not None
                assert record.task_id is not None
                reason = record.error or ""
                result = record.result or TaskResult(
                    task=Task(task_id=record.task_id, status=TaskStatus.FAILED, reason=reason)
                )
                error = TaskFailedError(record.task_id, reason, result)
                self._deliver(entry, task_id=record.task_id, error=error, replay=True)
            else:
                state = record.state if record is not None else "?"
                message = (
                    f"request #{entry.index}: an earlier run may have created its task "
                    f"(journal state {state!r}: "
                    f"{(record.error if record else None) or 'interrupted during the POST'}); "
                    "not resubmitted (pass resubmit_uncertain=True to pay again)"
                )
                if state == "submitting":
                    await journal.mark_uncertain(entry.index, message)
                uncertain = SubmissionUncertainError(
                    message, request=entry.request, extra=self.extra
                )
                self._deliver(entry, error=uncertain, replay=True)
        self.queue.reverse()  # popped from the end: lowest index first

    def _entry(self, index: int, request: Any) -> _Entry | None:
        """A new entry, or None after handing out an item for an invalid request."""
        if not isinstance(request, TASK_REQUESTS):
            raise TypeError(
                f"requests[{index}] must be a Txt2ImgRequest, got {type(request).__name__}"
            )
        try:
            _check(request, self.extra)
        except InvalidRequestError as exc:
            self._send(BatchItem(index=index, request=request, error=exc))
            return None
        return _Entry(index, request)

    async def _take(self) -> _Entry | None:
        """The next request to submit: replayed ones first, then the input (each invalid
        request an item, then a checkpoint: a long or endless run of them must not hold
        the event loop)."""
        if self.queue:
            return self.queue.pop()
        while self.source is not None:
            try:
                index, request = next(self.source)
            except StopIteration:
                self.source = None
                return None
            except BaseException:
                self.source = None
                raise
            entry = self._entry(index, request)
            if entry is not None:
                return entry
            await anyio.lowlevel.checkpoint()
        return None

    def _fail(self, exc: BaseException) -> None:
        """The input, the journal or a bug failed: stop; the reader raises ``exc``."""
        if self.failure is None:
            self.failure = exc
        if self.scope is not None:
            self.scope.cancel()

    async def _worker(self, tg: anyio.abc.TaskGroup) -> None:
        try:
            await self._submit_all(tg)
        except Exception as exc:
            self._fail(exc)

    async def _submit_all(self, tg: anyio.abc.TaskGroup) -> None:
        while (entry := await self._take()) is not None:
            if self.refusal is not None:  # every POST would meet the same answer
                self._deliver(entry, error=self.refusal)
                await anyio.lowlevel.checkpoint()  # a long (or endless) input: let others run
                continue
            entry.submitted_at = anyio.current_time()  # until the POST is sent
            # A refusal met by another worker calls this submission off unless its POST
            # is on the wire (shielded): it must not wait out its pacing, then be sent.
            scope = self.sending[entry.index] = anyio.CancelScope()
            try:
                with scope:
                    task_id, entry.submitted_at = await self.submitter.submit(
                        entry.request,
                        self.extra,
                        limiter=self.limiter,
                        journal=self.journal,
                        index=entry.index,
                    )
            except JournalStepFailed as exc:  # the run stops; a paid task stays pending
                if exc.task_id is not None:
                    entry.task_id = exc.task_id
                    self.waiting[entry.index] = entry
                    self.submitted += 1
                raise exc.cause from None
            except JournalError:  # writing a refusal failed: the run stops
                raise
            except NovitaError as exc:  # refused, uncertain, retries ran out: an item
                if isinstance(exc, (AuthenticationError, PermissionDeniedError)) or (
                    isinstance(exc, APIConnectionError) and not self.submitted
                ):
                    del self.sending[entry.index]
                    self._refuse(exc)
                self._deliver(entry, error=exc)
                continue
            if scope.cancelled_caught:  # called off by a refusal before it was sent
                assert self.refusal is not None
                self._deliver(entry, error=self.refusal)
                continue
            entry.task_id = task_id  # synchronously after the shielded POST: never lost
            del self.sending[entry.index]
            self.waiting[entry.index] = entry
            self.submitted += 1
            tg.start_soon(self._wait, entry)

    def _refuse(self, exc: NovitaError) -> None:
        """The key or the API host is unusable: no submission is sent from now on."""
        self.refusal = exc
        for scope in self.sending.values():
            scope.cancel()

    async def _wait(self, entry: _Entry) -> None:
        try:
            await self._wait_one(entry)
        except Exception as exc:  # the journal failed
            self._fail(exc)

    async def _wait_one(self, entry: _Entry) -> None:
        task_id = entry.task_id
        assert task_id is not None
        hint = PollHint(
            submitted_at=entry.submitted_at,
            cost=entry.request.cost,
            webhook=self.submitter.webhooked(self.extra),
        )
        journal = self.journal
        try:
            result = await self.scheduler.wait(task_id, timeout=self.timeout, hint=hint)
        except TaskFailedError as exc:
            if journal is not None:
                await journal.mark_finished(
                    entry.index, result=exc.result, error=exc.reason or str(exc)
                )
            self._deliver(entry, error=exc)
        except TaskTimeoutError as exc:  # the journal keeps "submitted": a rerun waits again
            self._deliver(entry, error=exc)
        except Exception as exc:  # one request's failure is still an item
            self._deliver(entry, error=exc)
        else:
            if journal is not None:
                await journal.mark_finished(entry.index, result=result, error=None)
            self._deliver(entry, result=result)

    def _deliver(
        self,
        entry: _Entry,
        *,
        task_id: str | None = None,
        result: TaskResult | None = None,
        error: BaseException | None = None,
        replay: bool = False,
    ) -> None:
        self.waiting.pop(entry.index, None)
        self.sending.pop(entry.index, None)
        task_id = task_id if task_id is not None else entry.task_id
        item = BatchItem(
            index=entry.index,
            request=entry.request,
            task_id=task_id,
            result=result,
            error=error,
            from_journal=replay,
        )
        if task_id is not None:
            self.undelivered[entry.index] = task_id
        self._send(item)

    def _send(self, item: BatchItem) -> None:
        # The handle may be freed (a bare loop was left): not a failure of the run, and a
        # task id stays pending, so the stop's warning reports it.
        with contextlib.suppress(anyio.BrokenResourceError):
            self.send.send_nowait(item)
