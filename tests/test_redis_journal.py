"""RedisJournal against a real redis-server: the sqlite Journal's state machine and errors,
the lease (refusal, expiry, takeover, renewal), kill -9 of a writer finished by another
process, Redis restarts, and the asyncio-only guard."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
import trio
from _redis_server import HOLD_REDIS, RedisServer

from novita_async import Journal, JournalError, JournalMismatchError, JournalRecord, TaskResult
from novita_async._convert import task_result
from novita_async.redis import RedisJournal
from novita_async.testing import NovitaEmulator

WRITER = Path(__file__).with_name("_redis_journal_writer.py")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client is asyncio-only (see test_trio_is_refused_clearly)


@pytest.fixture
async def journal(redis_url: str, redis_key: str) -> AsyncIterator[RedisJournal]:
    async with RedisJournal(redis_url, redis_key, lease=5) as journal:
        yield journal


async def refused(url: str, name: str) -> str:
    """The error opening ``name`` again gives (closing what was opened)."""
    with pytest.raises(JournalError) as info:
        async with RedisJournal(url, name):
            pass
    return str(info.value)


async def read(url: str, name: str) -> list[JournalRecord]:
    """The records, read by a journal that is never opened (reading needs no lease)."""
    journal = RedisJournal(url, name)
    try:
        return await journal.records()
    finally:
        await journal.aclose()


def a_result(task_id: str = "T1") -> TaskResult:
    return task_result(
        {
            "task": {"task_id": task_id, "status": "TASK_STATUS_SUCCEED", "eta": 0},
            "extra": {"seed": "42"},
            "images": [{"image_url": "https://img.example/a.png", "image_type": "png"}],
        }
    )


# ------------------------------------------------------------------ same contract as sqlite

OPS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("mark_submitting", (), {}),
    ("mark_submitted", ("T1",), {}),
    ("mark_submitted", ("T2",), {}),
    ("mark_uncertain", ("maybe",), {}),
    ("mark_rejected", ("no",), {}),
    ("mark_finished", (), {"result": a_result(), "error": None}),
    ("mark_finished", (), {"result": None, "error": "boom"}),
]


async def replay(journal: Journal | RedisJournal, index: int, path: tuple[int, ...]) -> list[str]:
    results = []
    for step in path:
        name, args, kwargs = OPS[step]
        try:
            returned = getattr(journal, name)(index, *args, **kwargs)
            if isinstance(journal, RedisJournal):
                await returned
            results.append("ok")
        except JournalError as exc:
            results.append(f"JournalError: {exc}")
    return results


@pytest.mark.anyio
async def test_every_transition_and_error_matches_the_sqlite_journal(
    tmp_path: Path, redis_url: str, redis_key: str
) -> None:
    # Sequences of marks on one record: the same outcome and message as sqlite.
    def sequences(length: int) -> list[tuple[int, ...]]:
        return list(itertools.product(range(len(OPS)), repeat=length))

    # From "new" only submitting (0) and rejected (4) are allowed: follow those further.
    paths = [*sequences(2), *((0, *p) for p in sequences(3)), *((4, *p) for p in sequences(2))]
    sqlite = Journal(tmp_path / "j.db")
    async with RedisJournal(redis_url, redis_key) as redis_journal:
        entries = [(i, f"key{i}") for i in range(len(paths))]
        sqlite.begin(entries)
        await redis_journal.begin(entries)
        differences = []
        for index, path in enumerate(paths):
            expected = await replay(sqlite, index, path)
            got = await replay(redis_journal, index, path)
            for step, (want, have) in enumerate(zip(expected, got, strict=True)):
                if want != have:
                    differences.append((path, step, want, have))
        # The one deliberate difference: the identical outcome recorded again is accepted
        # (redis-py retries a call whose reply was lost, when the script may have run).
        assert differences
        for path, step, want, have in differences:
            assert path[step] == path[step - 1]
            assert OPS[path[step]][0] == "mark_finished"
            state = "succeeded" if path[step] == 5 else "failed"
            assert want.endswith(f"cannot go from {state!r} to {state!r}")
            assert have == "ok"
        mine = {r.index: r for r in await redis_journal.records()}
        for theirs in sqlite.records():
            ours = mine[theirs.index]
            assert (ours.state, ours.task_id, ours.result, ours.error, ours.attempts) == (
                theirs.state, theirs.task_id, theirs.result, theirs.error, theirs.attempts
            ), theirs.index  # fmt: skip
    sqlite.close()
    assert {r.state for r in mine.values()} == {
        "new", "submitting", "submitted", "uncertain", "rejected", "succeeded", "failed"
    }  # fmt: skip


@pytest.mark.anyio
async def test_begin_returns_records_and_refuses_another_batch(journal: RedisJournal) -> None:
    first = await journal.begin([(0, "a"), (1, "b")])
    assert [(r.index, r.key, r.state, r.attempts) for r in first.values()] == [
        (0, "a", "new", 0), (1, "b", "new", 0)
    ]  # fmt: skip
    assert first[0].created_at > 1e9  # Unix time, from the Redis server
    await journal.mark_submitting(0)
    await journal.mark_submitted(0, "T0")
    again = await journal.begin([(0, "a"), (2, "c")])
    assert (again[0].state, again[0].task_id, again[2].state) == ("submitted", "T0", "new")
    assert 1 not in again
    with pytest.raises(JournalMismatchError) as info:
        await journal.begin([(2, "c"), (1, "other")])
    assert (info.value.index, info.value.stored_key, info.value.key) == (1, "b", "other")
    with pytest.raises(ValueError, match="twice"):
        await journal.begin([(5, "x"), (5, "y")])
    assert [r.index for r in await journal.records()] == [0, 1, 2]  # nothing written


@pytest.mark.anyio
async def test_result_and_timestamps_round_trip(journal: RedisJournal) -> None:
    await journal.begin([(0, "a")])
    await journal.mark_submitting(0)
    await journal.mark_submitting(0)
    await journal.mark_submitted(0, "T1")
    await journal.mark_finished(0, result=a_result(), error=None)
    await journal.mark_finished(0, result=a_result(), error=None)  # a retried call: same outcome
    record = await journal.get(0)
    assert record is not None
    assert record == JournalRecord(
        index=0, key="a", state="succeeded", task_id="T1", result=a_result(), error=None,
        attempts=2, created_at=record.created_at, updated_at=record.updated_at,
    )  # fmt: skip
    assert record.is_finished
    assert record.updated_at >= record.created_at
    with pytest.raises(JournalError, match="cannot go from 'succeeded' to 'failed'"):
        await journal.mark_finished(0, result=None, error="late")
    assert await journal.get(7) is None


@pytest.mark.anyio
async def test_marks_need_an_open_journal(redis_url: str, redis_key: str) -> None:
    journal = RedisJournal(redis_url, redis_key)
    with pytest.raises(JournalError, match="not open"):
        await journal.begin([(0, "a")])
    with pytest.raises(ValueError):
        RedisJournal(redis_url, "")
    with pytest.raises(ValueError):
        RedisJournal(redis_url, "x", lease=0)
    with pytest.raises(TypeError):
        RedisJournal(42, "x")  # type: ignore[arg-type]
    await journal.aclose()


# ------------------------------------------------------------------ the lease


@pytest.mark.anyio
async def test_a_second_live_run_is_refused(redis_url: str, redis_key: str) -> None:
    async with RedisJournal(redis_url, redis_key) as first:
        await first.begin([(0, "a")])
        assert "in use by another run" in await refused(redis_url, redis_key)
        with pytest.raises(JournalError, match="already open"):
            await first.open()
        assert [r.state for r in await read(redis_url, redis_key)] == ["new"]
    async with RedisJournal(redis_url, redis_key) as third:  # released by the first
        await third.mark_submitting(0)


@pytest.mark.anyio
async def test_an_open_cancelled_while_taking_the_lease_does_not_keep_it(
    redis_url: str, redis_key: str
) -> None:
    # Cancelled after its SET NX was sent, before the answer: Redis still takes the lease,
    # for a token nobody knew any more, so the name was refused ("in use by another run")
    # until the lease expired, also to the rerun of the batch just cancelled.
    other = aioredis.Redis.from_url(redis_url)
    journal = RedisJournal(redis_url, redis_key, lease=30)
    try:
        await journal.records()  # connection open
        async with anyio.create_task_group() as tg:
            tg.start_soon(other.eval, HOLD_REDIS, 0, "0.5")  # type: ignore[arg-type]
            await anyio.sleep(0.1)
            with anyio.move_on_after(0.1) as scope:
                await journal.open()  # sent, answered only once Redis is free again
            assert scope.cancelled_caught
        await journal.aclose()
        with anyio.fail_after(5):
            async with RedisJournal(redis_url, redis_key) as rerun:
                await rerun.begin([(0, "a")])
    finally:
        await journal.aclose()
        await other.aclose()


class _ReplyDropper:
    """A loopback proxy to Redis that can cut a connection instead of passing on a reply
    (the command ran; its answer is lost, as when a connection breaks at that moment)."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.drop = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.redis_port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, replies: bool) -> None:
            while data := await r.read(65536):
                if replies and self.drop:
                    self.drop -= 1
                    client_w.transport.abort()
                    server_w.close()
                    return
                w.write(data)
                await w.drain()
            w.close()

        with contextlib.suppress(Exception, asyncio.CancelledError):  # torn down
            await asyncio.gather(pipe(client_r, server_w, False), pipe(server_r, client_w, True))


