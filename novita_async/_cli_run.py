"""One ``generate``/``demo`` run: fan the prompts out, save each image as its task
finishes, then the summary and the exit status."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream

from ._cli_args import EXIT_AUTH, EXIT_FAILURES, EXIT_OK, EXIT_UNREACHABLE, PROG, plural
from ._cli_progress import Progress, library_warnings_to
from ._download import image_filename, safe_name
from ._errors import (
    APIConnectionError,
    AuthenticationError,
    InvalidRequestError,
    NovitaError,
    PermissionDeniedError,
)
from ._journal import JournalError
from ._models import Extra, Txt2ImgRequest
from ._results import Image

if TYPE_CHECKING:
    from ._batch import BatchRun
    from ._client import AsyncNovita
    from ._engine import BatchItem

__all__ = ["Job", "Live", "Outcome", "describe", "exit_status", "print_summary", "run_job"]

#: One image to save: (the batch item, the image's index, the image).
_Download = tuple["BatchItem", int, Image]


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


def describe(error: BaseException) -> str:
    if isinstance(error, NovitaError):
        return str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}"


def shorten(text: str, limit: int = 60) -> str:
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
                    why = f"image {i}: {describe(exc)}"
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
                        why = describe(item.error) if item.error else "no result"
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
        with library_warnings_to(progress):
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
        f"{plural(total, 'prompt')}: {outcome.succeeded} succeeded, "
        f"{len(outcome.failures) + outcome.not_submitted} failed; "
        f"{plural(saved, 'image')} saved to {where}{reused} in {outcome.elapsed:.1f}s",
        file=stdout,
    )
    if outcome.failures:
        print("Failed prompts:", file=stdout)
        for index, prompt, why in outcome.failures:
            print(f"  #{index + 1} {shorten(prompt)!r}: {why}", file=stdout)
    if outcome.not_submitted:
        print(f"  ({plural(outcome.not_submitted, 'prompt')} not submitted)", file=stdout)
    if outcome.download_failures:
        print("Failed downloads:", file=stdout)
        for index, prompt, why in outcome.download_failures:
            print(f"  #{index + 1} {shorten(prompt)!r}: {why}", file=stdout)


def exit_status(outcome: Outcome, *, command: str, base_url: str, stderr: TextIO) -> int:
    """Say why the batch stopped, if it did (one line on stderr), and pick the exit status."""
    stopped = outcome.stopped
    if isinstance(stopped, (AuthenticationError, PermissionDeniedError)):
        print(
            f"{PROG} {command}: error: the API refused the key ({describe(stopped)}); "
            "the batch stopped. Check NOVITA_API_KEY (or --api-key).",
            file=stderr,
        )
        return EXIT_AUTH
    if stopped is not None:
        print(
            f"{PROG} {command}: error: cannot reach the API at {base_url} "
            f"({describe(stopped)}); the batch stopped before any task was created.",
            file=stderr,
        )
        return EXIT_UNREACHABLE
    if outcome.error is not None:
        print(
            f"{PROG} {command}: error: the run ended early: {describe(outcome.error)}",
            file=stderr,
        )
    return EXIT_OK if outcome.ok else EXIT_FAILURES
