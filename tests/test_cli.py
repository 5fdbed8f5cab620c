"""The ``novita-async`` command line: ``demo`` offline, ``generate`` against the emulator."""

from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.abc
import attrs
import httpx
import pytest

from novita_async import Txt2ImgRequest
from novita_async._cli import (
    DEMO_PROMPTS,
    DEMO_SIZE,
    Job,
    Live,
    Outcome,
    Progress,
    amain,
    interrupted_message,
    main,
    print_summary,
    run_job,
)
from novita_async._cli_args import read_prompts
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


def test_demo_without_out_uses_a_new_temporary_directory_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", *FAST]) == 0
    stdout = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # nothing written into the current directory
    where = Path(stdout.split("images go to ", 1)[1].splitlines()[0])
    try:
        assert where.is_dir()
        assert where.name.startswith("novita-demo-")
        assert f"Open {where} to see the images." in stdout
        names = images_in(where)
        assert len(names) == len(DEMO_PROMPTS)
        first = (where / names[0]).read_bytes()
        width, height = struct.unpack(">II", first[16:24])  # the PNG's IHDR
        assert (width, height) == (DEMO_SIZE, DEMO_SIZE)
        assert len({(where / n).read_bytes() for n in names}) == len(names)  # all different
    finally:
        shutil.rmtree(where)


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
async def test_a_refused_key_stops_the_batch_with_exit_3(tmp_path: Path) -> None:
    emu = NovitaEmulator(durations=0.01)
    prompts = [f"prompt {i}" for i in range(20)]
    async with emu.serve() as server:
        code, out, err = await run_generate(
            server.base_url,
            *prompts,
            "--api-key",
            "wrong-secret-key",
            "--concurrency",
            "2",
            "--out",
            str(tmp_path),
        )
    assert code == 3
    # Only the POSTs already under way when the first 403 came back, not all 20.
    assert emu.submissions <= 4
    assert emu.tasks_created == 0
    assert "20 prompts: 0 succeeded, 20 failed" in out
    assert "prompts not submitted" in out
    assert out.count("INVALID_API_KEY") <= 4
    (line,) = err.splitlines()
    assert "the API refused the key" in line
    assert "INVALID_API_KEY" in line
    assert "wrong-secret-key" not in out + err


