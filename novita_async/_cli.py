"""``novita-async``: generate images (``generate``), or try it all offline (``demo``).

Exit status (also in ``--help``): 0 when every prompt succeeded and every image
was saved; 1 when some prompt or download failed; 2 on usage errors; 3 when the
API refused the key (authentication / permission: the batch stops at the first
such answer); 4 when the API host cannot be reached before any task exists;
130 on Ctrl-C.

The entry point and the two commands live here; the parser in ``_cli_args``,
the run and its summary in ``_cli_run``, the progress line in
``_cli_progress`` and the ``--webhook-listen`` receiver in ``_cli_webhooks``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import anyio
import attrs

from ._cli_args import (
    DEMO_FAILING_PROMPT,
    DEMO_MODEL,
    DEMO_PROMPTS,
    DEMO_SIZE,
    EXIT_FAILURES,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    UsageError,
    build_parser,
    build_requests,
    listen_address,
    plural,
    read_prompts,
)
from ._cli_progress import Progress
from ._cli_run import Job, Live, Outcome, describe, exit_status, print_summary, run_job
from ._cli_webhooks import WebhookReceiver
from ._client import AsyncNovita
from ._errors import NovitaError
from ._journal import JournalError
from ._models import Extra, Txt2ImgRequest, Webhook

__all__ = [
    "DEMO_PROMPTS",
    "DEMO_SIZE",
    "Job",
    "Live",
    "Outcome",
    "Progress",
    "amain",
    "build_parser",
    "execute",
    "interrupted_message",
    "main",
    "print_summary",
    "run_job",
]


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
    if args.webhook_listen is not None and args.webhook_url is None:
        raise UsageError(
            "--webhook-listen needs --webhook-url: the public URL (e.g. your tunnel's) "
            "that reaches it"
        )
    listen = listen_address(args.webhook_listen) if args.webhook_listen is not None else None
    requests = build_requests(args, read_prompts(args.prompts, args.prompts_file))
    api_key = args.api_key or os.environ.get("NOVITA_API_KEY")
    if not api_key:
        raise UsageError("no API key: set NOVITA_API_KEY (or pass --api-key)")
    _check_journal(args.journal)
    extra = Extra(response_image_type=args.image_type) if args.image_type else None
    if args.webhook_url is not None and listen is None:
        # Deliveries go to a receiver of the user's: this run polls as usual.
        extra = attrs.evolve(extra or Extra(), webhook=Webhook(url=args.webhook_url))
    job = attrs.evolve(
        _job(args, requests, args.out if args.out is not None else Path("out")),
        extra=extra,
        timeout=args.timeout,
        images_per_minute=args.images_per_minute,
        journal=args.journal,
        resubmit_uncertain=args.resubmit_uncertain,
    )
    live.journal = args.journal
    # With a receiver here, the client's waits are driven by the deliveries.
    webhook_url = args.webhook_url if listen is not None else None
    try:
        novita = AsyncNovita(api_key, base_url=args.base_url, webhook_url=webhook_url)
    except NovitaError as exc:  # a key httpx cannot send (the message never echoes it)
        raise UsageError(str(exc)) from exc
    async with novita as client:
        if listen is not None:
            outcome = await _run_receiving_webhooks(client, job, listen, webhook_url, stderr, live)
        else:
            outcome = await run_job(client, job, stderr=stderr, live=live)
    print_summary(outcome, job, stdout)
    return exit_status(outcome, command="generate", base_url=args.base_url, stderr=stderr)


async def _run_receiving_webhooks(
    client: AsyncNovita,
    job: Job,
    listen: tuple[str, int],
    webhook_url: str | None,
    stderr: TextIO,
    live: Live,
) -> Outcome:
    """:func:`run_job` with the ``--webhook-listen`` receiver serving beside it."""
    host, port = listen
    try:
        receiver = await WebhookReceiver.bind(host, port, client.receive_webhook)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise UsageError(f"--webhook-listen {host}:{port}: cannot listen there: {why}") from exc
    where = f"http://{f'[{host}]' if ':' in host else host}:{receiver.port}"
    print(
        f"{PROG} generate: receiving webhooks on {where} (any path), "
        f"posted by Novita to {webhook_url}",
        file=stderr,
    )
    stderr.flush()
    outcome: Outcome | None = None
    failed: Exception | None = None
    async with anyio.create_task_group() as group:
        group.start_soon(receiver.serve)
        try:
            outcome = await run_job(client, job, stderr=stderr, live=live)
        except Exception as exc:  # re-raised below, never inside a group
            failed = exc
        group.cancel_scope.cancel()
    if failed is not None:
        raise failed
    assert outcome is not None
    return outcome


async def _demo(args: argparse.Namespace, stdout: TextIO, stderr: TextIO, live: Live) -> int:
    from .testing import NovitaEmulator

    low, high = args.durations
    if not (0 <= low <= high and math.isfinite(high)):
        raise UsageError("--durations needs finite 0 <= MIN <= MAX")
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
        f"novita-async demo: {plural(len(requests), 'prompt')} on the built-in emulator "
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
    return exit_status(outcome, command="demo", base_url="(emulator)", stderr=stderr)


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
        print(f"{PROG} {args.command}: error: {describe(exc)}", file=err)
        return EXIT_FAILURES
    except NovitaError as exc:
        print(f"{PROG} {args.command}: error: {describe(exc)}", file=err)
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
            f" {plural(unsaved, 'task')} already submitted (Novita bills them) "
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