@pytest.mark.anyio
async def test_open_whose_answer_was_lost_recognises_its_own_lease(
    redis_server: RedisServer, redis_key: str
) -> None:
    # The SET NX ran but its answer was lost: redis-py (or open's second try) sends it again,
    # finds the lease taken (by this very open) and open said "in use by another run",
    # leaving the name locked for a whole lease.
    proxy = _ReplyDropper(redis_server.port)
    async with proxy as url:
        journal = RedisJournal(url, redis_key, lease=30)
        try:
            await journal.records()  # connection open
            proxy.drop = 1
            with anyio.fail_after(10):
                await journal.open()
            await journal.begin([(0, "a")])
        finally:
            await journal.aclose()
        assert "in use by another run" not in str(await read(redis_server.url, redis_key))
        async with RedisJournal(redis_server.url, redis_key) as rerun:  # released
            await rerun.mark_submitting(0)


@pytest.mark.anyio
async def test_an_expired_lease_is_taken_over_and_the_old_writer_stopped(
    redis_url: str, redis_key: str
) -> None:
    stalled = RedisJournal(redis_url, redis_key, lease=0.2)
    await stalled.open()
    await stalled.begin([(0, "a"), (1, "b")])
    await anyio.sleep(0.4)  # no keepalive: the lease runs out
    async with RedisJournal(redis_url, redis_key, lease=5) as successor:
        await successor.mark_submitting(0)
        with pytest.raises(JournalError, match="lost its lease"):
            await stalled.mark_submitting(1)
        with pytest.raises(JournalError, match="lost its lease"):
            await stalled.begin([(0, "a")])
        await stalled.aclose()  # must not release the successor's lease
        assert "in use" in await refused(redis_url, redis_key)
    assert [r.state for r in await read(redis_url, redis_key)] == ["submitting", "new"]


