"""The client's one task group, where its background work runs.

``async with AsyncNovita() as client`` opens it and leaving the block closes
it: nothing outlives the client. Frameworks do not always enter and leave in
one task (pytest-asyncio may run a fixture's setup and teardown in different
tasks; aiohttp's ``cleanup_ctx`` too), and an anyio task group must be left in
the task that entered it. So on asyncio the group lives in a host task of its
own, created on enter and awaited on close; on trio (where every framework
enters and leaves in one task) the group is entered in the caller's task.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc

__all__ = ["HostState", "TaskHost"]


class HostState(enum.Enum):
    """``UNOPENED`` -> ``OPEN`` -> ``CLOSED`` (like httpx's ``ClientState``)."""

    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class TaskHost:
    """Runs ``services`` (for the host's lifetime; each takes ``task_status`` and reports
    when it is ready) and anything given to :meth:`start_soon`."""

    def __init__(self, *services: Callable[..., Coroutine[Any, Any, Any]]) -> None:
        self._services = services
        self.state = HostState.UNOPENED
        self._tg: anyio.abc.TaskGroup | None = None
        self._cm: anyio.abc.TaskGroup | None = None  # trio: the group entered in our task
        self._task: Any = None  # asyncio: the host task
        self._stop: anyio.Event | None = None
        self._owner: int | None = None  # trio: the task that entered the group

    @property
    def open(self) -> bool:
        return self.state is HostState.OPEN and self._tg is not None

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self._tg is None:
            raise RuntimeError(
                "this AsyncNovita client is closed"
                if self.state is HostState.CLOSED
                else "the client's task group is not open"
            )
        self._tg.start_soon(func, *args)

    async def start(self) -> None:
        if self.state is not HostState.UNOPENED:
            raise RuntimeError(
                "an AsyncNovita client can be entered once"
                if self.state is HostState.OPEN
                else "this AsyncNovita client is closed"
            )
        self.state = HostState.OPEN
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # trio
            loop = None
        if loop is not None:
            ready = anyio.Event()
            self._stop = anyio.Event()
            self._task = loop.create_task(self._host(ready))
            try:
                await ready.wait()
            except BaseException:  # cancelled while entering: the host task must not outlive it
                await self.aclose()
                raise
            if self._tg is None:  # the host failed before it was ready
                await self._task
        else:
            group = anyio.create_task_group()
            self._owner = anyio.get_current_task().id
            self._tg = await group.__aenter__()
            self._cm = group
            try:
                for service in self._services:
                    await self._tg.start(service)
            except BaseException:  # (cancelled) while entering: leave the group, in this task
                await self.aclose()
                raise

    async def _host(self, ready: anyio.Event) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for service in self._services:
                    await tg.start(service)
                ready.set()
                assert self._stop is not None
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            ready.set()

    async def aclose(self) -> None:
        """Cancel everything in the group and wait for it (idempotent)."""
        if self.state is not HostState.OPEN:
            self.state = HostState.CLOSED
            return
        if self._cm is not None and anyio.get_current_task().id != self._owner:
            # leaving a nursery from another task corrupts trio's cancel scope stack
            raise RuntimeError(
                "on trio an AsyncNovita client must be closed by the task that entered it, "
                "at the same nesting (as a nursery is): use `async with AsyncNovita() as client`"
            )
        self.state = HostState.CLOSED
        if self._task is not None:
            assert self._stop is not None
            self._stop.set()
            with anyio.CancelScope(shield=True):
                await self._task  # re-raises what crashed the group, if anything
        elif self._cm is not None:
            group, self._cm = self._cm, None
            assert self._tg is not None
            self._tg.cancel_scope.cancel()
            self._tg = None
            await group.__aexit__(None, None, None)
