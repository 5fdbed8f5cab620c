"""The journal's file: created complete, written by one process at a time.

A new journal is created only where no file exists, and created complete: its
schema is built in a temporary file in the same directory, which is then linked
into place. So a journal file is never empty; an existing file that is empty
(0 bytes), an empty sqlite database or anything but a journal is refused
(:class:`JournalError`), never silently turned into a fresh journal: such a file at
the journal's path means the journal was truncated, replaced or moved, and
starting over would pay for every prompt again. Delete it to start a new batch.

Only one writer at a time: a second writable :class:`~._journal.Journal` on the same file
(in this or another process, through the same path, a symlink or a hard link)
raises :class:`JournalError` instead of racing the first one into double
submissions. On Linux the writer holds an ``flock`` on the database file itself,
which covers every path to the same inode (Linux keeps ``flock`` locks apart from
the ``fcntl`` locks sqlite takes on the same file). Elsewhere it locks
``<real path>-lock``, with symlinks resolved (hard links are not detected there).
On Linux every write first checks that the path still names the locked file: a
journal deleted or replaced while open is refused (sqlite would go on writing into
the unlinked file, which no rerun finds: it would pay again).
Network file systems are not supported (nor are they by sqlite).
``Journal(path, read_only=True)`` can inspect a journal at any time, also while a
batch is writing it.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import threading
from pathlib import Path
from typing import Literal, get_args

from ._errors import NovitaError

__all__ = [
    "APPLICATION_ID",
    "SCHEMA",
    "SCHEMA_VERSION",
    "STATES",
    "JournalError",
    "JournalState",
    "acquire_lock",
    "connect",
    "connect_read_only",
    "create",
    "release_lock",
    "same_file",
]

JournalState = Literal[
    "new", "submitting", "submitted", "uncertain", "rejected", "succeeded", "failed"
]
STATES: tuple[JournalState, ...] = get_args(JournalState)

SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of a journal ("NVJL"): tells our files from other sqlite files.
APPLICATION_ID = 0x4E564A4C

SCHEMA = f"""
CREATE TABLE records (
    idx        INTEGER PRIMARY KEY,
    key        TEXT    NOT NULL,
    state      TEXT    NOT NULL CHECK (state IN ({", ".join(f"'{s}'" for s in STATES)})),
    task_id    TEXT,
    result     TEXT,
    error      TEXT,
    attempts   INTEGER NOT NULL DEFAULT 0,
    created_at REAL    NOT NULL,
    updated_at REAL    NOT NULL
);
CREATE INDEX records_task_id ON records (task_id) WHERE task_id IS NOT NULL;
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""


class JournalError(NovitaError):
    """The journal cannot be used: locked by another writer, not a journal, bad transition…"""


def connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every write is an explicit
    # BEGIN IMMEDIATE ... COMMIT. check_same_thread=False: callers may use worker
    # threads (anyio.to_thread); Journal._mutex serializes all use of the connection.
    return sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)


def create(path: Path) -> None:
    """Create a complete, empty journal at ``path`` unless a file appears there first.

    The schema is built in a temporary file next to ``path``, which is then hard-linked
    into place (never over an existing file), so ``path`` never holds a half-made or
    empty journal. Without hard links (some file systems) the bytes are copied into a
    file created exclusively.
    """
    directory = path.parent
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=directory)
    except OSError as exc:
        raise JournalError(f"cannot create journal {path}: {exc}") from exc
    os.close(fd)
    temporary = Path(name)
    try:
        conn = sqlite3.connect(temporary, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            conn.close()
        _fsync(temporary)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return  # created meanwhile by another process: open that one
        except OSError:
            _copy_exclusive(temporary, path)
        _fsync(directory)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot create journal {path}: {exc}") from exc
    finally:
        for leftover in (temporary, *(Path(f"{temporary}{s}") for s in ("-wal", "-shm"))):
            leftover.unlink(missing_ok=True)


def _copy_exclusive(source: Path, target: Path) -> None:
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as out:
        out.write(source.read_bytes())
        out.flush()
        os.fsync(out.fileno())


def _fsync(path: Path) -> None:
    """fsync a file or (where possible) a directory; best effort for directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def same_file(path: Path, fd: int, *, when: str = "while it was being opened") -> None:
    """The locked file must still be the one at ``path`` (not deleted or swapped meanwhile)."""
    if not sys.platform.startswith("linux"):
        return
    locked = os.fstat(fd)
    try:
        current = os.stat(path)
    except FileNotFoundError:
        raise JournalError(f"journal {path} was deleted or moved {when}") from None
    except OSError as exc:
        raise JournalError(f"journal {path}: {exc}") from exc
    if (locked.st_dev, locked.st_ino) != (current.st_dev, current.st_ino):
        raise JournalError(f"journal {path} was replaced {when}")


def connect_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise JournalError(f"no journal at {path}")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=10.0, check_same_thread=False)


# (st_dev, st_ino) of the files this process holds a writer lock on. Checked before
# opening another descriptor: closing a descriptor of a file drops every fcntl lock this
# process holds on it, sqlite's included, so a refused open must not open and close one.
_LOCKED: set[tuple[int, int]] = set()
_LOCKED_MUTEX = threading.Lock()


def acquire_lock(path: Path) -> tuple[int, tuple[int, int]]:
    """Exclusive, non-blocking lock on the real file; the OS drops it if the process dies.

    Linux: ``flock`` on the database file itself (its inode: any path, symlink or hard
    link to it conflicts). Elsewhere: ``<resolved path>-lock`` (symlinks resolved).
    Returns the locked descriptor and the file's identity (release with
    :func:`release_lock`).
    """
    real = path.resolve()
    on_file = sys.platform.startswith("linux")
    lock_path = real if on_file else real.with_name(real.name + "-lock")
    in_use = JournalError(
        f"journal {path} is in use by another batch; two writers could submit the same prompt twice"
    )
    with _LOCKED_MUTEX:
        try:
            info = os.stat(real)
        except OSError as exc:
            raise JournalError(f"cannot open journal {path}: {exc}") from exc
        identity = (info.st_dev, info.st_ino)
        if identity in _LOCKED:
            raise in_use
        try:
            fd = os.open(lock_path, os.O_RDONLY if on_file else os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JournalError(f"cannot open lock file {lock_path}: {exc}") from exc
        try:
            if sys.platform == "win32":
                import msvcrt

                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise in_use from exc
        _LOCKED.add(identity)
    return fd, identity


def release_lock(fd: int, identity: tuple[int, int]) -> None:
    with _LOCKED_MUTEX:
        _LOCKED.discard(identity)
        os.close(fd)  # releases the lock
