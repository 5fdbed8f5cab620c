"""The ``novita-async`` command line: ``demo`` offline, ``generate`` against the emulator."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from novita_async import Txt2ImgRequest
from novita_async._cli import DEMO_PROMPTS, Job, Progress, amain, main, run_job
from novita_async.testing import NovitaEmulator

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

FAST = ["--durations", "0.01", "0.05", "--no-progress"]


def images_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


# --------------------------------------------------------------------------- demo


def test_demo_saves_every_image_and_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *FAST]) == 0
    stdout = capsys.readouterr().out
    names = images_in(out)
    assert len(names) == len(DEMO_PROMPTS)
    assert all(name.endswith("-0.png") for name in names)
    assert names[0].startswith("01-a_red_fox")  # ordered by prompt, readable
    assert (out / names[0]).read_bytes().startswith(b"\x89PNG")
    assert f"{len(DEMO_PROMPTS)} prompts: {len(DEMO_PROMPTS)} succeeded, 0 failed" in stdout
    assert f"{len(DEMO_PROMPTS)} images saved to {out.resolve()}" in stdout
    assert "no API key, no network" in stdout


def test_demo_with_failure_reports_it_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--with-failure", "--out", str(out), *FAST]) == 1
    stdout = capsys.readouterr().out
    assert len(images_in(out)) == len(DEMO_PROMPTS)  # the others were all saved
    assert f"{len(DEMO_PROMPTS) + 1} prompts: {len(DEMO_PROMPTS)} succeeded, 1 failed" in stdout
    assert "Failed prompts:" in stdout
    assert "emulated failure" in stdout


def test_demo_runs_on_trio(tmp_path: Path) -> None:
    assert main(["demo", "--backend", "trio", "--out", str(tmp_path), *FAST]) == 0
    assert len(images_in(tmp_path)) == len(DEMO_PROMPTS)


def test_progress_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--durations", "0.01", "0.05"]) == 0
    captured = capsys.readouterr()
    assert f"{len(DEMO_PROMPTS)}/{len(DEMO_PROMPTS)} done" in captured.err
    assert "[########################]" in captured.err
    assert "done" not in captured.out


def test_python_dash_m_demo(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    env.pop("NOVITA_API_KEY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "novita_async", "demo", "--out", str(tmp_path), *FAST],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "succeeded" in proc.stdout
    assert len(images_in(tmp_path)) == len(DEMO_PROMPTS)


# --------------------------------------------------------------------------- generate


async def run_generate(server_url: str, *args: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["generate", "--base-url", server_url, "--no-progress", *args]
    code = await amain(argv, stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.mark.anyio
async def test_generate_over_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOVITA_API_KEY", "emulator-key")
    emu = NovitaEmulator(durations=(0.01, 0.05))
    async with emu.serve() as server:
        code, out, err = await run_generate(
            server.base_url,
            "a red fox",
            "a blue heron",
            "--image-num",
            "2",
            "--image-type",
            "jpeg",
            "--width",
            "640",
            "--steps",
            "12",
            "--out",
            str(tmp_path),
        )
    assert code == 0, err
    names = images_in(tmp_path)
    assert len(names) == 4
    assert [n.split("-")[0] for n in names] == ["1", "1", "2", "2"]
    assert all(n.endswith(".jpg") for n in names)
    assert "2 prompts: 2 succeeded, 0 failed; 4 images saved" in out
    assert emu.tasks_created == 2
    assert emu.image_auth_headers == 0
    (task,) = [t for t in emu.tasks.values() if t.request["prompt"] == "a red fox"]
    assert task.request["width"] == 640
    assert task.request["steps"] == 12
    assert task.request["image_num"] == 2
    assert "emulator-key" not in out + err


@pytest.mark.anyio
async def test_generate_reads_a_prompts_file_and_reports_failures(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# my prompts\na cat\n\n   \na dog [fail]\n# done\na cow\n", encoding="utf-8"
    )
    emu = NovitaEmulator(durations=(0.01, 0.05))
    async with emu.serve() as server:
        code, out, _ = await run_generate(
            server.base_url,
            "--prompts-file",
            str(prompts),
            "--api-key",
            "emulator-key",
            "--out",
            str(tmp_path / "out"),
        )
    assert code == 1
    assert emu.tasks_created == 3
    assert "3 prompts: 2 succeeded, 1 failed; 2 images saved" in out
    assert "#2 'a dog [fail]'" in out
    assert "emulated failure" in out
    assert len(images_in(tmp_path / "out")) == 2


@pytest.mark.anyio
async def test_generate_with_a_journal_resumes_without_paying_twice(tmp_path: Path) -> None:
    emu = NovitaEmulator(durations=(0.01, 0.05))
    journal = str(tmp_path / "batch.db")
    args = ["a", "b", "c", "--api-key", "emulator-key", "--journal", journal]
    async with emu.serve() as server:
        code, _, err = await run_generate(server.base_url, *args, "--out", str(tmp_path / "o"))
        assert code == 0, err
        first = images_in(tmp_path / "o")
        code, out, err = await run_generate(server.base_url, *args, "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert emu.tasks_created == 3  # the rerun created no task
    assert images_in(tmp_path / "o") == first
    assert "3 images saved" in out


@pytest.mark.anyio
async def test_generate_with_a_wrong_key_fails_without_echoing_it(tmp_path: Path) -> None:
    emu = NovitaEmulator(durations=0.01)
    async with emu.serve() as server:
        code, out, err = await run_generate(
            server.base_url, "a", "--api-key", "wrong-secret-key", "--out", str(tmp_path)
        )
    assert code == 1
    assert "INVALID_API_KEY" in out + err
    assert "wrong-secret-key" not in out + err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--api-key", "k"], "no prompts"),
        (["generate", "a cat"], "no API key"),
        (["generate", "a cat", "--api-key", "k", "--width", "5000"], "width"),
        (["generate", "a cat", "--api-key", "k", "--prompts-file", "/nonexistent"], "prompts file"),
        (["generate", "a cat", "--concurrency", "0"], "must be >= 1"),
        (["generate", "a cat", "--images-per-minute", "-3"], "positive"),
        (["generate", "a cat", "--image-type", "gif"], "invalid choice"),
        (["demo", "--durations", "2", "1"], "--durations"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("NOVITA_API_KEY", raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "generate" in text
    assert "demo" in text
    assert main(["generate", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--prompts-file", "--out", "--images-per-minute", "--journal", "--model"):
        assert option in text
    assert main(["--version"]) == 0
    assert "novita-async" in capsys.readouterr().out


# --------------------------------------------------------------------------- progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_in_place_on_a_tty() -> None:
    stream = FakeTTY()
    progress = Progress(4, stream)
    progress.draw(force=True)
    progress.succeeded, progress.failed, progress.images = 2, 1, 2
    progress.draw(force=True)
    progress.draw()  # throttled: too soon after the last redraw
    progress.finish()
    text = stream.getvalue()
    assert text.count("\r") == 3
    assert text.endswith("\n")
    assert "3/4 done, 1 failed, 2 images saved" in text


def test_progress_prints_periodic_lines_elsewhere() -> None:
    stream = io.StringIO()
    progress = Progress(2, stream, interval=0)
    progress.draw(force=True)
    progress.draw()  # nothing changed: no new line
    progress.succeeded = 1
    progress.draw()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert "\r" not in stream.getvalue()
    assert "1/2 done" in lines[-1]

    quiet = io.StringIO()
    slow = Progress(2, quiet, interval=3600)
    slow.draw(force=True)
    slow.succeeded = 2
    slow.draw()  # within the interval: nothing
    slow.finish()  # the final line always comes
    assert len(quiet.getvalue().splitlines()) == 2


class ShortRun:
    """A fake run that reports only the first of its requests."""

    def __init__(self, requests: Any) -> None:
        self.requests = list(requests)

    async def __aenter__(self) -> ShortRun:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self.items()

    async def items(self) -> AsyncIterator[Any]:
        yield SimpleNamespace(
            index=0, request=self.requests[0], task_id=None, result=None, error=ValueError("x")
        )


@pytest.mark.anyio
async def test_a_prompt_the_run_never_reports_is_counted_as_failed(tmp_path: Path) -> None:
    client = SimpleNamespace(txt2img_many=lambda requests, *args, **kwargs: ShortRun(requests))
    requests = tuple(Txt2ImgRequest(model_name="m", prompt=p) for p in ("a", "b"))
    job = Job(requests=requests, out=tmp_path, progress=False)
    outcome = await run_job(client, job, stderr=io.StringIO())  # type: ignore[arg-type]
    assert outcome.failures == [
        (0, "a", "ValueError: x"),
        (1, "b", "no outcome (the run ended early)"),
    ]
    assert not outcome.ok


def test_interrupts_are_recognised_inside_exception_groups() -> None:
    from novita_async._cli import _interrupted

    nested = BaseExceptionGroup("outer", [BaseExceptionGroup("inner", [KeyboardInterrupt()])])
    assert _interrupted(KeyboardInterrupt())
    assert _interrupted(nested)
    assert not _interrupted(BaseExceptionGroup("mixed", [KeyboardInterrupt(), ValueError()]))
    assert not _interrupted(ValueError())
