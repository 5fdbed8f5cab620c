"""Kill a journaled batch mid-flight (another process, real loopback), restart it, and check
that no prompt was paid twice and every result was delivered.

The emulator runs in this test's process (``emu.serve()``), so it can count the tasks
created per prompt. The batch runs in a child (tests/_crash_batch.py), which lets the
first ``HOLD_AFTER`` POSTs through and then holds every further POST *before it is sent*.
The test kills the child only once the journal shows every POST that reached the
emulator as ``submitted`` (with its task_id), at least one result finished and at least
one held POST journaled as ``submitting``. So the kill lands deterministically at the
worst moment for a journal: some tasks paid and running, some finished, some prompts
"mid-POST" (their POST certainly never arrived — the test checks that), the rest unsent.

Runs:
1. killed as above: SIGKILL (asyncio child), or SIGINT (trio child), where the batch is
   cancelled gracefully and the held POSTs fail as never sent;
2. rerun, same journal: finished prompts come from the journal (no POST, no poll),
   submitted ones are waited for (no POST), unsent ones are submitted once. The
   "mid-POST" ones of a SIGKILL are left ``submitting``: they are REPORTED
   (SubmissionUncertainError) and not submitted. After SIGINT they are ``rejected``
   (the batch saw the POSTs fail before sending) and are submitted;
3. rerun with ``--resubmit-uncertain``: only the uncertain ones are submitted.
Finally every prompt has exactly one task at the emulator, every result was delivered
and the journal agrees with the emulator.
"""

from __future__ import annotations

import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from _support import JsonLinesChild, run_child

from novita_async import Journal, JournalError, JournalRecord
from novita_async.testing import NovitaEmulator

SCRIPT = Path(__file__).with_name("_crash_batch.py")
PROMPTS = 24
HOLD_AFTER = 10
CONCURRENCY = 4
STEP_TIMEOUT = 20.0  # seconds for any single wait; the whole test takes a few seconds


@pytest.fixture
def anyio_backend() -> str:
    # The backend of the *emulator* (this process); the child's backend is a parameter.
    return "asyncio"


def prompt(index: int) -> str:
    return f"crash prompt {index:02d}"


class Child(JsonLinesChild):
    """A running tests/_crash_batch.py: its JSON lines, as they arrive."""

    def items(self) -> dict[int, dict[str, Any]]:
        found: dict[int, dict[str, Any]] = {}
        for line in self.lines:
            if line["event"] == "item":
                assert line["index"] not in found, f"item {line['index']} delivered twice"
                found[line["index"]] = line
        return found


@asynccontextmanager
async def child(base_url: str, api_key: str, journal: Path, *extra: str) -> AsyncIterator[Child]:
    command = [
        sys.executable,
        str(SCRIPT),
        "--base-url",
        base_url,
        "--api-key",
        api_key,
        "--journal",
        str(journal),
        "--prompts",
        str(PROMPTS),
        "--concurrency",
        str(CONCURRENCY),
        *extra,
    ]
    async with run_child(command, Child) as running:
        yield running


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    try:
        with anyio.fail_after(STEP_TIMEOUT):
            while not condition():
                await anyio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def read_journal(path: Path, *, starting: bool = False) -> list[JournalRecord]:
    """The journal's records (read-only: works while the child writes it)."""
    try:
        with Journal(path, read_only=True) as journal:
            return journal.records()
    except JournalError:
        if starting:  # the child has not created the file (or its schema) yet
            return []
        raise


