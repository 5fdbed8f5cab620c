"""The sqlite batch journal: states, durability, locking, result round trip, and resumed batches."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from _support import MODEL, req

from novita_async import (
    BadRequestError,
    Extra,
    Journal,
    JournalError,
    JournalMismatchError,
    JournalRecord,
    SubmissionUncertainError,
    TaskFailedError,
    TaskStatus,
    TaskTimeoutError,
    Txt2ImgRequest,
    request_key,
)
from novita_async._convert import request_body, task_result
from novita_async._engine import BatchItem
from novita_async.testing import NovitaEmulator


def raw_result(task_id: str, status: str = "TASK_STATUS_SUCCEED") -> dict[str, object]:
    """A task-result body the way Novita sends it (strings for numbers, JSON in a string)."""
    request_info = {"model": MODEL, "prompts": ["a cat"], "seeds": [392212448], "width": 512}
    return {
        "extra": {
            "seed": "392212448",
            "enable_nsfw_detection": False,
            "debug_info": {
                "request_info": json.dumps(request_info),
                "submit_time_ms": "1715052533293",
                "execute_time_ms": "1715052533400",
                "complete_time_ms": "",
            },
        },
        "task": {
            "task_id": task_id,
            "task_type": "TXT_TO_IMG",
            "status": status,
            "reason": "" if status == "TASK_STATUS_SUCCEED" else "emulated failure",
            "eta": 0,
            "progress_percent": 0,
        },
        "images": [
            {
                "image_url": f"https://img.example/{task_id}/0.jpeg?X-Amz-Expires=3600",
                "image_url_ttl": "3600",
                "image_type": "jpeg",
                "nsfw_detection_result": {"valid": True, "confidence": 3.25},
            },
            {
                "image_url": f"https://img.example/{task_id}/1.jpeg",
                "image_url_ttl": 3600,
                "image_type": "jpeg",
                "nsfw_detection_result": {},
            },
        ],
        "videos": [],
    }


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "batch.db"


@pytest.fixture
def journal(db: Path) -> Iterator[Journal]:
    with Journal(db) as j:
        yield j


def entries(n: int) -> list[tuple[int, str]]:
    return [(i, request_key(req(f"prompt {i}"), None)) for i in range(n)]


# --------------------------------------------------------------------------- request_key


def test_request_key_is_sha256_of_the_canonical_body() -> None:
    extra = Extra(response_image_type="png", additional={"b": 1, "a": [1, 2]})
    body = request_body(req("a cat"), extra)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert request_key(req("a cat"), extra) == hashlib.sha256(canonical.encode()).hexdigest()


def test_request_key_changes_with_anything_sent() -> None:
    base = request_key(req("a cat"), None)
    assert request_key(req("a cat"), None) == base
    assert request_key(req("a dog"), None) != base
    assert request_key(req("a cat", seed=7), None) != base
    assert request_key(req("a cat"), Extra(response_image_type="png")) != base
    # extra keys in another insertion order: same body, same key
    one = Extra(additional={"x": 1, "y": 2})
    two = Extra(additional={"y": 2, "x": 1})
    assert request_key(req("a cat"), one) == request_key(req("a cat"), two)


# --------------------------------------------------------------------------- opening


def test_new_journal_is_wal_full_and_versioned(db: Path) -> None:
    with Journal(db) as journal:
        conn = journal._conn
        assert conn is not None
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
        assert raw.execute("PRAGMA application_id").fetchone()[0] == 0x4E564A4C
        indexes = {row[1] for row in raw.execute("PRAGMA index_list(records)")}
        assert "records_task_id" in indexes
    finally:
        raw.close()


def test_foreign_sqlite_file_is_refused_untouched(db: Path) -> None:
    raw = sqlite3.connect(db)
    raw.execute("CREATE TABLE users (name TEXT)")
    raw.commit()
    raw.close()
    with pytest.raises(JournalError, match="not a novita_async journal"):
        Journal(db)
    with pytest.raises(JournalError, match="not a novita_async journal"):
        Journal(db, read_only=True)
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
    finally:
        raw.close()


def test_garbage_file_and_newer_schema_are_refused(tmp_path: Path, db: Path) -> None:
    garbage = tmp_path / "notes.txt"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(JournalError, match="cannot open journal"):
        Journal(garbage)
    Journal(db).close()
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(JournalError, match="schema version 99"):
        Journal(db)


def test_closed_journal_refuses_use_and_close_is_idempotent(db: Path) -> None:
    journal = Journal(db)
    journal.close()
    journal.close()
    assert journal.closed
    with pytest.raises(JournalError, match="closed"):
        journal.records()
    with pytest.raises(JournalError, match="closed"):
        journal.mark_submitting(0)


def test_sqlite_failures_surface_as_journal_errors(db: Path) -> None:
    with Journal(db) as journal:
        journal.begin(entries(1))
        raw = sqlite3.connect(db)
        raw.execute("DROP TABLE records")  # someone broke the file under us
        raw.commit()
        raw.close()
        with pytest.raises(JournalError, match="no such table") as info:
            journal.mark_submitting(0)
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        with pytest.raises(JournalError, match="no such table"):
            journal.records()


# --------------------------------------------------------------------------- begin


def test_begin_inserts_new_records_and_is_idempotent(journal: Journal) -> None:
    first = journal.begin(entries(3))
    assert sorted(first) == [0, 1, 2]
    assert all(r.state == "new" and r.task_id is None and r.attempts == 0 for r in first.values())
    assert first[1].key == entries(3)[1][1]
    journal.mark_submitting(0)
    journal.mark_submitted(0, "task-0")
    again = journal.begin(entries(4))  # a longer batch with the same prefix: fine
    assert sorted(again) == [0, 1, 2, 3]
    assert again[0].state == "submitted"
    assert again[0].task_id == "task-0"
    assert again[3].state == "new"
    assert journal.begin(entries(4)[2:]).keys() == {2, 3}  # only the asked indexes
    assert journal.summary() == {
        "new": 3,
        "submitting": 0,
        "submitted": 1,
        "uncertain": 0,
        "rejected": 0,
        "succeeded": 0,
        "failed": 0,
    }


def test_begin_with_a_different_batch_raises_and_writes_nothing(journal: Journal) -> None:
    journal.begin(entries(2))
    other = [(0, entries(1)[0][1]), (1, request_key(req("something else"), None)), (5, "k5")]
    with pytest.raises(JournalMismatchError, match="different batch") as info:
        journal.begin(other)
    assert info.value.index == 1
    assert info.value.key == other[1][1]
    assert info.value.stored_key == entries(2)[1][1]
    assert [r.index for r in journal.records()] == [0, 1]  # index 5 was not inserted
    assert isinstance(info.value, JournalError)


def test_begin_rejects_contradictory_entries(journal: Journal) -> None:
    with pytest.raises(ValueError, match="twice"):
        journal.begin([(0, "a"), (0, "b")])
    assert journal.records() == []


# --------------------------------------------------------------------------- transitions


def test_happy_path_and_timestamps(journal: Journal) -> None:
    journal.begin(entries(1))
    created = journal.records()[0].created_at
    journal.mark_submitting(0)
    assert journal.records()[0].state == "submitting"
    journal.mark_submitted(0, "task-0")
    journal.mark_submitted(0, "task-0")  # idempotent
    result = task_result(raw_result("task-0"))
    journal.mark_finished(0, result=result, error=None)
    (record,) = journal.records()
    assert record.state == "succeeded"
    assert record.is_finished
    assert record.task_id == "task-0"
    assert record.result == result
    assert record.error is None
    assert record.attempts == 1
    assert record.created_at == created <= record.updated_at
    assert journal.find_task("task-0") == record
    assert journal.find_task("nope") is None
    assert journal.get(0) == record
    assert journal.get(9) is None


def test_failed_outcomes_keep_result_and_error(journal: Journal) -> None:
    journal.begin(entries(3))
    for i in range(3):
        journal.mark_submitting(i)
        journal.mark_submitted(i, f"task-{i}")
    failed = task_result(raw_result("task-0", "TASK_STATUS_FAILED"))
    journal.mark_finished(0, result=failed, error="task task-0 failed: emulated failure")
    journal.mark_finished(1, result=None, error="boom")
    succeeded = task_result(raw_result("task-2"))
    journal.mark_finished(2, result=succeeded, error="image 0: download failed")
    zero, one, two = journal.records()
    assert (zero.state, zero.result, zero.error) == ("failed", failed, zero.error)
    assert zero.error is not None
    assert "emulated failure" in zero.error
    assert (one.state, one.result, one.error) == ("failed", None, "boom")
    assert two.state == "failed"
    assert two.result == succeeded


def test_uncertain_and_rejected_may_be_submitted_again(journal: Journal) -> None:
    journal.begin(entries(3))
    journal.mark_submitting(0)
    journal.mark_uncertain(0, "read timeout")
    journal.mark_submitting(1)
    journal.mark_rejected(1, "HTTP 400 INVALID_REQUEST_BODY")
    journal.mark_rejected(2, "local validation failed")  # never sent at all
    zero, one, two = journal.records()
    assert (zero.state, zero.error) == ("uncertain", "read timeout")
    assert (one.state, one.error) == ("rejected", "HTTP 400 INVALID_REQUEST_BODY")
    assert two.state == "rejected"
    assert two.attempts == 0
    journal.mark_submitting(0)  # the user asked for resubmit_uncertain
    journal.mark_submitting(1)
    zero, one, _ = journal.records()
    assert (zero.state, zero.attempts, zero.error) == ("submitting", 2, None)
    assert (one.state, one.attempts) == ("submitting", 2)


def test_a_known_task_is_never_submitted_again(journal: Journal) -> None:
    journal.begin(entries(2))
    journal.mark_submitting(0)
    journal.mark_submitted(0, "task-0")
    with pytest.raises(JournalError, match="from 'submitted' to 'submitting'"):
        journal.mark_submitting(0)
    with pytest.raises(JournalError, match="already has task task-0"):
        journal.mark_submitted(0, "task-other")
    with pytest.raises(JournalError, match="to 'uncertain'"):
        journal.mark_uncertain(0, "late")
    journal.mark_finished(0, result=task_result(raw_result("task-0")), error=None)
    with pytest.raises(JournalError, match="cannot go from 'succeeded'"):
        journal.mark_submitting(0)
    with pytest.raises(JournalError, match="cannot go from 'succeeded'"):
        journal.mark_rejected(0, "x")
    with pytest.raises(JournalError, match="cannot go from 'succeeded'"):
        journal.mark_finished(0, result=None, error="again")
    with pytest.raises(JournalError, match="cannot go from 'new' to 'succeeded'"):
        journal.mark_finished(1, result=task_result(raw_result("x")), error=None)
    with pytest.raises(JournalError, match="not in journal"):
        journal.mark_submitting(7)
    with pytest.raises(ValueError, match="task_id"):
        journal.mark_submitted(1, "")
    assert journal.records()[0].state == "succeeded"  # failed transitions changed nothing


# --------------------------------------------------------------------------- durability


def test_everything_survives_close_and_reopen(db: Path) -> None:
    result = task_result(raw_result("task-1"))
    with Journal(db) as journal:
        journal.begin(entries(4))
        journal.mark_submitting(0)
        journal.mark_submitting(1)
        journal.mark_submitted(1, "task-1")
        journal.mark_finished(1, result=result, error=None)
        journal.mark_submitting(2)
        journal.mark_uncertain(2, "connection reset")
        before = journal.records()
    with Journal(db) as journal:
        after = journal.records()
        assert after == before
        assert [r.state for r in after] == ["submitting", "succeeded", "uncertain", "new"]
        assert after[1].result == result


def test_result_round_trip_keeps_every_parsed_field(journal: Journal) -> None:
    original = task_result(raw_result("task-rt"))
    assert original.extra.seed == 392212448
    assert original.extra.debug_info is not None
    assert original.extra.debug_info.request_info is not None
    journal.begin(entries(1))
    journal.mark_submitting(0)
    journal.mark_submitted(0, "task-rt")
    journal.mark_finished(0, result=original, error=None)
    stored = journal.records()[0].result
    assert stored == original
    assert stored is not None
    assert stored.extra.debug_info is not None
    assert stored.extra.seed == 392212448
    assert stored.extra.debug_info.request_info == {
        "model": MODEL,
        "prompts": ["a cat"],
        "seeds": [392212448],
        "width": 512,
    }
    assert stored.extra.debug_info.submit_time_ms == 1715052533293
    assert stored.extra.debug_info.complete_time_ms is None
    assert stored.status is TaskStatus.SUCCEED
    assert [i.image_url_ttl for i in stored.images] == [3600, 3600]
    assert stored.images[0].nsfw_detection_result is not None
    assert stored.images[0].nsfw_detection_result.confidence == 3.25
    assert stored.images[1].nsfw_detection_result is None


def test_submitting_survives_kill_9_right_after_the_write(db: Path) -> None:
    """The write made before a POST is on disk even if the process dies right after it."""
    Journal(db).close()
    child = textwrap.dedent(
        f"""
        import os, signal
        from novita_async import Journal
        journal = Journal({str(db)!r})
        journal.begin([(0, "k0"), (1, "k1")])
        journal.mark_submitting(0)
        journal.mark_submitted(0, "task-0")
        journal.mark_submitting(1)
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit, no checkpoint
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with Journal(db) as journal:  # the dead writer's lock is gone with it
        states = [(r.state, r.task_id, r.attempts) for r in journal.records()]
    assert states == [("submitted", "task-0", 1), ("submitting", None, 1)]