@pytest.mark.anyio
async def test_keepalive_holds_the_lease_and_reports_losing_it(
    redis_url: str, redis_key: str
) -> None:
    journal = RedisJournal(redis_url, redis_key, lease=0.3)
    await journal.open()
    unopened = RedisJournal(redis_url, redis_key)
    with pytest.raises(JournalError, match="not open"):
        await unopened.keepalive()
    await unopened.aclose()
    async with anyio.create_task_group() as tg:
        tg.start_soon(journal.keepalive)
        await anyio.sleep(1.0)  # three lease periods
        assert "in use" in await refused(redis_url, redis_key)
        await journal.begin([(0, "a")])
        tg.cancel_scope.cancel()
    async with RedisJournal(redis_url, "unused") as other:  # steal the lease behind its back
        await other._redis.client.set(f"{{{redis_key}}}:lease", "someone else")
    with pytest.raises(JournalError, match="lost its lease"):
        await journal.keepalive()
    await journal.aclose()


# ------------------------------------------------------------------ crashes and restarts


def run_writer(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WRITER), *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )


def finish(process: subprocess.Popen[str]) -> int:
    code = process.wait()
    assert process.stdout is not None
    process.stdout.close()
    return code


async def read_line(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    with anyio.fail_after(30):
        line = await anyio.to_thread.run_sync(process.stdout.readline)
    assert line, "the writer died"
    return dict(json.loads(line))


@pytest.mark.anyio
async def test_kill_9_of_a_writer_and_another_process_finishing(
    redis_url: str, redis_key: str
) -> None:
    prompts = 12
    emu = NovitaEmulator(durations=0.0)
    async with emu.serve() as server:
        common = [redis_url, redis_key, server.base_url, emu.api_key, str(prompts)]
        # First run: stops forever right after journaling prompt 6 as submitting (its POST
        # not sent), having paid for 0-5; killed there.
        first = run_writer(*common, "--stop-at", "6", "--lease", "1.0")
        assert await read_line(first) == {"event": "stopped", "index": 6}
        first.send_signal(signal.SIGKILL)
        assert finish(first) == -signal.SIGKILL
        assert emu.tasks_created == 6
        # A second run is refused while the dead run's lease lasts, then takes over.
        blocked = run_writer(*common, "--lease", "1.0")
        assert await read_line(blocked) == {"event": "refused"}
        assert finish(blocked) == 0
        await anyio.sleep(1.1)
        second = run_writer(*common, "--lease", "1.0")
        summary = await read_line(second)
        assert finish(second) == 0
    assert summary["event"] == "done"
    # Everything paid before the kill was kept (waited for, not paid again), everything
    # unsent was sent once; the prompt killed mid-POST is reported, not sent again.
    assert summary["posted"] == prompts - 6 - 1
    assert summary["uncertain"] == [6]
    assert emu.tasks_created == prompts - 1
    created = sorted(t.request["prompt"] for t in emu.tasks.values())
    assert created == sorted(f"prompt {i}" for i in range(prompts) if i != 6)
    records = await read(redis_url, redis_key)
    assert [r.state for r in records].count("succeeded") == prompts - 1
    assert {r.task_id for r in records if r.task_id} == set(emu.tasks)


@pytest.mark.anyio
async def test_redis_restart_mid_run_is_a_clear_error_and_nothing_is_lost(
    restartable_redis: RedisServer, redis_key: str
) -> None:
    journal = RedisJournal(restartable_redis.url, redis_key, lease=30)
    await journal.open()
    await journal.begin([(0, "a"), (1, "b")])
    await journal.mark_submitting(0)
    await journal.mark_submitted(0, "T0")
    restartable_redis.stop()
    with pytest.raises(JournalError, match="unreachable"):
        await journal.mark_submitting(1)  # refused: the POST will not be sent
    restartable_redis.start()
    # The append-only file kept the records and the lease: the same run carries on.
    await journal.mark_submitting(1)
    await journal.mark_submitted(1, "T1")
    records = await journal.records()
    assert [(r.state, r.task_id) for r in records] == [("submitted", "T0"), ("submitted", "T1")]
    await journal.aclose()


@pytest.mark.anyio
async def test_a_redis_that_lost_everything_stops_the_run(
    redis_server: RedisServer, tmp_path: Path, redis_key: str
) -> None:
    server = RedisServer(tmp_path / "r")  # nothing persisted
    server.start()
    try:
        journal = RedisJournal(server.url, redis_key)
        await journal.open()
        await journal.begin([(0, "a")])
        server.restart()
        with pytest.raises(JournalError, match="lost its lease"):
            await journal.mark_submitting(0)
        await journal.aclose()
    finally:
        server.stop()


def test_trio_is_refused_clearly(redis_url: str) -> None:
    async def main() -> None:
        await RedisJournal(redis_url, "x").open()

    with pytest.raises(RuntimeError, match=r"needs asyncio.*trio"):
        trio.run(main)