@pytest.mark.anyio
async def test_an_unreachable_host_stops_the_batch_with_exit_4(tmp_path: Path) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now: connections are refused
    url = f"http://127.0.0.1:{port}"
    with anyio.fail_after(60):
        code, out, err = await run_generate(
            url, *[f"p{i}" for i in range(10)], "--api-key", "k", "--out", str(tmp_path)
        )
    assert code == 4
    assert "10 prompts: 0 succeeded, 10 failed" in out
    assert "9 prompts not submitted" in out
    (line,) = err.splitlines()
    assert f"cannot reach the API at {url}" in line


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
        (["demo", "--durations", "0", "inf"], "--durations"),
        (["demo", "--durations", "nan", "nan"], "--durations"),
        (["demo", "--out", "{file}"], "is a file, not a directory"),
        (["demo", "--out", "{file}/sub"], "is a file, not a directory"),
        (["generate", "a", "--api-key", "k", "--journal", "{dir}"], "is a directory"),
        (["generate", "a", "--api-key", "k", "--base-url", "api.novita.ai"], "--base-url"),
        (["generate", "a", "--api-key", "k", "--base-url", "http://127.0.0.1:99999"], "--base-url"),
        (["generate", "a", "--api-key", "two words"], "api_key"),
        (["generate", "a", "--api-key", "k", "--webhook-url", "https://h:99999/x"], "webhook-url"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("NOVITA_API_KEY", raising=False)
    (tmp_path / "file").write_text("x")
    argv = [a.format(file=tmp_path / "file", dir=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after argparse's usage lines, if any: one error line
    assert message in last
    assert last.startswith("novita-async")
    assert "Traceback" not in err


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_a_prompts_file_with_a_bom_and_crlf_keeps_its_comments_out(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Notepad saves UTF-8 with a BOM: the first line's "#" must still make it a comment,
    # and no prompt (a paid task) may start with an invisible U+FEFF.
    data = "\ufeff# my prompts\r\na cat\r\n\r\n# skipped\r\na dog\r\n".encode()
    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    if source == "stdin":
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    assert read_prompts([], "-" if source == "stdin" else str(path)) == ["a cat", "a dog"]


def test_trio_backend_without_trio_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trio" else real(name, *a)
    )
    assert main(["demo", "--backend", "trio", "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--backend trio needs trio installed" in line


@pytest.mark.anyio
async def test_a_journal_of_another_batch_is_a_usage_error(tmp_path: Path) -> None:
    emu = NovitaEmulator(durations=0.01)
    journal = str(tmp_path / "batch.db")
    async with emu.serve() as server:
        base = ["--api-key", "emulator-key", "--journal", journal, "--out", str(tmp_path)]
        code, _, err = await run_generate(server.base_url, "a", "b", *base)
        assert code == 0, err
        code, _, err = await run_generate(server.base_url, "c", "d", *base)
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith("novita-async generate: error:")
    assert emu.tasks_created == 2  # nothing was submitted for the other batch


def test_help_shows_every_default_and_the_exit_statuses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from novita_async._cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.option_strings and action.default is not argparse.SUPPRESS:
                switch = isinstance(action, argparse._StoreTrueAction)
                if (switch and action.dest != "no_progress") or action.dest == "prompts_file":
                    continue  # plain switches are off unless given
                assert action.help, (name, action.option_strings)
                assert "default" in action.help, (name, action.option_strings)
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: unpaced" in text
    assert "Novita's default quota for txt2img is 20 images per minute" in text
    assert "(default: 512)" in text  # the model's own default width
    assert "(default: png)" in text
    assert "(default: no limit)" in text
    for status in ("0 every prompt", "2 usage error", "3 the API refused", "4 the API host"):
        assert status in text


def test_plurals_in_the_summary() -> None:
    job = Job(requests=(Txt2ImgRequest(model_name="m", prompt="a"),), out=Path("x"))
    stream = io.StringIO()
    print_summary(Outcome(succeeded=1, saved=[Path("x/1.png")]), job, stream)
    assert stream.getvalue().startswith("1 prompt: 1 succeeded, 0 failed; 1 image saved")


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


# --------------------------------------------------------------------------- errors, interrupts


class RawFailingDownloads:
    """A client whose downloads fail with a raw httpx error (not a NovitaError)."""

    def __init__(self, client: Any) -> None:
        self.txt2img_many = client.txt2img_many

    async def save_image(self, image: Any, path: Path) -> Path:
        raise httpx.TooManyRedirects("Exceeded maximum allowed redirects.")


@pytest.mark.anyio
async def test_raw_download_errors_are_reported_per_prompt_not_as_a_crash(
    tmp_path: Path,
) -> None:
    emu = NovitaEmulator(durations=0.01)
    requests = tuple(Txt2ImgRequest(model_name="m", prompt=p) for p in ("a", "b"))
    job = Job(requests=requests, out=tmp_path, progress=False)
    async with emu.client() as client:
        outcome = await run_job(
            RawFailingDownloads(client),  # type: ignore[arg-type]
            job,
            stderr=io.StringIO(),
        )
    assert outcome.succeeded == 2
    assert [(i, why) for i, _, why in outcome.download_failures] == [
        (0, "image 0: TooManyRedirects: Exceeded maximum allowed redirects."),
        (1, "image 0: TooManyRedirects: Exceeded maximum allowed redirects."),
    ]
    assert not outcome.ok


def test_library_warnings_get_their_own_line_and_the_abandoned_warning_is_dropped() -> None:
    from novita_async._cli_progress import library_warnings_to

    stream = FakeTTY()
    progress = Progress(4, stream)
    progress.draw(force=True)
    logger = logging.getLogger("novita_async")
    with library_warnings_to(progress):
        logger.warning("retrying after %s", "a 503")
        logger.warning("txt2img_many stopped with %d submitted task(s) ...", 3)
    text = stream.getvalue()
    assert "\rnovita-async: WARNING: retrying after a 503\n[" in text.replace(" " * 10, "")
    assert "txt2img_many stopped" not in text
    assert not any(
        isinstance(h, logging.Handler) and "Progress" in type(h).__name__ for h in logger.handlers
    )


class FakeRun:
    pending_task_ids = ("t3", "t4")


def test_interrupted_message_says_what_was_paid_and_how_to_resume() -> None:
    live = Live(journal="batch.db", run=FakeRun(), delivered={"t1", "t2"}, saved={"t1"})  # type: ignore[arg-type]
    message = interrupted_message(live)
    assert "3 tasks already submitted (Novita bills them)" in message
    assert "Rerun the same command with --journal batch.db to resume" in message
    assert "pending_task_ids" not in message
    assert "BatchRun" not in message
    no_journal = interrupted_message(attrs.evolve(live, journal=None))
    assert "pass --journal FILE next time" in no_journal
    demo = interrupted_message(Live(billed=False, run=FakeRun()))  # type: ignore[arg-type]
    assert demo == "novita-async: interrupted."


@pytest.mark.anyio
async def test_ctrl_c_tells_what_was_paid_on_its_own_line(tmp_path: Path) -> None:
    emu = NovitaEmulator(durations=600.0)  # nothing finishes before the interrupt
    journal = tmp_path / "batch.db"
    async with emu.serve() as server:
        env = {**os.environ, "NOVITA_API_KEY": emu.api_key}
        argv = [sys.executable, "-m", "novita_async", "generate", "a", "b", "c"]
        argv += ["--base-url", server.base_url, "--journal", str(journal)]
        argv += ["--out", str(tmp_path / "out")]
        # A shell's background job (``cmd &``) starts with SIGINT ignored, and its
        # children inherit that: give the CLI the default Ctrl-C whatever runs the tests.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            process = await anyio.open_process(argv, env=env)
        finally:
            signal.signal(signal.SIGINT, previous)
        with anyio.fail_after(60):
            async with process as proc:
                while emu.tasks_created < 3:
                    await anyio.sleep(0.05)
                proc.send_signal(signal.SIGINT)
                assert proc.stderr is not None
                err = b"".join([chunk async for chunk in proc.stderr]).decode()
                assert await proc.wait() == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("novita-async: interrupted. 3 tasks already submitted")
    assert f"--journal {journal} to resume without paying twice" in last
    assert "pending_task_ids" not in err