def _kill_writer_midway(db: Path) -> None:
    """A child creates the journal, writes rows and dies by SIGKILL (no close, no checkpoint
    on close): what a batch killed with ``kill -9`` leaves behind."""
    child = textwrap.dedent(
        f"""
        import os, signal
        from novita_async import Journal
        journal = Journal({str(db)!r})
        journal.begin([(0, "k0"), (1, "k1"), (2, "k2")])
        journal.mark_submitting(0)
        journal.mark_submitted(0, "task-0")
        journal.mark_submitting(1)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


KILLED_STATES = [("submitted", "task-0"), ("submitting", None), ("new", None)]


def test_main_file_alone_keeps_every_row_after_kill_9(tmp_path: Path, db: Path) -> None:
    """Regression: the rows lived only in ``batch.db-wal``; a copy of ``batch.db`` alone
    opened as a fresh journal and the rerun paid for every prompt again."""
    _kill_writer_midway(db)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copyfile(db, moved / "batch.db")  # the main file only, not its -wal / -shm
    with Journal(moved / "batch.db") as journal:
        assert [(r.state, r.task_id) for r in journal.records()] == KILLED_STATES
    with Journal(moved / "batch.db", read_only=True) as reader:
        assert [(r.state, r.task_id) for r in reader.records()] == KILLED_STATES
    with Journal(db) as journal:  # the original, with its WAL, is intact as well
        assert [(r.state, r.task_id) for r in journal.records()] == KILLED_STATES


def test_main_file_copied_while_the_writer_holds_it_is_complete(tmp_path: Path, db: Path) -> None:
    copy = tmp_path / "copy.db"
    with Journal(db) as journal:
        journal.begin(entries(3))
        journal.mark_submitting(2)
        journal.mark_submitted(2, "task-2")
        shutil.copyfile(db, copy)
        with Journal(copy) as copied:
            assert [(r.state, r.task_id) for r in copied.records()] == [
                ("new", None),
                ("new", None),
                ("submitted", "task-2"),
            ]


def test_empty_file_or_database_at_the_path_is_refused(tmp_path: Path, db: Path) -> None:
    """Regression: a 0-byte file where the journal was expected became a fresh journal."""
    db.write_bytes(b"")
    with pytest.raises(JournalError, match="empty file"):
        Journal(db)
    assert db.read_bytes() == b""  # untouched
    empty = tmp_path / "empty.db"
    raw = sqlite3.connect(empty)
    raw.execute("CREATE TABLE t (x)")
    raw.execute("DROP TABLE t")  # a valid sqlite file with pages but no tables
    raw.commit()
    raw.close()
    assert empty.stat().st_size > 0
    with pytest.raises(JournalError, match="empty database"):
        Journal(empty)


def test_a_new_journal_is_created_complete_and_alone(tmp_path: Path, db: Path) -> None:
    Journal(db).close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith("-lock")) == [
        "batch.db"
    ]  # no temporary file left behind
    raw = sqlite3.connect(f"{db.as_uri()}?immutable=1", uri=True)  # the main file alone
    try:
        assert raw.execute("PRAGMA application_id").fetchone()[0] == 0x4E564A4C
        assert raw.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 0
    finally:
        raw.close()
    with pytest.raises(JournalError, match="cannot create journal"):
        Journal(tmp_path / "missing-dir" / "batch.db")


# --------------------------------------------------------------------------- concurrency


def test_second_writer_is_refused_in_process(db: Path) -> None:
    with Journal(db) as first:
        first.begin(entries(1))
        with pytest.raises(JournalError, match="in use by another batch"):
            Journal(db)
        first.mark_submitting(0)  # the refused open did not disturb the owner
    with Journal(db) as second:  # released by close()
        assert second.records()[0].state == "submitting"


def test_second_writer_is_refused_across_processes(db: Path) -> None:
    holder = textwrap.dedent(
        f"""
        import sys
        from novita_async import Journal
        journal = Journal({str(db)!r})
        print("open", flush=True)
        sys.stdin.readline()
        journal.close()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline().strip() == "open"
        with pytest.raises(JournalError, match="in use"):
            Journal(db)
        with Journal(db, read_only=True) as reader:  # readers are always welcome
            assert reader.records() == []
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
    Journal(db).close()


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_second_writer_through_a_link_is_refused(tmp_path: Path, db: Path, link: str) -> None:
    """Regression: the lock was ``<path>-lock`` per path, so a link to the same file got
    its own lock and two batches paid for the same prompts."""
    other = tmp_path / "sub" / "other-name.db"
    other.parent.mkdir()
    with Journal(db) as first:
        first.begin(entries(2))
        if link == "symlink":
            other.symlink_to(db)
        else:
            os.link(db, other)
        with pytest.raises(JournalError, match="in use by another batch"):
            Journal(other)
        first.mark_submitting(0)  # the refused open did not disturb the owner
    with Journal(other) as second:  # released by close(); the link is the same journal
        assert second.records()[0].state == "submitting"
        with pytest.raises(JournalError, match="in use"):
            Journal(db)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inode lock is Linux-only")
def test_second_writer_through_a_hard_link_is_refused_across_processes(
    tmp_path: Path, db: Path
) -> None:
    Journal(db).close()
    other = tmp_path / "hard.db"
    os.link(db, other)
    holder = textwrap.dedent(
        f"""
        import sys
        from novita_async import Journal
        journal = Journal({str(other)!r})
        print("open", flush=True)
        sys.stdin.readline()
        journal.close()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline().strip() == "open"
        with pytest.raises(JournalError, match="in use"):
            Journal(db)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
    Journal(db).close()


def test_a_reader_holding_a_snapshot_does_not_stall_writes(tmp_path: Path, db: Path) -> None:
    """Readers are welcome while a batch writes: another program holding a read
    transaction (here an unfinished SELECT) must not hold up each write (each POST) for
    sqlite's 10 s busy timeout; the checkpoint just lags until the reader is done."""
    with Journal(db) as journal:
        journal.begin(entries(3))
        other = sqlite3.connect(db)
        try:
            rows = other.execute("SELECT idx FROM records")
            rows.fetchone()  # the statement is still running: its snapshot is held
            started = time.monotonic()
            journal.mark_submitting(0)
            journal.mark_submitted(0, "task-0")
            assert time.monotonic() - started < 2.0
            rows.fetchall()
        finally:
            other.close()
        journal.mark_submitting(1)  # no reader any more: checkpointed into the main file
        copy = tmp_path / "copy.db"
        shutil.copyfile(db, copy)  # the main file alone
    with Journal(copy) as copied:
        assert [(r.state, r.task_id) for r in copied.records()] == [
            ("submitted", "task-0"),
            ("submitting", None),
            ("new", None),
        ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inode check is Linux-only")
@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_journal_deleted_or_replaced_while_open_refuses_writes(
    tmp_path: Path, db: Path, how: str
) -> None:
    """sqlite keeps writing into a file unlinked from its path: those writes are lost to
    any rerun (which would create a new journal and pay again), so they are refused."""
    with Journal(db) as journal:
        journal.begin(entries(2))
        journal.mark_submitting(0)
        if how == "deleted":
            for name in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):  # rm batch.db*
                name.unlink(missing_ok=True)
        else:
            other = tmp_path / "other.db"
            Journal(other).close()
            os.replace(other, db)
        with pytest.raises(JournalError, match=how):
            journal.mark_submitted(0, "task-0")
        with pytest.raises(JournalError, match=how):
            journal.mark_submitting(1)
        assert journal.records()[0].state == "submitting"  # reading still works


def test_read_only_journal_sees_live_writes_and_cannot_write(db: Path) -> None:
    with pytest.raises(JournalError, match="no journal"):
        Journal(db, read_only=True)
    with Journal(db) as writer, Journal(db, read_only=True) as reader:
        writer.begin(entries(2))
        assert [r.state for r in reader.records()] == ["new", "new"]
        writer.mark_submitting(1)
        assert reader.get(1) is not None
        assert reader.summary()["submitting"] == 1
        with pytest.raises(JournalError, match="read-only"):
            reader.mark_submitting(0)
        with pytest.raises(JournalError, match="read-only"):
            reader.begin(entries(3))
        assert "read_only=True" in repr(reader)


@pytest.mark.anyio
async def test_usable_from_worker_threads(journal: Journal) -> None:
    journal.begin(entries(20))

    async def step(i: int) -> None:
        await anyio.to_thread.run_sync(journal.mark_submitting, i)
        await anyio.to_thread.run_sync(journal.mark_submitted, i, f"task-{i}")

    async with anyio.create_task_group() as group:
        for i in range(20):
            group.start_soon(step, i)
    assert journal.summary()["submitted"] == 20
    assert {r.task_id for r in journal.records()} == {f"task-{i}" for i in range(20)}


def test_record_is_a_frozen_model() -> None:
    record = JournalRecord(index=0, key="k", state="new", task_id=None, result=None, error=None)
    with pytest.raises(AttributeError):
        record.state = "submitted"  # type: ignore[misc]
    assert not record.is_finished


# --------------------------------------------------------------------------- with the batch engine

FAST = (0.02, 0.1)


def batch(*prompts: str) -> list[Txt2ImgRequest]:
    return [req(p) for p in prompts]


async def run_batch(
    emu: NovitaEmulator, requests: list[Txt2ImgRequest], db: Path, **options: Any
) -> list[BatchItem]:
    async with emu.client() as client:
        return await client.txt2img_all(requests, journal=db, **options)


def tasks_per_prompt(emu: NovitaEmulator) -> Counter[str]:
    return Counter(task.request["prompt"] for task in emu.tasks.values())


@pytest.mark.anyio
async def test_rerun_of_a_finished_batch_comes_from_the_journal(db: Path) -> None:
    emu = NovitaEmulator(durations=FAST)
    requests = batch("a cat", "a dog", "a bird [fail]", "a fish", "a frog")
    first = await run_batch(emu, requests, db)
    assert [item.ok for item in first] == [True, True, False, True, True]
    assert isinstance(first[2].error, TaskFailedError)
    assert emu.submissions == 5
    with Journal(db, read_only=True) as journal:
        assert journal.summary()["succeeded"] == 4
        assert journal.summary()["failed"] == 1
    polls = emu.polls_total

    second = await run_batch(emu, requests, db)
    assert emu.submissions == 5  # no POST
    assert emu.polls_total == polls  # not even a poll
    assert all(item.from_journal for item in second)
    for before, after in zip(first, second, strict=True):
        assert after.index == before.index
        assert after.task_id == before.task_id
        assert after.result == before.result  # TaskResult survives the journal unchanged
    failed = second[2].error
    assert isinstance(failed, TaskFailedError)
    assert failed.task_id == first[2].task_id
    assert failed.reason == "emulated failure"
    assert failed.result.status is TaskStatus.FAILED


@pytest.mark.anyio
async def test_submitted_tasks_are_waited_for_not_resubmitted(db: Path) -> None:
    emu = NovitaEmulator(durations=FAST)
    requests = batch("one", "two", "three", "four")
    async with emu.client() as client:
        with Journal(db) as journal:  # what a run killed after two POSTs leaves behind
            journal.begin([(i, request_key(r, None)) for i, r in enumerate(requests)])
            task_ids = []
            for i in (0, 1):
                journal.mark_submitting(i)
                task_ids.append(await client.submit_txt2img(requests[i]))
                journal.mark_submitted(i, task_ids[-1])
    assert emu.submissions == 2

    items = await run_batch(emu, requests, db)
    assert emu.submissions == 4  # only the two never sent
    assert tasks_per_prompt(emu) == Counter(r.prompt for r in requests)
    assert [item.ok for item in items] == [True] * 4
    assert [items[0].task_id, items[1].task_id] == task_ids
    with Journal(db, read_only=True) as journal:
        records = journal.records()
    assert [r.state for r in records] == ["succeeded"] * 4
    assert [r.attempts for r in records] == [1] * 4
    assert [r.task_id for r in records] == [item.task_id for item in items]


@pytest.mark.anyio
async def test_uncertain_submission_is_reported_until_the_user_opts_in(db: Path) -> None:
    emu = NovitaEmulator(durations=FAST)
    requests = batch("lost answer", "fine", "also fine")
    emu.fail_next("txt2img", reset=True, after_create=True)  # task created, answer lost
    first = await run_batch(emu, requests, db, max_concurrent_submissions=1)
    assert isinstance(first[0].error, SubmissionUncertainError)
    assert first[0].task_id is None
    assert [first[1].ok, first[2].ok] == [True, True]
    assert emu.tasks_created == 3  # the lost answer's task exists (and is billed)

    second = await run_batch(emu, requests, db)
    assert emu.submissions == 3  # reported again, not resubmitted
    assert isinstance(second[0].error, SubmissionUncertainError)
    assert second[0].from_journal
    assert [second[1].task_id, second[2].task_id] == [first[1].task_id, first[2].task_id]
    with Journal(db, read_only=True) as journal:
        assert journal.records()[0].state == "uncertain"

    third = await run_batch(emu, requests, db, resubmit_uncertain=True)
    assert emu.submissions == 4
    assert third[0].ok
    assert tasks_per_prompt(emu)["lost answer"] == 2  # the documented price of opting in
    with Journal(db, read_only=True) as journal:
        record = journal.records()[0]
    assert (record.state, record.attempts, record.task_id) == ("succeeded", 2, third[0].task_id)


@pytest.mark.anyio
async def test_a_post_interrupted_by_a_crash_is_treated_as_uncertain(db: Path) -> None:
    emu = NovitaEmulator(durations=FAST)
    requests = batch("was in flight", "never sent")
    with Journal(db) as journal:  # the process died between mark_submitting and the answer
        journal.begin([(i, request_key(r, None)) for i, r in enumerate(requests)])
        journal.mark_submitting(0)
    items = await run_batch(emu, requests, db)
    assert emu.submissions == 1
    assert tasks_per_prompt(emu) == Counter({"never sent": 1})
    assert isinstance(items[0].error, SubmissionUncertainError)
    assert "interrupted during the POST" in str(items[0].error)
    assert items[1].ok
    with Journal(db, read_only=True) as journal:
        assert [r.state for r in journal.records()] == ["uncertain", "succeeded"]


@pytest.mark.anyio
async def test_rejected_prompts_are_sent_again_on_rerun(db: Path) -> None:
    emu = NovitaEmulator(durations=FAST)
    requests = batch("refused once", "fine")
    emu.fail_next("txt2img", status=400, reason="ILLEGAL_PROMPT")  # certainly no task
    first = await run_batch(emu, requests, db, max_concurrent_submissions=1)
    assert isinstance(first[0].error, BadRequestError)
    with Journal(db, read_only=True) as journal:
        assert journal.records()[0].state == "rejected"
    second = await run_batch(emu, requests, db)
    assert second[0].ok
    assert second[1].task_id == first[1].task_id
    assert tasks_per_prompt(emu) == Counter(r.prompt for r in requests)


@pytest.mark.anyio
async def test_a_crash_while_backing_off_after_429_is_not_uncertain(db: Path) -> None:
    emu = NovitaEmulator(durations=FAST)
    requests = batch("throttled")
    emu.fail_next("txt2img", status=429, retry_after=30)  # certainly no task
    async with emu.client() as client:
        with anyio.move_on_after(0.3):  # "killed" while waiting to resend
            await client.txt2img_all(requests, journal=db)
    assert emu.tasks_created == 0
    with Journal(db, read_only=True) as journal:
        (record,) = journal.records()
    assert record.state == "rejected"  # not "submitting": a rerun may send it
    assert record.error is not None
    assert "429" in record.error
    items = await run_batch(emu, requests, db)
    assert items[0].ok
    assert emu.tasks_created == 1


@pytest.mark.anyio
async def test_timed_out_wait_keeps_the_task_for_the_next_run(db: Path) -> None:
    emu = NovitaEmulator(durations=0.4)
    requests = batch("slow")
    first = await run_batch(emu, requests, db, timeout=0.05)
    assert isinstance(first[0].error, TaskTimeoutError)
    with Journal(db, read_only=True) as journal:
        assert journal.records()[0].state == "submitted"
    second = await run_batch(emu, requests, db)
    assert second[0].ok
    assert second[0].task_id == first[0].task_id
    assert emu.submissions == 1


@pytest.mark.anyio
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inode check is Linux-only")
async def test_a_batch_stops_when_its_journal_is_deleted(db: Path) -> None:
    """``rm batch.db*`` while a batch runs: no POST may follow whose record a rerun cannot
    find (the rerun would start a fresh journal and pay for it again)."""
    emu = NovitaEmulator(durations=FAST)
    emu.fail_next("txt2img", status=None, delay=1.0)  # the first POST's answer is slow
    requests = batch("one", "two", "three")
    with anyio.fail_after(10):
        async with emu.client() as client:
            run = client.txt2img_many(requests, journal=db, max_concurrent_submissions=1)
            async with run:
                while emu.submissions == 0:  # the first POST is on its way (1 s)
                    await anyio.sleep(0.01)
                await anyio.sleep(0.1)
                for name in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                    name.unlink(missing_ok=True)
                with pytest.raises(JournalError, match="deleted"):
                    async for _ in run:
                        pass
    assert emu.submissions == 1  # "two" and "three" were never sent


@pytest.mark.anyio
async def test_journal_of_another_batch_or_in_use_is_refused(db: Path) -> None:
    emu = NovitaEmulator(durations=FAST)
    await run_batch(emu, batch("a", "b"), db)
    with pytest.raises(JournalMismatchError, match="different batch"):
        await run_batch(emu, batch("a", "something else"), db)
    with pytest.raises(JournalMismatchError):  # same prompts, different extra
        await run_batch(emu, batch("a", "b"), db, extra=Extra(response_image_type="webp"))
    with Journal(db), pytest.raises(JournalError, match="in use"):
        await run_batch(emu, batch("a", "b"), db)
    assert emu.submissions == 2
    longer = await run_batch(emu, batch("a", "b", "c"), db)  # appending is fine
    assert [item.from_journal for item in longer] == [True, True, False]
    assert emu.submissions == 3
