"""The batch journal in Redis: a batch killed on machine A is finished on machine B.

Same contract, states and errors as the sqlite :class:`~novita_async.Journal` (see
its module for the state machine): one record per prompt ``index``, written before
each step that costs money and right after each answer. Records live in one hash,
``<name>:records`` (field = index, value = JSON), and every write is one Lua script
that first checks this run's lease, so a writer that lost its lease cannot write.

One live run per name: :meth:`RedisJournal.open` takes the lease
``<name>:lease`` (``SET NX PX``) or raises :class:`~novita_async.JournalError`; the
run keeps it with :meth:`RedisJournal.keepalive` (renewed every ``lease / 3`` s,
only while the token is still ours) and gives it back in :meth:`RedisJournal.aclose`.
A run that dies (kill -9, lost machine) holds the name until its lease expires;
then another run may take over, and the old one, if it was only stalled, gets
``JournalError`` on its next write instead of racing the new one. (Names without
a ``{hash tag}`` are wrapped in one, so both keys share a Redis Cluster slot.)

Redis down or restarting: every write raises :class:`~novita_async.JournalError`
at once (nothing is retried behind the engine's back: a POST is sent only after
its ``submitting`` record is acknowledged), ``keepalive`` rides out outages shorter
than the lease. Durability is Redis's: an acknowledged write survives a Redis crash
only as far as its persistence says (``appendonly yes`` with ``appendfsync always``
keeps every write, ``everysec`` may lose the last second; no persistence loses the
journal, and a rerun then pays again). A server that lost the records answers
writes with ``JournalError`` (the lease and the records are gone), never silently
starting over inside a run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
from collections.abc import Sequence
from types import TracebackType
from typing import Any, NoReturn

import anyio

from .._journal import (
    _FROM,
    JournalError,
    JournalMismatchError,
    JournalRecord,
    JournalState,
    _dump_result,
)
from .._journal import _record as _journal_record
from .._results import TaskResult
from ._common import UNAVAILABLE, RedisConnection, RedisLike, require_asyncio, tagged, text
from ._journal_lua import BEGIN_LUA, MARK_LUA, RELEASE_LUA, RENEW_LUA

__all__ = ["RedisJournal"]

logger = logging.getLogger("novita_async.redis")


class RedisJournal:
    """The journal of one batch, named ``name``, in Redis (asyncio only).

    ``url_or_client``: a ``redis://`` URL (owned: closed by :meth:`aclose`) or a
    ``redis.asyncio.Redis``. ``lease``: seconds another run must wait after this
    one stops renewing (kill -9) before it may take over.
    """

    def __init__(self, url_or_client: RedisLike, name: str, *, lease: float = 30.0) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a non-empty str")
        if not (lease > 0 and math.isfinite(lease)):
            raise ValueError(f"lease must be a positive number of seconds, got {lease!r}")
        self._redis = RedisConnection(url_or_client)
        self.name = name
        self.lease = lease
        self._keys = [f"{tagged(name)}:lease", f"{tagged(name)}:records"]
        client = self._redis.client
        self._begin = client.register_script(BEGIN_LUA)
        self._mark = client.register_script(MARK_LUA)
        self._renew = client.register_script(RENEW_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._token: str | None = None

    def __repr__(self) -> str:
        state = "open" if self._token is not None else "closed"
        return f"<RedisJournal {self.name!r} on {self._redis.describe()} {state}>"

    async def __aenter__(self) -> RedisJournal:
        try:
            await self.open()
        except BaseException:
            await self._redis.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ the lease

    async def open(self) -> None:
        """Take the lease, or raise :class:`JournalError` if another live run holds it."""
        require_asyncio("RedisJournal")
        if self._token is not None:
            raise JournalError(
                f"journal {self.name!r} is already open (txt2img_many(journal=...) opens "
                "and closes the journal it is given: pass it unopened)"
            )
        token = secrets.token_hex(16)
        client = self._redis.client
        try:
            taken = await self._call(client.set, self._keys[0], token, nx=True, px=self._lease_ms)
        except JournalError:
            raise
        except BaseException:
            # Cancelled while the SET was on its way: Redis may have taken the lease for
            # this token all the same; give it back, or the name stays refused to every run
            # (this batch's rerun too) until the lease expires.
            shield, bound = anyio.CancelScope(shield=True), anyio.move_on_after(5)
            with shield, bound, contextlib.suppress(*UNAVAILABLE):
                await self._release(keys=self._keys[:1], args=[token])
            raise
        if not taken:
            # A SET sent again (its first answer lost) finds the lease its first try took.
            taken = await self._call(client.get, self._keys[0]) in (token, token.encode())
        if not taken:
            raise JournalError(
                f"journal {self.name!r} is in use by another run (lease {self._keys[0]} is "
                f"held; it expires {self.lease:g} s after that run stops renewing it); two "
                "writers could submit the same prompt twice"
            )
        self._token = token

    async def keepalive(self) -> None:
        """Renew the lease every ``lease / 3`` s, forever; run it in a task group.

        Raises :class:`JournalError` when the lease is lost (it expired, or Redis
        lost it) or Redis stays unreachable until the lease would expire. Cancel
        it before :meth:`aclose`.
        """
        require_asyncio("RedisJournal")
        token = self._require_token()
        last = anyio.current_time()
        while True:
            await anyio.sleep(self.lease / 3)
            try:
                renewed = await self._renew(keys=self._keys[:1], args=[token, self._lease_ms])
            except UNAVAILABLE as exc:
                if anyio.current_time() - last > self.lease:
                    self._unavailable(exc)
                logger.warning("journal %r: lease not renewed (%s), retrying", self.name, exc)
                continue
            if not int(renewed):
                self._lost()
            last = anyio.current_time()

    async def aclose(self) -> None:
        """Release the lease if still ours and close the client if the journal owns it."""
        token, self._token = self._token, None
        try:
            if token is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await self._release(keys=self._keys[:1], args=[token])
        except UNAVAILABLE as exc:
            logger.warning("journal %r: lease not released (%s); it expires", self.name, exc)
        finally:
            await self._redis.aclose()

    @property
    def closed(self) -> bool:
        return self._token is None

    # ------------------------------------------------------------------ batch engine API

    async def begin(self, entries: Sequence[tuple[int, str]]) -> dict[int, JournalRecord]:
        """Register ``(index, request_key)`` pairs; see :meth:`novita_async.Journal.begin`."""
        wanted: dict[int, str] = {}
        for index, key in entries:
            if wanted.setdefault(index, key) != key:
                raise ValueError(f"index {index} is given twice with different keys")
        args: list[Any] = [self._require_token()]
        for index, key in wanted.items():
            args += [str(index), key]
        reply = await self._run(self._begin, args)
        if reply[0] == "mismatch":
            index = int(reply[1])
            raise JournalMismatchError(
                f"journal {self.name!r} belongs to a different batch: request #{index} is "
                "not the one it recorded; use a new journal name for a new batch",
                index=index,
                stored_key=reply[2],
                key=wanted[index],
            )
        self._check(reply, -1, "new")
        return {index: _parse(index, raw) for index, raw in zip(wanted, reply[1:], strict=True)}

    async def mark_submitting(self, index: int) -> None:
        """Durably record that the POST of ``index`` is about to be sent."""
        await self._move(index, "submitting")

    async def mark_submitted(self, index: int, task_id: str) -> None:
        """Record the task_id Novita answered (idempotent for the same task_id)."""
        if not isinstance(task_id, str) or not task_id:
            raise ValueError(f"task_id must be a non-empty str, got {task_id!r}")
        await self._move(index, "submitted", task_id=task_id)

    async def mark_uncertain(self, index: int, message: str) -> None:
        """The POST may or may not have created a task; it will not be resent by default."""
        await self._move(index, "uncertain", message=message)

    async def mark_rejected(self, index: int, message: str) -> None:
        """Novita certainly created no task; a rerun may submit it again."""
        await self._move(index, "rejected", message=message)

    async def mark_finished(
        self, index: int, *, result: TaskResult | None, error: str | None
    ) -> None:
        """``succeeded`` if there is a result and no error, else ``failed``; ``result`` is kept."""
        state: JournalState = "succeeded" if result is not None and error is None else "failed"
        stored = "" if result is None else _dump_result(result)
        await self._move(index, state, message=error or "", result=stored)

    # ------------------------------------------------------------------ reading

    async def records(self) -> list[JournalRecord]:
        """Every record, by index (no lease needed: readable while another run writes)."""
        require_asyncio("RedisJournal")
        raw = await self._call(self._redis.client.hgetall, self._keys[1])
        records = [_parse(int(text(index)), text(value)) for index, value in raw.items()]
        return sorted(records, key=lambda record: record.index)

    async def get(self, index: int) -> JournalRecord | None:
        require_asyncio("RedisJournal")
        raw = await self._call(self._redis.client.hget, self._keys[1], str(index))
        return None if raw is None else _parse(index, text(raw))

    # ------------------------------------------------------------------ internals

    @property
    def _lease_ms(self) -> int:
        return max(1, math.ceil(self.lease * 1000))

    def _require_token(self) -> str:
        if self._token is None:
            raise JournalError(f"journal {self.name!r} is not open (await journal.open())")
        return self._token

    async def _move(
        self,
        index: int,
        state: JournalState,
        *,
        task_id: str = "",
        message: str = "",
        result: str = "",
    ) -> None:
        allowed = " ".join(_FROM[state])
        args = [self._require_token(), str(index), state, allowed, task_id, message, result]
        reply = await self._run(self._mark, args)
        if reply[0] == "has_task":
            raise JournalError(
                f"request #{index} already has task {reply[1]}; refusing to record {task_id}"
            )
        self._check(reply, index, state)

    async def _run(self, script: Any, args: list[Any]) -> list[str]:
        require_asyncio("RedisJournal")
        reply = await self._call(script, keys=self._keys, args=args)
        return [text(value) for value in reply]

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        """One call, tried twice: a pooled connection is stale after a Redis restart.

        Running a script twice is harmless: every write is idempotent but
        ``submitting`` (which then counts one attempt too many)."""
        try:
            return await method(*args, **kwargs)
        except UNAVAILABLE:
            pass
        try:
            return await method(*args, **kwargs)
        except UNAVAILABLE as exc:
            self._unavailable(exc)

    def _check(self, reply: list[str], index: int, state: JournalState) -> None:
        if reply[0] == "ok":
            return
        if reply[0] == "lease":
            self._lost()
        if reply[0] == "missing":
            raise JournalError(f"request #{index} is not in journal {self.name!r} (call begin())")
        if reply[0] == "state":
            raise JournalError(f"request #{index} cannot go from {reply[1]!r} to {state!r}")
        raise JournalError(f"journal {self.name!r}: unexpected reply {reply[0]!r}")

    def _lost(self) -> NoReturn:
        raise JournalError(
            f"journal {self.name!r}: this run lost its lease (it expired, another run took "
            "over, or Redis lost it); stopping so that no prompt is paid twice"
        )

    def _unavailable(self, exc: BaseException) -> NoReturn:
        raise JournalError(
            f"journal {self.name!r}: Redis at {self._redis.describe()} is unreachable ({exc}); "
            "stopping so that no prompt is paid twice (rerun once Redis is back)"
        ) from exc


def _parse(index: int, raw: str) -> JournalRecord:
    data = json.loads(raw)
    return _journal_record(
        (
            index,
            data["key"],
            data["state"],
            data.get("task_id"),
            data.get("result"),
            data.get("error"),
            int(data.get("attempts", 0)),
            float(data["created_at"]),
            float(data["updated_at"]),
        )
    )
