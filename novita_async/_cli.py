"""``novita-async``: generate images (``generate``), or try it all offline (``demo``).

Exit status (also in ``--help``): 0 when every prompt succeeded and every image
was saved; 1 when some prompt or download failed; 2 on usage errors; 3 when the
API refused the key (authentication / permission: the batch stops at the first
such answer); 4 when the API host cannot be reached before any task exists;
130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream

from ._client import DEFAULT_BASE_URL, AsyncNovita
from ._download import image_filename, safe_name
from ._errors import (
    APIConnectionError,
    AuthenticationError,
    InvalidRequestError,
    NovitaError,
    PermissionDeniedError,
)
from ._journal import JournalError
from ._models import Extra, Image, Txt2ImgRequest
from ._version import __version__

if TYPE_CHECKING:
    from ._batch import BatchItem, BatchRun

__all__ = ["DEMO_PROMPTS", "amain", "build_parser", "main"]

PROG = "novita-async"
DEFAULT_MODEL = "sd_xl_base_1.0.safetensors"
DEMO_MODEL = "sd_xl_base_1.0.safetensors"
DEMO_PROMPTS = (
    "a red fox curled up in fresh snow, morning light",
    "a lighthouse on a basalt cliff during a storm",
    "isometric cutaway of a tiny bakery, pastel colours",
    "an astronaut tending a greenhouse on mars",
    "a bowl of ramen, steam rising, studio photo",
    "a watercolor map of an imaginary archipelago",
    "a cyberpunk alley at night, neon reflections in puddles",
    "a cozy reading nook with a sleeping cat",
    "an ancient library carved into a mountain",
    "a hot air balloon festival over lavender fields",
    "a koi pond seen from above, autumn leaves on the water",
    "a steam locomotive crossing a stone viaduct",
)
DEMO_FAILING_PROMPT = "a prompt the emulator rejects [fail]"

#: One image to save: (the batch item, the image's index, the image).
_Download = tuple["BatchItem", int, Image]

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: The API refused the key (401/403): the batch stopped at the first such answer.
EXIT_AUTH = 3
#: The API host could not be reached before any task was created.
EXIT_UNREACHABLE = 4

EXIT_STATUS_HELP = """\
exit status:
  0    every prompt succeeded and every image was saved
  1    some prompt or image download failed (each is listed in the summary)
  2    usage error (bad option, --out is a file, journal of another batch, ...)
  3    the API refused the key (401/403); the batch stops at the first refusal
  4    the API host cannot be reached (before any task was created)
  130  interrupted (Ctrl-C); with --journal, rerun the same command to resume
"""
DEMO_SIZE = 256  # demo pictures are drawn by the emulator: keep them small and fast


class UsageError(Exception):
    """Bad command-line input found after parsing (exit status 2)."""


# --------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _plural(count: int, word: str) -> str:
    """``1 prompt``, ``2 prompts``, ``0 images``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _request_default(name: str) -> object:
    """The default of a :class:`Txt2ImgRequest` field (help shows the models' own values)."""
    return getattr(attrs.fields(Txt2ImgRequest), name).default


