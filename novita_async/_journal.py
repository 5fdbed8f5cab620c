"""A sqlite journal that makes a fan-out resumable: a crash loses no task_id, a rerun
never pays twice for a prompt on its own.

One row per prompt (its position ``index`` in the batch). The batch engine writes
the row's state *before* each step that costs money and right after each answer::

    new ──> submitting ──> submitted ──> succeeded | failed
     │         │  ╰──────> rejected   (certainly no task: may be sent again)
     ╰─────────┼─────────> rejected
               ╰─────────> uncertain  (a task may exist: sent again only if asked)

``rejected`` and ``uncertain`` rows may go back to ``submitting``; a row with a
task_id never does (:class:`JournalError`). A row still in ``submitting`` when a
journal is opened means the process died during the POST: treat it like
``uncertain``. ``attempts`` counts ``mark_submitting`` calls (POSTs tried).

Durability: WAL with ``synchronous=FULL``, and a checkpoint after every commit.
Every ``mark_*`` is one short transaction, durable when it returns. WAL+NORMAL would
survive a crash or ``kill -9`` of the process (the commit is in the OS page cache) but
may drop the last commits on power loss or an OS crash; a ``submitting`` row lost that
way turns back into ``new`` and is paid twice, so FULL (one fsync per commit, well
under a millisecond to a few ms; tiny next to a paid generation) is used.

Identity: the journal is the main file alone. WAL keeps new commits in ``<path>-wal``
until a checkpoint copies them into the main file; a journal moved or copied without
its ``-wal`` (e.g. after a ``kill -9``, which leaves the WAL behind) would lose them
and a rerun would pay again. So every ``mark_*`` and ``begin`` checkpoints
(``wal_checkpoint(PASSIVE)``: the main file is written and fsynced) before it returns,
and opening a journal for writing folds a dead writer's WAL into the main file first.
Whatever the batch does *after* a write returns is therefore recorded in the main
file; a ``kill -9`` between a commit and its checkpoint loses at most that one write,
whose follow-up (a POST, a result) never happened, except ``mark_submitted``, whose
loss leaves ``submitting``: reported as uncertain, never paid twice by default.
(If another process holds a long read transaction, the checkpoint cannot complete
and the main file lags behind until it ends; the WAL still holds everything.)

How a journal file is created (complete, never empty) and locked (one writer at a
time): :mod:`._journal_file`.

The batch engine talks to a journal through :class:`AsyncJournal`;
:func:`as_async_journal` adapts a path or a :class:`Journal` to it, running every
sqlite call in a worker thread, shielded from cancellation (a write that was
started always completes: it is short, and skipping it could pay twice).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar, cast, runtime_checkable

import anyio
import anyio.to_thread
import attrs

from ._convert import converter, request_body, task_result
from ._journal_file import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    STATES,
    JournalError,
    JournalState,
    acquire_lock,
    connect,
    connect_read_only,
    create,
    release_lock,
    same_file,
)
from ._models import Extra, Txt2ImgRequest
from ._results import TaskResult

__all__ = [
    "AsyncJournal",
    "Journal",
    "JournalError",
    "JournalMismatchError",
    "JournalRecord",
    "JournalState",
    "Replay",
    "as_async_journal",
    "replay",
    "request_key",
]

T = TypeVar("T")

_COLUMNS = "idx, key, state, task_id, result, error, attempts, created_at, updated_at"

# target state -> states a row may move from. Moving to "submitting" (i.e. a POST,
# i.e. money) is never allowed once a task_id is known.
_FROM: dict[JournalState, tuple[JournalState, ...]] = {
    "submitting": ("new", "submitting", "uncertain", "rejected"),
    "submitted": ("submitting", "uncertain"),
    "uncertain": ("submitting", "uncertain"),
    "rejected": ("new", "submitting", "rejected"),
    "succeeded": ("submitted",),
    "failed": ("submitted",),
}


_UNSAFE = (
    "while in use; refusing to write where a rerun cannot read it (it would pay again "
    "for every prompt sent from now on)"
)


class JournalMismatchError(JournalError):
    """The journal was written for a different batch (an index maps to another request)."""

    def __init__(self, message: str, *, index: int, stored_key: str, key: str) -> None:
        super().__init__(message)
        self.index = index
        self.stored_key = stored_key
        self.key = key


@attrs.frozen(kw_only=True)
class JournalRecord:
    """One prompt of a journaled batch (``created_at``/``updated_at``: Unix time)."""

    index: int
    key: str
    state: JournalState
    task_id: str | None
    result: TaskResult | None
    error: str | None
    attempts: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def is_finished(self) -> bool:
        return self.state in ("succeeded", "failed")


def request_key(request: Txt2ImgRequest, extra: Extra | None) -> str:
    """sha256 (hex) of the canonical JSON of the exact POST body of ``request``/``extra``."""
    body = request_body(request, extra)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Journal:
    """The sqlite journal of one batch; see the module docstring for the states.

    Methods are synchronous and short (one transaction each) and may be called
    from any thread, one at a time or concurrently (a lock serializes them).
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._mutex = threading.Lock()
        self._lock_fd: int | None = None
        self._identity = (0, 0)
        self._conn: sqlite3.Connection | None = None
        try:
            if read_only:
                self._conn = connect_read_only(self.path)
                if self._inspect(self._conn):
                    raise JournalError(f"{self.path} is an empty database, not a journal")
            else:
                if not os.path.lexists(self.path):
                    create(self.path)
                self._lock_fd, self._identity = acquire_lock(self.path)
                if self.path.stat().st_size == 0:
                    raise JournalError(
                        f"{self.path} is an empty file, not a journal (a journal is never "
                        "empty: it was truncated or replaced?); delete it to start a new batch"
                    )
                self._conn = connect(self.path)
                same_file(self.path, self._lock_fd)
                self._prepare(self._conn)
        except BaseException as exc:
            self.close()
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise JournalError(f"cannot open journal {self.path}: {exc}") from exc
            raise

    def __repr__(self) -> str:
        mode = ", read_only=True" if self.read_only else ""
        return f"Journal({str(self.path)!r}{mode})"

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database and release the writer lock. Idempotent."""
        with self._mutex:
            conn, self._conn = self._conn, None
            fd, self._lock_fd = self._lock_fd, None
            try:
                if conn is not None:
                    conn.close()
            finally:
                if fd is not None:
                    release_lock(fd, self._identity)

    @property
    def closed(self) -> bool:
        return self._conn is None

    # ------------------------------------------------------------------ batch engine API

    def begin(self, entries: Sequence[tuple[int, str]]) -> dict[int, JournalRecord]:
        """Register a batch: ``entries`` are ``(index, request_key)`` pairs.

        Unknown indexes are inserted as ``new`` (all in one transaction); the
        records of every given index are returned. If a stored index has a
        different key, nothing is written and :class:`JournalMismatchError` is raised.
        """
        wanted: dict[int, str] = {}
        for index, key in entries:
            if wanted.setdefault(index, key) != key:
                raise ValueError(f"index {index} is given twice with different keys")
        now = time.time()
        with self._transaction() as conn:
            stored = {row[0]: row for row in conn.execute(f"SELECT {_COLUMNS} FROM records")}
            for index, key in wanted.items():
                row = stored.get(index)
                if row is not None and row[1] != key:
                    raise JournalMismatchError(
                        f"journal {self.path} belongs to a different batch: request #{index} "
                        "is not the one it recorded; use a new journal file for a new batch",
                        index=index,
                        stored_key=row[1],
                        key=key,
                    )
            missing = [(i, k, now, now) for i, k in wanted.items() if i not in stored]
            conn.executemany(
                "INSERT INTO records (idx, key, state, created_at, updated_at)"
                " VALUES (?, ?, 'new', ?, ?)",
                missing,
            )
        records = {row[0]: _record(row) for row in stored.values() if row[0] in wanted}
        for index, key, *_ in missing:
            records[index] = JournalRecord(
                index=index,
                key=key,
                state="new",
                task_id=None,
                result=None,
                error=None,
                created_at=now,
                updated_at=now,
            )
        return records

    def mark_submitting(self, index: int) -> None:
        """Durably record that the POST of ``index`` is about to be sent."""
        self._move(index, "submitting", "attempts = attempts + 1, error = NULL")

    def mark_submitted(self, index: int, task_id: str) -> None:
        """Record the task_id Novita answered (idempotent for the same task_id)."""
        if not isinstance(task_id, str) or not task_id:
            raise ValueError(f"task_id must be a non-empty str, got {task_id!r}")
        with self._transaction() as conn:
            row = self._row(conn, index)
            if row[2] == "submitted" and row[3] == task_id:
                return
            if row[3] is not None:
                raise JournalError(
                    f"request #{index} already has task {row[3]}; refusing to record {task_id}"
                )
            self._update(conn, index, row, "submitted", "task_id = ?, error = NULL", task_id)

    def mark_uncertain(self, index: int, message: str) -> None:
        """The POST may or may not have created a task; it will not be resent by default."""
        self._move(index, "uncertain", "error = ?", message)

    def mark_rejected(self, index: int, message: str) -> None:
        """Novita certainly created no task (e.g. HTTP 400); a rerun may submit it again."""
        self._move(index, "rejected", "error = ?", message)

    def mark_finished(self, index: int, *, result: TaskResult | None, error: str | None) -> None:
        """``succeeded`` if there is a result and no error, else ``failed``; ``result`` is kept."""
        state: JournalState = "succeeded" if result is not None and error is None else "failed"
        stored = None if result is None else _dump_result(result)
        self._move(index, state, "result = ?, error = ?", stored, error)

    # ------------------------------------------------------------------ reading

    def records(self) -> list[JournalRecord]:
        """Every record, by index."""
        with self._locked() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM records ORDER BY idx").fetchall()
        return [_record(row) for row in rows]

    def get(self, index: int) -> JournalRecord | None:
        with self._locked() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM records WHERE idx = ?", (index,)).fetchone()
        return None if row is None else _record(row)

    def find_task(self, task_id: str) -> JournalRecord | None:
        """The record holding ``task_id`` (e.g. for a webhook delivery), if any."""
        with self._locked() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM records WHERE task_id = ?", (task_id,)
            ).fetchone()
        return None if row is None else _record(row)

    def summary(self) -> dict[JournalState, int]:
        """Number of records per state (every state present, zeros included)."""
        counts: dict[JournalState, int] = dict.fromkeys(STATES, 0)
        with self._locked() as conn:
            for state, count in conn.execute("SELECT state, COUNT(*) FROM records GROUP BY state"):
                counts[cast(JournalState, state)] = count
        return counts

    # ------------------------------------------------------------------ internals

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the journal's mutex."""
        with self._mutex:
            if self._conn is None:
                raise JournalError(f"journal {self.path} is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:  # I/O error, disk full, corrupted file…
                raise JournalError(f"journal {self.path}: {exc}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE … COMMIT`` (rolled back on any exception)."""
        if self.read_only:
            raise JournalError(f"journal {self.path} is open read-only")
        with self._locked() as conn:
            if self._lock_fd is not None:
                # Writing into a journal deleted or replaced at its path would record
                # nothing a rerun can read: it would pay again for every POST from now.
                same_file(self.path, self._lock_fd, when=_UNSAFE)
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.execute("COMMIT")
            # Copy the commit into the main file now (see "Identity" above). PASSIVE
            # never waits: FULL would wait (busy timeout, 10 s) for any reader holding an
            # old snapshot, in every write, i.e. before every POST. Frames such a reader
            # still needs stay in the WAL (not an error) until a later write.
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _row(self, conn: sqlite3.Connection, index: int) -> tuple[Any, ...]:
        row = conn.execute(f"SELECT {_COLUMNS} FROM records WHERE idx = ?", (index,)).fetchone()
        if row is None:
            raise JournalError(f"request #{index} is not in journal {self.path} (call begin())")
        return cast("tuple[Any, ...]", row)

    def _move(self, index: int, state: JournalState, assignments: str, *params: Any) -> None:
        with self._transaction() as conn:
            self._update(conn, index, self._row(conn, index), state, assignments, *params)

    def _update(
        self,
        conn: sqlite3.Connection,
        index: int,
        row: tuple[Any, ...],
        state: JournalState,
        assignments: str,
        *params: Any,
    ) -> None:
        if row[2] not in _FROM[state]:
            raise JournalError(f"request #{index} cannot go from {row[2]!r} to {state!r}")
        conn.execute(
            f"UPDATE records SET state = ?, {assignments}, updated_at = ? WHERE idx = ?",
            (state, *params, time.time(), index),
        )

    def _inspect(self, conn: sqlite3.Connection) -> bool:
        """Check the file is a journal we can read; True if it is a fresh, empty database."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
        if app_id == 0 and version == 0 and tables == 0:
            return True
        if app_id != APPLICATION_ID:
            raise JournalError(f"{self.path} is a sqlite database but not a novita_async journal")
        if version != SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path} has schema version {version}; this novita_async "
                f"reads version {SCHEMA_VERSION}"
            )
        return False

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Check (before changing anything), ensure WAL + FULL, fold any WAL into the file."""
        if self._inspect(conn):
            raise JournalError(
                f"{self.path} is an empty database, not a journal (a journal is never "
                "empty: it was truncated or replaced?); delete it to start a new batch"
            )
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(f"cannot enable WAL on journal {self.path} (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


# --------------------------------------------------------------------------- async engine API


@runtime_checkable
class AsyncJournal(Protocol):
    """What the batch engine calls: :class:`Journal`'s writing API, awaitable.

    ``open()`` acquires whatever the journal needs (the writer lock) before the
    first ``begin``; ``aclose()`` releases it. Implementations should complete a
    write once started, even when the caller is cancelled.
    """

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def begin(self, entries: Sequence[tuple[int, str]]) -> dict[int, JournalRecord]: ...

    async def mark_submitting(self, index: int) -> None: ...

    async def mark_submitted(self, index: int, task_id: str) -> None: ...

    async def mark_uncertain(self, index: int, message: str) -> None: ...

    async def mark_rejected(self, index: int, message: str) -> None: ...

    async def mark_finished(
        self, index: int, *, result: TaskResult | None, error: str | None
    ) -> None: ...


def as_async_journal(
    journal: str | os.PathLike[str] | Journal | AsyncJournal,
) -> tuple[AsyncJournal, bool]:
    """``(adapter, owned)`` for what a user passed as ``journal=``.

    * a path: a :class:`Journal` opened by ``open()`` and closed by ``aclose()``
      (in worker threads); ``owned`` is True: the engine calls ``open()`` before its
      first use and ``aclose()`` when done;
    * a :class:`Journal`: used in worker threads; ``owned`` is False: the user opened
      it and closes it (``open()`` / ``aclose()`` of the adapter do nothing);
    * an :class:`AsyncJournal`: returned as is, ``owned`` False; the engine still calls
      its ``open()`` before the first write and ``aclose()`` when the run ends, so it is
      passed unopened (a :class:`~novita_async.redis.RedisJournal` takes and releases
      its lease then).
    """
    if isinstance(journal, Journal):
        return _ThreadedJournal(journal), False
    if isinstance(journal, (str, os.PathLike)):
        return _ThreadedJournal(journal), True
    if isinstance(journal, AsyncJournal):
        return journal, False
    raise TypeError(
        f"journal must be a path, a Journal or an AsyncJournal, got {type(journal).__name__}"
    )


class _ThreadedJournal:
    """:class:`AsyncJournal` over a :class:`Journal`: each call runs in a worker thread,
    shielded (the write always happens; a cancellation lands after it)."""

    def __init__(self, source: str | os.PathLike[str] | Journal) -> None:
        self._owned = not isinstance(source, Journal)
        self._path = None if isinstance(source, Journal) else source
        self._journal: Journal | None = source if isinstance(source, Journal) else None

    def __repr__(self) -> str:
        return f"<AsyncJournal {self._journal or self._path!r}>"

    @property
    def journal(self) -> Journal | None:
        """The underlying :class:`Journal` (None until ``open()`` for a path)."""
        return self._journal

    @staticmethod
    async def _run(call: Callable[[], T]) -> T:
        with anyio.CancelScope(shield=True):
            result = await anyio.to_thread.run_sync(call)
        return result

    def _open_journal(self) -> Journal:
        if self._journal is None:
            raise JournalError(f"journal {self._path} is not open (call open() first)")
        return self._journal

    async def open(self) -> None:
        if self._journal is None and self._path is not None:
            path = self._path
            self._journal = await self._run(lambda: Journal(path))

    async def aclose(self) -> None:
        journal = self._journal
        if self._owned and journal is not None:
            self._journal = None
            await self._run(journal.close)

    async def begin(self, entries: Sequence[tuple[int, str]]) -> dict[int, JournalRecord]:
        journal = self._open_journal()
        return await self._run(lambda: journal.begin(entries))

    async def mark_submitting(self, index: int) -> None:
        journal = self._open_journal()
        await self._run(lambda: journal.mark_submitting(index))

    async def mark_submitted(self, index: int, task_id: str) -> None:
        journal = self._open_journal()
        await self._run(lambda: journal.mark_submitted(index, task_id))

    async def mark_uncertain(self, index: int, message: str) -> None:
        journal = self._open_journal()
        await self._run(lambda: journal.mark_uncertain(index, message))

    async def mark_rejected(self, index: int, message: str) -> None:
        journal = self._open_journal()
        await self._run(lambda: journal.mark_rejected(index, message))

    async def mark_finished(
        self, index: int, *, result: TaskResult | None, error: str | None
    ) -> None:
        journal = self._open_journal()
        await self._run(lambda: journal.mark_finished(index, result=result, error=error))


def _record(row: tuple[Any, ...] | sqlite3.Row) -> JournalRecord:
    index, key, state, task_id, result, error, attempts, created_at, updated_at = row
    return JournalRecord(
        index=index,
        key=key,
        state=state,
        task_id=task_id,
        result=None if result is None else task_result(json.loads(result)),
        error=error,
        attempts=attempts,
        created_at=created_at,
        updated_at=updated_at,
    )


def _dump_result(result: TaskResult) -> str:
    return json.dumps(converter.unstructure(result), separators=(",", ":"))


Replay = Literal["send", "wait", "succeeded", "failed", "uncertain"]


def replay(record: JournalRecord | None, *, resubmit_uncertain: bool) -> Replay:
    """What a rerun does with one prompt, given its record from an earlier run.

    Never sent or certainly refused: ``send``. A task id without an outcome:
    ``wait`` for it. A known outcome: ``succeeded`` / ``failed`` (replayed, no
    request). A POST that may have created a task (``submitting`` when the
    process died, or ``uncertain``): ``uncertain`` (reported, not resent),
    unless ``resubmit_uncertain`` says to pay again (``send``).
    """
    if record is None or record.state in ("new", "rejected"):
        return "send"
    state = record.state
    if state == "succeeded" and record.result is not None:
        return "succeeded"
    if state in ("succeeded", "failed") and record.task_id is not None:
        return "failed"
    if state == "submitted" and record.task_id is not None:
        return "wait"
    return "send" if resubmit_uncertain else "uncertain"
