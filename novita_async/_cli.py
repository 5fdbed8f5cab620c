"""``novita-async``: generate images (``generate``), or try it all offline (``demo``).

Exit status: 0 when every prompt succeeded and every image was saved, 1 when
some failed (or the run could not start), 2 on usage errors, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream

from ._client import DEFAULT_BASE_URL, AsyncNovita
from ._download import image_filename, safe_name
from ._errors import InvalidRequestError, NovitaError
from ._models import Extra, Image, Txt2ImgRequest
from ._version import __version__

if TYPE_CHECKING:
    from ._batch import BatchItem

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


def _common_run_options(parser: argparse.ArgumentParser, *, default_out: str) -> None:
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=Path(default_out),
        help=f"directory the images are saved to (default: {default_out})",
    )
    parser.add_argument(
        "--concurrency",
        metavar="N",
        type=_positive_int,
        default=8,
        help="submissions in flight at once (default: 8)",
    )
    parser.add_argument(
        "--download-concurrency",
        metavar="N",
        type=_positive_int,
        default=8,
        help="images downloaded at once (default: 8)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not show the progress bar on stderr"
    )
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="async backend to run on (default: asyncio; trio must be installed)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate images with Novita AI's v3 async txt2img API.",
        epilog="Start with `novita-async demo`: it needs no API key and no network.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser(
        "generate",
        help="generate one image set per prompt and save every image",
        description=(
            "Submit every prompt to Novita, save every image under --out as soon as its task "
            "finishes, then print a summary. The API key comes from --api-key or NOVITA_API_KEY "
            "(prefer the variable: command lines are visible to other users)."
        ),
    )
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (or use --prompts-file)")
    gen.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="read prompts from FILE, one per line ('-' for stdin; blank and # lines skipped)",
    )
    gen.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"checkpoint sd_name (default: {DEFAULT_MODEL})"
    )
    gen.add_argument("--negative-prompt", metavar="TEXT")
    gen.add_argument("--width", type=int, help="128-2048 (default 512)")
    gen.add_argument("--height", type=int, help="128-2048 (default 512)")
    gen.add_argument("--steps", type=int, help="1-100 (default 20)")
    gen.add_argument("--guidance-scale", type=float, help="1-30 (default 7.5)")
    gen.add_argument("--sampler", metavar="NAME", help="sampler name (default 'Euler a')")
    gen.add_argument("--seed", type=int, help="-1 for random (default)")
    gen.add_argument("--image-num", type=int, help="images per prompt, 1-8 (default 1)")
    gen.add_argument("--image-type", choices=("png", "webp", "jpeg"), help="response image type")
    gen.add_argument(
        "--images-per-minute",
        metavar="IPM",
        type=_positive_float,
        help="pace submissions to this many images per minute (Novita's default quota is 20)",
    )
    gen.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        help="give up waiting for a task after this long",
    )
    gen.add_argument(
        "--journal",
        metavar="PATH",
        help="sqlite journal: rerunning with the same journal resumes without paying twice",
    )
    gen.add_argument(
        "--resubmit-uncertain",
        action="store_true",
        help="resubmit prompts whose earlier submission outcome is unknown (may pay twice)",
    )
    gen.add_argument("--api-key", help="Novita API key (default: $NOVITA_API_KEY)")
    gen.add_argument(
        "--base-url", default=DEFAULT_BASE_URL, help=f"API base URL (default: {DEFAULT_BASE_URL})"
    )
    _common_run_options(gen, default_out="out")

    demo = commands.add_parser(
        "demo",
        help="run `generate` on the built-in emulator: no API key, no network",
        description=(
            f"Generate {len(DEMO_PROMPTS)} images on the in-process emulator of the Novita API "
            "(novita_async.testing) and save them under --out. Nothing leaves this process."
        ),
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
    _common_run_options(demo, default_out="novita-demo-out")
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

    async def tick(self) -> None:
        """Redraw every ``interval`` seconds (the elapsed time moves) until cancelled."""
        while True:
            await anyio.sleep(self.interval)
            self.draw()


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

    @property
    def ok(self) -> bool:
        return not self.failures and not self.download_failures


def _describe(error: BaseException) -> str:
    if isinstance(error, NovitaError):
        return str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}"


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def run_job(client: AsyncNovita, job: Job, *, stderr: TextIO) -> Outcome:
    """Generate every request of ``job`` and save every image as its task finishes."""
    outcome = Outcome()
    progress = Progress(len(job.requests), stderr, enabled=job.progress)
    width = len(str(len(job.requests)))
    delivered: set[int] = set()  # indexes that succeeded
    send, receive = anyio.create_memory_object_stream[_Download](math.inf)

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
                except (NovitaError, OSError) as exc:
                    why = f"image {i}: {_describe(exc)}"
                    outcome.download_failures.append((item.index, item.request.prompt, why))

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
                async for item in run:
                    result = item.result
                    if item.error is not None or result is None:
                        why = _describe(item.error) if item.error else "no result"
                        outcome.failures.append((item.index, item.request.prompt, why))
                        progress.failed += 1
                    else:
                        delivered.add(item.index)
                        outcome.succeeded += 1
                        progress.succeeded += 1
                        for i, image in enumerate(result.images):
                            send.send_nowait((item, i, image))
                    progress.draw()

    await anyio.Path(job.out).mkdir(parents=True, exist_ok=True)
    progress.draw(force=True)
    started = time.monotonic()
    failure: Exception | None = None
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(progress.tick)
            async with anyio.create_task_group() as downloads:
                for _ in range(job.download_concurrency):
                    downloads.start_soon(downloader, receive.clone())
                receive.close()
                try:
                    await generate()
                except Exception as exc:  # re-raised below, not as an ExceptionGroup
                    failure = exc
                    downloads.cancel_scope.cancel()
            group.cancel_scope.cancel()
    finally:
        outcome.elapsed = time.monotonic() - started
        progress.finish()
    if failure is not None:
        raise failure
    seen = {index for index, _, _ in outcome.failures} | delivered
    for index, request in enumerate(job.requests):
        if index not in seen:  # never reported by the run: count it, never drop it
            outcome.failures.append((index, request.prompt, "no outcome (the run ended early)"))
    outcome.failures.sort()
    outcome.download_failures.sort()
    return outcome


def print_summary(outcome: Outcome, job: Job, stdout: TextIO) -> None:
    total = len(job.requests)
    where = job.out.resolve()
    reused = f" ({outcome.reused} already there)" if outcome.reused else ""
    print(
        f"{total} prompts: {outcome.succeeded} succeeded, {len(outcome.failures)} failed; "
        f"{len(outcome.saved)} images saved to {where}{reused} in {outcome.elapsed:.1f}s",
        file=stdout,
    )
    if outcome.failures:
        print("Failed prompts:", file=stdout)
        for index, prompt, why in outcome.failures:
            print(f"  #{index + 1} {_shorten(prompt)!r}: {why}", file=stdout)
    if outcome.download_failures:
        print("Failed downloads:", file=stdout)
        for index, prompt, why in outcome.download_failures:
            print(f"  #{index + 1} {_shorten(prompt)!r}: {why}", file=stdout)


# --------------------------------------------------------------------------- commands


def _job(args: argparse.Namespace, requests: Sequence[Txt2ImgRequest]) -> Job:
    return Job(
        requests=tuple(requests),
        out=args.out,
        concurrency=args.concurrency,
        download_concurrency=args.download_concurrency,
        progress=not args.no_progress,
    )


async def _generate(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    requests = build_requests(args, read_prompts(args.prompts, args.prompts_file))
    api_key = args.api_key or os.environ.get("NOVITA_API_KEY")
    if not api_key:
        raise UsageError("no API key: set NOVITA_API_KEY (or pass --api-key)")
    extra = Extra(response_image_type=args.image_type) if args.image_type else None
    job = attrs.evolve(
        _job(args, requests),
        extra=extra,
        timeout=args.timeout,
        images_per_minute=args.images_per_minute,
        journal=args.journal,
        resubmit_uncertain=args.resubmit_uncertain,
    )
    async with AsyncNovita(api_key, base_url=args.base_url) as client:
        outcome = await run_job(client, job, stderr=stderr)
    print_summary(outcome, job, stdout)
    return EXIT_OK if outcome.ok else EXIT_FAILURES


async def _demo(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from .testing import NovitaEmulator

    low, high = args.durations
    if not 0 <= low <= high:
        raise UsageError("--durations needs 0 <= MIN <= MAX")
    prompts = list(DEMO_PROMPTS)
    if args.with_failure:
        prompts.insert(len(prompts) // 2, DEMO_FAILING_PROMPT)
    requests = [Txt2ImgRequest(model_name=DEMO_MODEL, prompt=p) for p in prompts]
    job = _job(args, requests)
    print(
        f"novita-async demo: {len(requests)} prompts on the built-in emulator "
        "(no API key, no network)",
        file=stdout,
    )
    stdout.flush()
    emulator = NovitaEmulator(durations=(low, high), seed=args.seed)
    async with emulator.client() as client:
        outcome = await run_job(client, job, stderr=stderr)
    print_summary(outcome, job, stdout)
    print(f"Open {job.out.resolve()} to see the images.", file=stdout)
    print(
        "Next: export NOVITA_API_KEY=... and run "
        "`novita-async generate 'your prompt' --out images`.",
        file=stdout,
    )
    return EXIT_OK if outcome.ok else EXIT_FAILURES


async def execute(
    args: argparse.Namespace, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run parsed arguments inside a running event loop; returns the exit status."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    command = _demo if args.command == "demo" else _generate
    try:
        return await command(args, out, err)
    except UsageError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=err)
        return EXIT_USAGE
    except (NovitaError, OSError) as exc:
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
    try:
        return anyio.run(execute, args, backend=args.backend)
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        hint = (
            " (rerun with the same --journal to resume)" if getattr(args, "journal", None) else ""
        )
        print(f"\n{PROG}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _interrupted(exc: BaseException) -> bool:
    """A KeyboardInterrupt, possibly inside (nested) exception groups (trio wraps it)."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    inner = getattr(exc, "exceptions", None)
    return isinstance(inner, tuple) and bool(inner) and all(_interrupted(e) for e in inner)
