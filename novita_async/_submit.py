"""The Submitter: everything about one paid POST.

Every task-creating request of a client (``submit_txt2img``, ``txt2img`` and
each prompt of a batch) goes through :meth:`Submitter.submit`:

1. validation (:func:`~novita_async._models.check_submission`), before any I/O;
2. pacing: the request's quota ``weight`` is admitted by the client-wide rate
   limiter (``AsyncNovita(rate_limiter=...)``) and by the batch's one, if any;
3. the transport's one request loop and its one retry decision: *created*
   (a task id: returned), *certainly not created* (never sent, 429, 503:
   refunded, then paced and sent again), *uncertain* (the body may have
   reached Novita: :class:`~novita_async.SubmissionUncertainError`, never
   resent), or refused (a 4xx: raised as is);
4. the journal, when a batch has one: ``submitting`` is durable before the
   bytes go, the task id right after the answer, inside the same shield.

The Submitter is endpoint-agnostic: a request model names its ``endpoint``
(a v3 async path), its quota ``weight`` and its body (via the converter).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import anyio
import attrs

from ._convert import request_body, submit_task_id
from ._errors import (
    APIConnectionError,
    APIStatusError,
    InvalidRequestError,
    NovitaError,
    RateLimitError,
)
from ._models import Extra, Txt2ImgRequest, Webhook, check_submission
from ._retry import Decision
from ._task_errors import SubmissionUncertainError
from ._transport import Transport, Uncertain

if TYPE_CHECKING:
    from ._journal import AsyncJournal

__all__ = ["JournalStepFailed", "RateLimiter", "Submitted", "Submitter"]

logger = logging.getLogger("novita_async")


class RateLimiter(Protocol):
    """The interface of :class:`~novita_async.WeightedRateLimiter` the engine uses."""

    async def acquire(self, weight: float = 1) -> Any: ...

    def refund(self, admission: Any) -> None: ...

    def on_rate_limited(self, retry_after: float | None = None, admission: Any = None) -> None: ...


class JournalStepFailed(Exception):
    """The journal failed around a POST (so the run must stop); ``task_id``: the task
    the POST created, if it was answered. Not a :class:`NovitaError`, so the request
    loop never takes it for an answer of the API."""

    def __init__(self, cause: Exception, *, task_id: str | None) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.task_id = task_id


class Submitted(NamedTuple):
    """A created task: its id, and ``anyio.current_time()`` as its POST was sent (after
    pacing and the wait for a connection: when the task's clock starts)."""

    task_id: str
    sent_at: float


class _Attempts:
    """One submission's hooks into the transport's request loop."""

    __slots__ = ("admissions", "index", "journal", "limiters", "sent_at", "weight")

    def __init__(
        self,
        weight: int,
        limiters: tuple[RateLimiter, ...],
        journal: AsyncJournal | None,
        index: int,
    ) -> None:
        self.weight = weight
        self.limiters = limiters
        self.journal = journal
        self.index = index
        self.admissions: list[tuple[RateLimiter, Any]] = []
        self.sent_at = 0.0

    async def admit(self) -> None:
        self.admissions = []
        try:
            for limiter in self.limiters:
                self.admissions.append((limiter, await limiter.acquire(self.weight)))
        except BaseException:  # cancelled while waiting: give back what was taken
            self.withdraw()
            raise

    async def sending(self) -> None:
        self.sent_at = anyio.current_time()
        if self.journal is not None:
            try:
                await self.journal.mark_submitting(self.index)
            except Exception as exc:  # not an answer of the API: nothing was sent
                self.withdraw()  # so no quota was used
                raise JournalStepFailed(exc, task_id=None) from exc

    async def accepted(self, task_id: str) -> None:
        if self.journal is not None:
            try:
                await self.journal.mark_submitted(self.index, task_id)
            except Exception as exc:  # the task exists (and is billed): keep its id
                raise JournalStepFailed(exc, task_id=task_id) from exc

    async def refused(self, error: NovitaError, decision: Decision) -> float | None:
        """Account for a failed attempt; a delay that replaces the backoff, or None."""
        paced = bool(self.admissions)
        if isinstance(error, RateLimitError):
            for limiter, admission in self.admissions:
                limiter.on_rate_limited(error.retry_after, admission)
        elif decision != "uncertain" and _never_created(error):
            self.withdraw()
        journal = self.journal
        if journal is not None:
            if decision == "uncertain":
                await journal.mark_uncertain(self.index, str(error))
            elif decision == "retry":  # certainly no task: a crash now must not look uncertain
                await journal.mark_rejected(self.index, f"{error} (retrying)")
            else:
                await journal.mark_rejected(self.index, str(error))
        if isinstance(error, RateLimitError) and paced:
            return 0.0  # the limiters pause for Retry-After themselves
        return None

    def withdraw(self) -> None:
        for limiter, admission in self.admissions:
            limiter.refund(admission)
        self.admissions = []


def _never_created(error: NovitaError) -> bool:
    """Of the errors that are not uncertain: those that cost no quota (refunded)."""
    if isinstance(error, APIStatusError):
        return error.status_code == 503
    return isinstance(error, APIConnectionError)


class Submitter:
    """Validates, paces and sends task-creating requests; see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        *,
        rate_limiter: RateLimiter | None = None,
        webhook_url: str | None = None,
    ) -> None:
        self._transport = transport
        self.rate_limiter = rate_limiter
        self._webhook = Webhook(url=webhook_url) if webhook_url is not None else None

    def __repr__(self) -> str:
        return f"<Submitter rate_limiter={self.rate_limiter!r}>"

    def webhooked(self, extra: Extra | None) -> bool:
        """Whether a submission with ``extra`` carries the client's own webhook."""
        return self._webhook is not None and (extra is None or extra.webhook is None)

    async def submit(
        self,
        request: Txt2ImgRequest,
        extra: Extra | None = None,
        *,
        limiter: RateLimiter | None = None,
        journal: AsyncJournal | None = None,
        index: int = -1,
    ) -> Submitted:
        """Create one task; see the module docstring for the rules.

        ``limiter`` paces this submission on top of the client's limiter;
        ``journal`` and ``index`` record it (a batch's prompt).
        """
        check_submission(request, extra)
        if self.webhooked(extra):  # the caller's own Extra.webhook wins
            extra = attrs.evolve(extra if extra is not None else Extra(), webhook=self._webhook)
        body = request_body(request, extra)
        if limiter is self.rate_limiter:  # one limiter given twice paces once
            limiter = None
        limiters = tuple(x for x in (limiter, self.rate_limiter) if x is not None)
        attempts = _Attempts(request.weight, limiters, journal, index)
        try:
            task_id: str = await self._transport.request(
                "POST", request.endpoint, json_body=body, parse=submit_task_id, attempts=attempts
            )
        except Uncertain as exc:
            cause = exc.cause
        except InvalidRequestError:
            attempts.withdraw()
            raise
        else:
            return Submitted(task_id, attempts.sent_at)
        raise SubmissionUncertainError(
            f"{request.endpoint} submission outcome unknown ({cause}); a task may have been "
            "created and billed, so it was not retried",
            request=request,
            extra=extra,
            cause=cause,
        ) from cause
