"""The async journal protocol the batch engine calls, and its threaded adapter (both backends)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from _support import MODEL

from novita_async import Journal, JournalError, JournalRecord, Txt2ImgRequest, request_key
from novita_async._convert import task_result
from novita_async._journal import AsyncJournal, as_async_journal
from novita_async._results import TaskResult

pytestmark = pytest.mark.anyio


def entries(n: int) -> list[tuple[int, str]]:
    requests = [Txt2ImgRequest(model_name=MODEL, prompt=f"p{i}") for i in range(n)]
    return [(i, request_key(request, None)) for i, request in enumerate(requests)]


def states(db: Path) -> list[tuple[str, str | None]]:
    with Journal(db, read_only=True) as reader:
        return [(r.state, r.task_id) for r in reader.records()]


async def test_a_path_is_opened_and_closed_by_the_adapter(tmp_path: Path) -> None:
    db = tmp_path / "batch.db"
    journal, owned = as_async_journal(db)
    assert owned
    assert isinstance(journal, AsyncJournal)
    with pytest.raises(JournalError, match="not open"):
        await journal.begin(entries(1))
    assert not db.exists()  # nothing happens before open()
    await journal.open()
    try:
        with pytest.raises(JournalError, match="in use"):
            Journal(db)  # open() took the writer lock
        records = await journal.begin(entries(4))
        assert sorted(records) == [0, 1, 2, 3]
        await journal.mark_submitting(0)
        await journal.mark_submitted(0, "task-0")
        await journal.mark_finished(
            0, result=task_result({"task": {"task_id": "task-0"}}), error=None
        )
        await journal.mark_submitting(1)
        await journal.mark_uncertain(1, "read timeout")
        await journal.mark_rejected(2, "HTTP 400")
        assert states(db) == [
            ("succeeded", "task-0"),
            ("uncertain", None),
            ("rejected", None),
            ("new", None),
        ]
    finally:
        await journal.aclose()
    await journal.aclose()  # idempotent
    Journal(db).close()  # the lock was released
    await journal.open()  # an owned adapter can be opened again (a second engine run)
    try:
        again = await journal.begin(entries(4))
        assert again[0].state == "succeeded"
    finally:
        await journal.aclose()


async def test_a_user_journal_is_used_but_never_closed(tmp_path: Path) -> None:
    db = tmp_path / "batch.db"
    with Journal(db) as mine:
        journal, owned = as_async_journal(mine)
        assert not owned
        await journal.open()  # nothing to do
        await journal.begin(entries(2))
        await journal.mark_submitting(1)
        await journal.aclose()  # not the adapter's to close
        assert not mine.closed
        assert mine.get(1) is not None
        assert [r.state for r in mine.records()] == ["new", "submitting"]


async def test_an_async_journal_passes_through_and_junk_is_refused() -> None:
    class Memory:
        async def open(self) -> None: ...

        async def aclose(self) -> None: ...

        async def begin(self, entries: Sequence[tuple[int, str]]) -> dict[int, JournalRecord]:
            return {}

        async def mark_submitting(self, index: int) -> None: ...

        async def mark_submitted(self, index: int, task_id: str) -> None: ...

        async def mark_uncertain(self, index: int, message: str) -> None: ...

        async def mark_rejected(self, index: int, message: str) -> None: ...

        async def mark_finished(
            self, index: int, *, result: TaskResult | None, error: str | None
        ) -> None: ...

    memory = Memory()
    assert as_async_journal(memory) == (memory, False)
    with pytest.raises(TypeError, match="journal must be"):
        as_async_journal(42)  # type: ignore[arg-type]


async def test_writes_complete_even_when_the_caller_is_cancelled(tmp_path: Path) -> None:
    db = tmp_path / "batch.db"
    journal, _ = as_async_journal(str(db))
    await journal.open()
    try:
        await journal.begin(entries(1))
        with anyio.CancelScope() as scope:
            scope.cancel()
            await journal.mark_submitting(0)  # shielded: written although cancelled
            await anyio.sleep(1)  # the cancellation lands here, after the write
        assert scope.cancelled_caught
        assert states(db) == [("submitting", None)]
    finally:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await journal.aclose()  # closing is shielded too
    Journal(db).close()


async def test_concurrent_writes_from_many_tasks(tmp_path: Path) -> None:
    db = tmp_path / "batch.db"
    journal, _ = as_async_journal(db)
    await journal.open()
    try:
        await journal.begin(entries(20))

        async def one(i: int) -> None:
            await journal.mark_submitting(i)
            await journal.mark_submitted(i, f"task-{i}")

        async with anyio.create_task_group() as group:
            for i in range(20):
                group.start_soon(one, i)
    finally:
        await journal.aclose()
    assert states(db) == [("submitted", f"task-{i}") for i in range(20)]