def _common_run_options(parser: argparse.ArgumentParser, *, default_out: str) -> None:
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=None,
        help=f"directory the images are saved to, created if missing (default: {default_out})",
    )
    parser.add_argument(
        "--concurrency",
        metavar="N",
        type=_positive_int,
        default=8,
        help="submissions in flight at once (default: %(default)s)",
    )
    parser.add_argument(
        "--download-concurrency",
        metavar="N",
        type=_positive_int,
        default=8,
        help="images downloaded at once (default: %(default)s)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="do not show the progress bar on stderr (default: shown)",
    )
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="async backend to run on; trio must be installed (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate images with Novita AI's v3 async txt2img API.",
        epilog="Start with `novita-async demo`: it needs no API key and no network.\n\n"
        + EXIT_STATUS_HELP,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser(
        "generate",
        help="generate one image set per prompt and save every image",
        description=(
            "Submit every prompt to Novita, save every image under --out as soon as its task "
            "finishes, then print a summary. The API key comes from --api-key or NOVITA_API_KEY "
            "(prefer the variable: command lines are visible to other users). Request options "
            "left out use Novita's defaults, shown below."
        ),
        epilog=EXIT_STATUS_HELP,
        formatter_class=formatter,
    )
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (or use --prompts-file)")
    gen.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="read prompts from FILE, one per line ('-' for stdin; blank and # lines skipped)",
    )
    gen.add_argument(
        "--model", default=DEFAULT_MODEL, help="checkpoint sd_name (default: %(default)s)"
    )
    gen.add_argument("--negative-prompt", metavar="TEXT", help="what to avoid (default: none)")
    for option, kind, what in (
        ("width", int, "image width in pixels"),
        ("height", int, "image height in pixels"),
        ("steps", int, "denoising steps"),
        ("guidance-scale", float, "how closely to follow the prompt"),
        ("image-num", int, "images per prompt"),
    ):
        default = _request_default(option.replace("-", "_"))
        gen.add_argument(f"--{option}", type=kind, help=f"{what} (default: {default})")
    gen.add_argument(
        "--sampler",
        metavar="NAME",
        help=f"sampler name (default: {_request_default('sampler_name')})",
    )
    gen.add_argument("--seed", type=int, help="seed; -1 is random (default: -1)")
    gen.add_argument(
        "--image-type",
        choices=("png", "webp", "jpeg"),
        help="image file type Novita returns (default: png)",
    )
    gen.add_argument(
        "--images-per-minute",
        metavar="IPM",
        type=_positive_float,
        help=(
            "pace submissions to this many images per minute (default: unpaced: as fast as "
            "--concurrency allows, slowing down at the first 429). Novita's default quota "
            "for txt2img is 20 images per minute"
        ),
    )
    gen.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        help="give up waiting for a task's result after this long (default: no limit)",
    )
    gen.add_argument(
        "--journal",
        metavar="PATH",
        help=(
            "sqlite journal file: rerunning the same command with the same journal resumes "
            "(after Ctrl-C or a crash) without paying twice (default: none)"
        ),
    )
    gen.add_argument(
        "--resubmit-uncertain",
        action="store_true",
        help="resubmit prompts whose earlier submission outcome is unknown (may pay twice)",
    )
    gen.add_argument("--api-key", help="Novita API key (default: $NOVITA_API_KEY)")
    gen.add_argument(
        "--base-url",
        default=DEFAULT_BASE_URL,
        help=(
            "API base URL, e.g. the loopback emulator's "
            "(`python -m novita_async.testing`) (default: %(default)s)"
        ),
    )
    _common_run_options(gen, default_out="out")

    demo = commands.add_parser(
        "demo",
        help="run `generate` on the built-in emulator: no API key, no network",
        description=(
            f"Generate {len(DEMO_PROMPTS)} pictures ({DEMO_SIZE}x{DEMO_SIZE}, drawn from each "
            "task's seed) on the in-process emulator of the Novita API (novita_async.testing) "
            "and save them under --out. Nothing leaves this process."
        ),
        epilog=EXIT_STATUS_HELP,
        formatter_class=formatter,
    )
    demo.add_argument(
        "--with-failure",
        action="store_true",
        help="add a prompt the emulator fails, to show how failures are reported",
    )
    demo.add_argument(
        "--durations",
        nargs=2,
        metavar=("MIN", "MAX"),
        type=float,
        default=(0.5, 2.0),
        help="emulated task durations in seconds (default: 0.5 2.0)",
    )
    demo.add_argument("--seed", type=int, default=0, help="emulator random seed (default: 0)")
    _common_run_options(demo, default_out="a new temporary directory, printed")
    return parser


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """Prompts from the arguments, then from the file (blank and ``#`` lines skipped)."""
    collected = [p.strip() for p in prompts if p.strip()]
    if prompts_file is not None:
        try:
            if prompts_file == "-":
                text = sys.stdin.read()
            else:
                text = Path(prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read prompts file: {exc}") from exc
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                collected.append(line)
    if not collected:
        raise UsageError("no prompts: pass them as arguments or with --prompts-file")
    return collected


def build_requests(args: argparse.Namespace, prompts: Sequence[str]) -> list[Txt2ImgRequest]:
    options = {
        "negative_prompt": args.negative_prompt,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "sampler_name": args.sampler,
        "seed": args.seed,
        "image_num": args.image_num,
    }
    given = {key: value for key, value in options.items() if value is not None}
    try:
        return [Txt2ImgRequest(model_name=args.model, prompt=p, **given) for p in prompts]
    except InvalidRequestError as exc:
        raise UsageError(str(exc)) from exc


# --------------------------------------------------------------------------- progress


class Progress:
    """Progress on stderr: redrawn in place on a TTY, else a line every ``interval`` seconds."""

    def __init__(
        self, total: int, stream: TextIO, *, enabled: bool = True, interval: float | None = None
    ) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and _isatty(stream)
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.started = time.monotonic()
        self.succeeded = 0
        self.failed = 0
        self.images = 0
        self._last_line = ""
        self._last_draw = -math.inf

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _state(self) -> str:
        width = 24
        filled = width * self.done // self.total if self.total else width
        bar = "#" * filled + "." * (width - filled)
        failed = f", {self.failed} failed" if self.failed else ""
        return f"[{bar}] {self.done}/{self.total} done{failed}, {self.images} images saved"

    def line(self) -> str:
        return f"{self._state()}, {self.elapsed():.1f}s"

    def draw(self, *, force: bool = False) -> None:
        """Redraw (TTY, at most 20 times a second) or print a line (at most every ``interval``
        seconds, and only if something changed); ``force`` skips both limits."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force:
            if now - self._last_draw < (0.05 if self.tty else self.interval):
                return
            if not self.tty and self._state() == self._last_line.rpartition(", ")[0]:
                return
        line = self.line()
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self._last_line)))
        else:
            self.stream.write(line + "\n")
        self._last_line = line
        self._last_draw = now
        self.stream.flush()

    def finish(self) -> None:
        if not self.enabled:
            return
        self.draw(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def interject(self, text: str) -> None:
        """Print ``text`` on a line of its own, then redraw the progress line (on a TTY)."""
        if self.tty and self._last_line:
            self.stream.write("\r" + " " * len(self._last_line) + "\r")
        self.stream.write(text + "\n")
        if self.tty and self._last_line:
            self.stream.write(self._last_line)
        self.stream.flush()

    async def tick(self) -> None:
        """Redraw every ``interval`` seconds (the elapsed time moves) until cancelled."""
        while True:
            await anyio.sleep(self.interval)
            self.draw()


class _ProgressLogHandler(logging.Handler):
    """The library's warnings, each on its own line (never run into the progress line).

    The "submitted tasks not delivered" warning is dropped: the CLI says that itself,
    in CLI terms (what was paid, how to resume).
    """

    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.WARNING)
        self.progress = progress
        self.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("txt2img_many stopped")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.interject(self.format(record))
        except Exception:
            self.handleError(record)


@contextmanager
def _library_warnings_to(progress: Progress) -> Iterator[None]:
    """Route ``novita_async`` warnings through ``progress`` while the run lasts."""
    logger = logging.getLogger("novita_async")
    handler = _ProgressLogHandler(progress)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------- the run


@attrs.frozen(kw_only=True)
class Job:
    """What one ``generate``/``demo`` run does, independent of where the client comes from."""

    requests: tuple[Txt2ImgRequest, ...]
    extra: Extra | None = None
    out: Path
    timeout: float | None = None
    concurrency: int = 8
    images_per_minute: float | None = None
    journal: str | None = None
    resubmit_uncertain: bool = False
    download_concurrency: int = 8
    progress: bool = True


@attrs.define
class Outcome:
    succeeded: int = 0
    failures: list[tuple[int, str, str]] = attrs.Factory(list)  # (index, prompt, why)
    saved: list[Path] = attrs.Factory(list)
    reused: int = 0
    download_failures: list[tuple[int, str, str]] = attrs.Factory(list)
    elapsed: float = 0.0
    #: The error that stopped the whole batch (bad key, API unreachable), if any.
    stopped: NovitaError | None = None
    #: Prompts never submitted because the batch stopped.
    not_submitted: int = 0
    #: The error that ended the run early (the summary is still printed), if any.
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return not self.failures and not self.download_failures and self.error is None


@attrs.define
class Live:
    """What an interrupted run had paid for, read by :func:`main` after Ctrl-C."""

    billed: bool = True
    journal: str | None = None
    run: BatchRun | None = None
    #: Task ids whose item was delivered as succeeded, and those whose images all got saved.
    delivered: set[str] = attrs.Factory(set)
    saved: set[str] = attrs.Factory(set)

    def unsaved(self) -> int:
        """Tasks created (and billed) whose images were not all saved."""
        pending = set(self.run.pending_task_ids) if self.run is not None else set()
        return len((self.delivered - self.saved) | pending)


def _describe(error: BaseException) -> str:
    if isinstance(error, NovitaError):
        return str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}"


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stops_batch(error: BaseException, run: BatchRun) -> bool:
    """A refused key stops the batch; so does an unreachable host before any task exists."""
    if isinstance(error, (AuthenticationError, PermissionDeniedError)):
        return True
    return isinstance(error, APIConnectionError) and run.submitted == 0


async def run_job(
    client: AsyncNovita, job: Job, *, stderr: TextIO, live: Live | None = None
) -> Outcome:
    """Generate every request of ``job`` and save every image as its task finishes.

    Never raises for a prompt or a download: each failure is in the outcome;
    an error that ends the run early is in ``outcome.error`` (the summary is
    still printed). Errors that prevent the start (e.g. a journal of another
    batch, an unusable ``out``) propagate.
    """
    live = live if live is not None else Live()
    outcome = Outcome()
    progress = Progress(len(job.requests), stderr, enabled=job.progress)
    width = len(str(len(job.requests)))
    delivered: set[int] = set()  # indexes that succeeded
    send, receive = anyio.create_memory_object_stream[_Download](math.inf)
    unsaved_images: dict[str, int] = {}

    async def save(item: BatchItem, i: int, image: Image) -> None:
        result = item.result
        assert result is not None
        prefix = f"{item.index + 1:0{width}d}-{safe_name(item.request.prompt, max_length=40)}"
        prefix += f"-{safe_name(result.task_id, max_length=8)}"
        path = job.out / image_filename(
            result.task_id, i, image, prefix=prefix, count=len(result.images)
        )
        if await anyio.Path(path).exists():  # a resumed run (same task): already saved
            outcome.reused += 1
        else:
            await client.save_image(image, path)
        outcome.saved.append(path)
        progress.images += 1

    async def downloader(stream: MemoryObjectReceiveStream[_Download]) -> None:
        async with stream:
            async for item, i, image in stream:
                try:
                    await save(item, i, image)
                except Exception as exc:  # any failure is this image's, never the run's
                    why = f"image {i}: {_describe(exc)}"
                    outcome.download_failures.append((item.index, item.request.prompt, why))
                else:
                    task_id = item.result.task_id if item.result is not None else ""
                    unsaved_images[task_id] -= 1
                    if not unsaved_images[task_id]:
                        live.saved.add(task_id)

    async def generate() -> None:
        async with send:
            run = client.txt2img_many(
                job.requests,
                job.extra,
                job.timeout,
                max_concurrent_submissions=job.concurrency,
                images_per_minute=job.images_per_minute,
                journal=job.journal,
                resubmit_uncertain=job.resubmit_uncertain,
            )
            async with run:
                live.run = run
                async for item in run:
                    result = item.result
                    if item.error is not None or result is None:
                        why = _describe(item.error) if item.error else "no result"
                        outcome.failures.append((item.index, item.request.prompt, why))
                        progress.failed += 1
                        if item.error is not None and _stops_batch(item.error, run):
                            assert isinstance(item.error, NovitaError)
                            outcome.stopped = item.error
                            break  # leaving the block stops the batch: no POST after this
                    else:
                        delivered.add(item.index)
                        outcome.succeeded += 1
                        progress.succeeded += 1
                        live.delivered.add(result.task_id)
                        unsaved_images[result.task_id] = len(result.images)
                        if not result.images:
                            live.saved.add(result.task_id)
                        for i, image in enumerate(result.images):
                            send.send_nowait((item, i, image))
                    progress.draw()

    await anyio.Path(job.out).mkdir(parents=True, exist_ok=True)
    progress.draw(force=True)
    started = time.monotonic()
    cannot_start: Exception | None = None
    try:
        with _library_warnings_to(progress):
            async with anyio.create_task_group() as group:
                group.start_soon(progress.tick)
                async with anyio.create_task_group() as downloads:
                    for _ in range(job.download_concurrency):
                        downloads.start_soon(downloader, receive.clone())
                    receive.close()
                    try:
                        await generate()
                    except (JournalError, InvalidRequestError) as exc:
                        cannot_start = exc  # a usage error: re-raised below, not in a group
                        downloads.cancel_scope.cancel()
                    except Exception as exc:  # reported after the summary, never a group
                        outcome.error = exc
                        downloads.cancel_scope.cancel()
                group.cancel_scope.cancel()
    finally:
        outcome.elapsed = time.monotonic() - started
        progress.finish()
    if cannot_start is not None:
        raise cannot_start
    seen = {index for index, _, _ in outcome.failures} | delivered
    never = [(i, r.prompt) for i, r in enumerate(job.requests) if i not in seen]
    if outcome.stopped is not None:
        outcome.not_submitted = len(never)
    else:
        for index, prompt in never:  # never reported by the run: count it, never drop it
            outcome.failures.append((index, prompt, "no outcome (the run ended early)"))
    outcome.failures.sort()
    outcome.download_failures.sort()
    return outcome


def print_summary(outcome: Outcome, job: Job, stdout: TextIO) -> None:
    total = len(job.requests)
    where = job.out.resolve()
    reused = f" ({outcome.reused} already there)" if outcome.reused else ""
    saved = len(outcome.saved)
    print(
        f"{_plural(total, 'prompt')}: {outcome.succeeded} succeeded, "
        f"{len(outcome.failures) + outcome.not_submitted} failed; "
        f"{_plural(saved, 'image')} saved to {where}{reused} in {outcome.elapsed:.1f}s",
        file=stdout,
    )
    if outcome.failures:
        print("Failed prompts:", file=stdout)
        for index, prompt, why in outcome.failures:
            print(f"  #{index + 1} {_shorten(prompt)!r}: {why}", file=stdout)
    if outcome.not_submitted:
        print(f"  ({_plural(outcome.not_submitted, 'prompt')} not submitted)", file=stdout)
    if outcome.download_failures:
        print("Failed downloads:", file=stdout)
        for index, prompt, why in outcome.download_failures:
            print(f"  #{index + 1} {_shorten(prompt)!r}: {why}", file=stdout)


def _exit_status(outcome: Outcome, *, command: str, base_url: str, stderr: TextIO) -> int:
    """Say why the batch stopped, if it did (one line on stderr), and pick the exit status."""
    stopped = outcome.stopped
    if isinstance(stopped, (AuthenticationError, PermissionDeniedError)):
        print(
            f"{PROG} {command}: error: the API refused the key ({_describe(stopped)}); "
            "the batch stopped. Check NOVITA_API_KEY (or --api-key).",
            file=stderr,
        )
        return EXIT_AUTH
    if stopped is not None:
        print(
            f"{PROG} {command}: error: cannot reach the API at {base_url} "
            f"({_describe(stopped)}); the batch stopped before any task was created.",
            file=stderr,
        )
        return EXIT_UNREACHABLE
    if outcome.error is not None:
        print(
            f"{PROG} {command}: error: the run ended early: {_describe(outcome.error)}",
            file=stderr,
        )
    return EXIT_OK if outcome.ok else EXIT_FAILURES


# --------------------------------------------------------------------------- commands


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"--out {out}: {parent} is a file, not a directory")


def _check_journal(journal: str | None) -> None:
    if journal is not None and Path(journal).is_dir():
        raise UsageError(f"--journal {journal} is a directory; name a file")


def _job(args: argparse.Namespace, requests: Sequence[Txt2ImgRequest], out: Path) -> Job:
    _check_out(out)
    return Job(
        requests=tuple(requests),
        out=out,
        concurrency=args.concurrency,
        download_concurrency=args.download_concurrency,
        progress=not args.no_progress,
    )


async def _generate(args: argparse.Namespace, stdout: TextIO, stderr: TextIO, live: Live) -> int:
    requests = build_requests(args, read_prompts(args.prompts, args.prompts_file))
    api_key = args.api_key or os.environ.get("NOVITA_API_KEY")
    if not api_key:
        raise UsageError("no API key: set NOVITA_API_KEY (or pass --api-key)")
    _check_journal(args.journal)
    extra = Extra(response_image_type=args.image_type) if args.image_type else None
    job = attrs.evolve(
        _job(args, requests, args.out if args.out is not None else Path("out")),
        extra=extra,
        timeout=args.timeout,
        images_per_minute=args.images_per_minute,
        journal=args.journal,
        resubmit_uncertain=args.resubmit_uncertain,
    )
    live.journal = args.journal
    async with AsyncNovita(api_key, base_url=args.base_url) as client:
        outcome = await run_job(client, job, stderr=stderr, live=live)
    print_summary(outcome, job, stdout)
    return _exit_status(outcome, command="generate", base_url=args.base_url, stderr=stderr)


async def _demo(args: argparse.Namespace, stdout: TextIO, stderr: TextIO, live: Live) -> int:
    from .testing import NovitaEmulator

    low, high = args.durations
    if not 0 <= low <= high:
        raise UsageError("--durations needs 0 <= MIN <= MAX")
    live.billed = False
    prompts = list(DEMO_PROMPTS)
    if args.with_failure:
        prompts.insert(len(prompts) // 2, DEMO_FAILING_PROMPT)
    requests = [
        Txt2ImgRequest(model_name=DEMO_MODEL, prompt=p, width=DEMO_SIZE, height=DEMO_SIZE)
        for p in prompts
    ]
    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="novita-demo-"))
    job = _job(args, requests, out)
    print(
        f"novita-async demo: {_plural(len(requests), 'prompt')} on the built-in emulator "
        f"(no API key, no network); images go to {out.resolve()}",
        file=stdout,
    )
    stdout.flush()
    emulator = NovitaEmulator(durations=(low, high), seed=args.seed)
    async with emulator.client() as client:
        outcome = await run_job(client, job, stderr=stderr, live=live)
    print_summary(outcome, job, stdout)
    print(f"Open {out.resolve()} to see the images.", file=stdout)
    print(
        "Next: export NOVITA_API_KEY=... and run "
        "`novita-async generate 'your prompt' --out images`.",
        file=stdout,
    )
    return _exit_status(outcome, command="demo", base_url="(emulator)", stderr=stderr)


async def execute(
    args: argparse.Namespace,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    live: Live | None = None,
) -> int:
    """Run parsed arguments inside a running event loop; returns the exit status."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    command = _demo if args.command == "demo" else _generate
    try:
        return await command(args, out, err, live if live is not None else Live())
    except (UsageError, JournalError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=err)
        return EXIT_USAGE
    except OSError as exc:
        if args.out is not None and getattr(exc, "filename", None) == str(args.out):
            print(f"{PROG} {args.command}: error: --out {args.out}: {exc.strerror}", file=err)
            return EXIT_USAGE
        print(f"{PROG} {args.command}: error: {_describe(exc)}", file=err)
        return EXIT_FAILURES
    except NovitaError as exc:
        print(f"{PROG} {args.command}: error: {_describe(exc)}", file=err)
        return EXIT_FAILURES


def _parse(argv: Sequence[str] | None) -> argparse.Namespace | int:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


async def amain(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """:func:`main` for callers already inside an event loop (``--backend`` is ignored)."""
    args = _parse(argv)
    if isinstance(args, int):
        return args
    return await execute(args, stdout=stdout, stderr=stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    args = _parse(argv)
    if isinstance(args, int):
        return args
    if args.backend == "trio" and importlib.util.find_spec("trio") is None:
        print(
            f"{PROG} {args.command}: error: --backend trio needs trio installed (pip install trio)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    live = Live()
    try:
        return anyio.run(functools.partial(execute, args, live=live), backend=args.backend)
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        print(interrupted_message(live), file=sys.stderr)
        return EXIT_INTERRUPTED


def interrupted_message(live: Live) -> str:
    """What Ctrl-C cost and how to resume, in the CLI's terms."""
    message = f"{PROG}: interrupted."
    unsaved = live.unsaved() if live.billed else 0
    if unsaved:
        message += (
            f" {_plural(unsaved, 'task')} already submitted (Novita bills them) "
            "had images not saved yet."
        )
    if live.journal:
        message += f" Rerun the same command with --journal {live.journal} to resume"
        message += " without paying twice." if unsaved else "."
    elif unsaved:
        message += " They cannot be fetched without a journal: pass --journal FILE next time."
    return message


def _interrupted(exc: BaseException) -> bool:
    """A KeyboardInterrupt, possibly inside (nested) exception groups (trio wraps it)."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    inner = getattr(exc, "exceptions", None)
    return isinstance(inner, tuple) and bool(inner) and all(_interrupted(e) for e in inner)