def tasks_per_prompt(emu: NovitaEmulator) -> Counter[str]:
    return Counter(task.request["prompt"] for task in emu.tasks.values())


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("sig", "backend"),
    [(signal.SIGKILL, "asyncio"), (signal.SIGINT, "trio")],
    ids=["sigkill-asyncio", "sigint-trio"],
)
async def test_killed_batch_resumes_without_paying_twice(
    tmp_path: Path, sig: signal.Signals, backend: str
) -> None:
    db = tmp_path / "batch.db"
    emu = NovitaEmulator(durations=(0.3, 2.0), seed=7)
    everything = set(range(PROMPTS))
    async with emu.serve() as server:
        url, key = server.base_url, emu.api_key

        # ---- run 1: kill it while tasks are paid, running, finished and "mid-POST"
        def ripe() -> bool:
            records = read_journal(db, starting=True)
            states = Counter(r.state for r in records)
            return (
                emu.tasks_created == HOLD_AFTER
                and sum(r.task_id is not None for r in records) == HOLD_AFTER
                and states["submitting"] >= 1
                and states["submitted"] >= 1
                and states["succeeded"] >= 1
            )

        async with child(url, key, db, "--hold-after", str(HOLD_AFTER), "--backend", backend) as c:
            await wait_for(ripe, "a journal with submitted, finished and mid-POST prompts")
            c.process.send_signal(sig)
            code = await c.wait()
        assert code == (-signal.SIGKILL if sig is signal.SIGKILL else 130), c.stderr

        after_kill = {r.index: r for r in read_journal(db)}
        assert sorted(after_kill) == sorted(everything)

        def having(*states: str) -> set[int]:
            return {i for i, r in after_kill.items() if r.state in states}

        paid = {i for i, r in after_kill.items() if r.task_id is not None}
        done_before, waiting = having("succeeded"), having("submitted")
        # Mid-POST prompts. Killed (-9): still "submitting", so uncertain on rerun. Interrupted:
        # their POSTs failed as never sent before the batch stopped, so "rejected": certainly
        # no task, and a rerun sends them without being asked.
        uncertain, rejected = having("submitting", "uncertain"), having("rejected")
        held = uncertain | rejected
        assert len(paid) == HOLD_AFTER
        assert done_before  # the kill really landed mid-batch
        assert waiting
        assert held
        assert (uncertain if sig is signal.SIGKILL else rejected) == held
        assert all(r.attempts == 1 for i, r in after_kill.items() if i in paid | held)
        unsent = everything - paid - held
        assert all(after_kill[i].state == "new" and after_kill[i].attempts == 0 for i in unsent)
        # the premise of the held prompts: their POST never reached the emulator
        per_prompt = tasks_per_prompt(emu)
        assert sum(per_prompt.values()) == HOLD_AFTER
        assert all(per_prompt[prompt(i)] == 1 for i in paid)
        assert not any(per_prompt[prompt(i)] for i in held)
        polls_of_done = {i: emu.polls[after_kill[i].task_id or ""] for i in done_before}

        # ---- run 2: same journal; resume, never resubmit; uncertain ones are reported
        submissions = emu.submissions
        async with child(url, key, db, "--backend", backend) as c:
            code = await c.wait()
        assert code == 0, c.stderr
        assert c.lines[-1]["event"] == "done"
        items = c.items()
        assert sorted(items) == sorted(everything)  # every prompt reported exactly once
        # POSTs only for prompts that certainly have no task
        assert emu.submissions - submissions == len(unsent | rejected)
        per_prompt = tasks_per_prompt(emu)
        for i in everything:
            assert per_prompt[prompt(i)] == (0 if i in uncertain else 1), i
        for i in uncertain:
            assert items[i]["error_type"] == "SubmissionUncertainError", items[i]
            assert items[i]["task_id"] is None
        for i in everything - uncertain:
            assert items[i]["status"] == "TASK_STATUS_SUCCEED", items[i]
            assert items[i]["error"] is None
            assert emu.tasks[items[i]["task_id"]].request["prompt"] == prompt(i)
        for i in paid:  # resumed or stored: the task created before the kill
            assert items[i]["task_id"] == after_kill[i].task_id
        for i, polls in polls_of_done.items():  # stored results: not even polled again
            assert emu.polls[after_kill[i].task_id or ""] == polls
        second = {r.index: r for r in read_journal(db)}
        assert {i for i, r in second.items() if r.state == "succeeded"} == everything - uncertain
        assert all(second[i].state == "uncertain" for i in uncertain)

        # ---- run 3: the user opts in to resubmitting the uncertain prompts (only those)
        submissions = emu.submissions
        async with child(url, key, db, "--backend", backend, "--resubmit-uncertain") as c:
            code = await c.wait()
        assert code == 0, c.stderr
        items = c.items()
        assert sorted(items) == sorted(everything)
        assert emu.submissions - submissions == len(uncertain)

    # ---- every prompt: exactly one task, its result delivered, journal == emulator
    assert emu.tasks_created == PROMPTS
    assert tasks_per_prompt(emu) == Counter(prompt(i) for i in everything)
    final = read_journal(db)
    assert [r.state for r in final] == ["succeeded"] * PROMPTS
    assert {r.task_id for r in final} == set(emu.tasks)
    for record in final:
        assert record.task_id is not None
        assert emu.tasks[record.task_id].request["prompt"] == prompt(record.index)
        assert record.result is not None
        assert record.result.task_id == record.task_id
        assert items[record.index]["task_id"] == record.task_id
        assert items[record.index]["status"] == "TASK_STATUS_SUCCEED"
        # one POST per prompt, plus the one that was held (and never reached Novita)
        assert record.attempts == (2 if record.index in held else 1)
