"""Concurrent fan-out: :meth:`AsyncNovita.txt2img_many` returns a :class:`BatchRun`.

A run yields one :class:`BatchItem` per request, as each finishes. Its work
runs in the client's task group (fan-in: workers send finished items into a
memory object stream that the iterator reads), so both forms progress at full
concurrency while the loop body runs, with O(1) work per delivered item:

* ``async for item in client.txt2img_many(reqs): ...`` — the engine starts at
  the first item asked for. When no new POST starts after you leave the loop:
  on cancellation of the consuming task while it waits for an item, at once
  (and, as ``aclose``, the cancelled call waits for POSTs on the wire); on
  ``break`` or an exception in the body, the moment the run object is freed,
  which CPython does as the loop is left when the run is not kept in a
  variable. A run you keep in a variable stops when that goes away, or at
  ``await run.aclose()``, which always stops it.
* ``async with client.txt2img_many(reqs) as run: async for item in run: ...``
  — the run is bounded by the block: leaving it stops the run and waits until
  a POST on the wire has its answer (so :attr:`BatchRun.pending_task_ids` is
  complete).

What the run's work does (money rules, pacing, a refused key): :mod:`._engine`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream

from ._engine import BatchItem, BatchState, Engine
from ._models import TASK_REQUESTS
from ._ratelimit import WeightedRateLimiter

if TYPE_CHECKING:
    from ._submit import RateLimiter

__all__ = ["BatchRun", "check_requests", "make_limiter"]

#: Finished items handed out in a row from the buffer before the iterator lets the
#: event loop run (each ``__anext__`` is still a cancellation point).
_BURST = 32


def check_requests(requests: Iterable[Any]) -> None:
    """Wrong types are programming errors: raise at the call for a sequence."""
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Iterable):
        raise TypeError(f"requests must be an iterable of Txt2ImgRequest, got {requests!r:.60}")
    if isinstance(requests, Sequence):
        for index, request in enumerate(requests):
            if not isinstance(request, TASK_REQUESTS):
                raise TypeError(
                    f"requests[{index}] must be a Txt2ImgRequest, got {type(request).__name__}"
                )


def _dropped(engine: Engine) -> None:
    """The handle was freed (a bare loop was left): stop at once, report what is left."""
    if threading.get_ident() != engine.thread:
        return  # freed by a foreign thread's GC: cancelling from there is unsafe
    if engine.done.is_set():
        engine.report_abandoned()
    else:
        engine.stop()
    engine.receive.close()


class BatchRun:
    """A fan-out of txt2img requests; see the module docstring.

    Iterate it (``async for``) for :class:`BatchItem` s in completion order,
    bare or inside ``async with``. Created by :meth:`AsyncNovita.txt2img_many`.
    """

    def __init__(
        self,
        engine: Engine,
        start: Callable[[Callable[[], Coroutine[Any, Any, None]]], None],
    ) -> None:
        self._engine = engine
        self._start = start  # schedules engine.run() in the client's task group
        self._delivered = 0
        self._burst = 0  # items handed out in a row without yielding to the event loop
        finalizer = weakref.finalize(self, _dropped, engine)
        finalizer.atexit = False

    def __repr__(self) -> str:
        engine = self._engine
        return (
            f"<BatchRun {engine.state.value} submitted={engine.submitted} "
            f"delivered={self._delivered} pending={len(engine.pending_task_ids())}>"
        )

    # ----------------------------------------------------------------- inspection

    @property
    def pending_task_ids(self) -> tuple[str, ...]:
        """Tasks created by this run whose item was not handed out (yet), by index.

        After an early exit these keep running on Novita and are billed;
        ``await client.wait(task_id)`` still gets their results.
        """
        return tuple(self._engine.pending_task_ids())

    @property
    def state(self) -> BatchState:
        return self._engine.state

    @property
    def submitted(self) -> int:
        """Tasks this run created."""
        return self._engine.submitted

    @property
    def delivered(self) -> int:
        """Items handed out so far."""
        return self._delivered

    @property
    def limiter(self) -> RateLimiter | None:
        """The run's own rate limiter (the client's ``rate_limiter`` applies as well)."""
        return self._engine.limiter

    @property
    def max_concurrent_submissions(self) -> int:
        return self._engine.workers

    @property
    def closed(self) -> bool:
        return self._engine.state not in (BatchState.NEW, BatchState.RUNNING)

    # ----------------------------------------------------------------- control

    def _ensure_started(self) -> None:
        self._engine.start(self._start)

    async def __aenter__(self) -> BatchRun:
        if self._engine.state is not BatchState.NEW:
            raise RuntimeError("a BatchRun can be entered once, before it is iterated")
        self._ensure_started()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop: no request is sent any more; waits until a POST on the wire has its
        answer, so :attr:`pending_task_ids` is complete. Idempotent."""
        engine = self._engine
        started = engine.state is not BatchState.NEW
        engine.stop()
        if started:
            with anyio.CancelScope(shield=True):
                await engine.done.wait()
        engine.receive.close()

    # ----------------------------------------------------------------- iteration

    def __aiter__(self) -> BatchRun:
        return self

    async def __anext__(self) -> BatchItem:
        self._ensure_started()
        engine = self._engine
        try:
            item = await self._receive(engine.receive)
        except anyio.get_cancelled_exc_class():  # the consuming task is cancelled: stop
            await self.aclose()
            raise
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            engine.receive.close()
            if engine.failure is not None:
                raise engine.failure from None
            raise StopAsyncIteration from None
        engine.undelivered.pop(item.index, None)
        self._delivered += 1
        return item

    async def _receive(self, receive: MemoryObjectReceiveStream[BatchItem]) -> BatchItem:
        """The next item. One already finished is handed out at once (after a
        cancellation check), up to ``_BURST`` in a row: ``receive()`` yields to the
        event loop first, so a busy loop drained a burst of N items in N turns of it
        (100 items waited 0.5 s in the webhooks benchmark)."""
        if self._burst < _BURST:
            await anyio.lowlevel.checkpoint_if_cancelled()
            try:
                item = receive.receive_nowait()
            except anyio.WouldBlock:
                pass
            else:
                self._burst += 1
                return item
        self._burst = 0
        return await receive.receive()


def make_limiter(
    images_per_minute: float | WeightedRateLimiter | RateLimiter | None,
    client_limiter: RateLimiter | None,
) -> RateLimiter | None:
    """The run's own limiter: the one given, a new one for a number, else (no client
    limiter either) an unpaced one that adapts at Novita's first 429."""
    if images_per_minute is None:
        return None if client_limiter is not None else WeightedRateLimiter(None)
    if isinstance(images_per_minute, (int, float)):
        return WeightedRateLimiter(images_per_minute)
    return images_per_minute
