"""``python -m novita_async.testing``: run the emulator on loopback until SIGTERM/SIGINT.

Prints one JSON line on stdout once listening, so a parent process (a test, a
benchmark) or a person can read where it is and which key it accepts::

    {"base_url": "http://127.0.0.1:8765", "image_base_url": "http://127.0.0.1:40123",
     "api_key": "emulator-key"}

Run the CLI or your own app against it (see ``--help``)::

    python -m novita_async.testing --port 8765 &
    NOVITA_API_KEY=emulator-key novita-async generate "a cat" \\
        --base-url http://127.0.0.1:8765 --out cats
    # your app: AsyncNovita(api_key="emulator-key", base_url="http://127.0.0.1:8765")
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from ._emulator import DEFAULT_API_KEY, NovitaEmulator
from ._tasks import DurationSpec

RECIPE = f"""\
The emulator accepts one API key: {DEFAULT_API_KEY!r} unless --api-key says otherwise.
Run the CLI or your own app against it:

  python -m novita_async.testing --port 8765 &
  NOVITA_API_KEY={DEFAULT_API_KEY} novita-async generate "a cat" \\
      --base-url http://127.0.0.1:8765 --out cats
  # your app: AsyncNovita(api_key="{DEFAULT_API_KEY}", base_url="http://127.0.0.1:8765")

Tasks, images and counters live in this process only; stop it with Ctrl-C or SIGTERM.
"""


def _durations(text: str) -> DurationSpec:
    parts = [float(part) for part in text.split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError("use SECONDS or LO,HI")


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("a port is within 0..65535")
    return port


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m novita_async.testing",
        description=(
            "Serve the Novita v3 API emulator on loopback (API + image host). Once listening "
            'it prints one JSON line: {"base_url": ..., "image_base_url": ..., "api_key": ...}.'
        ),
        epilog=RECIPE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument("--port", type=_port, default=0, help="API port (default: 0, any free port)")
    p.add_argument(
        "--image-port", type=_port, default=0, help="image host port (default: 0, any free port)"
    )
    p.add_argument(
        "--durations",
        type=_durations,
        default=(1.0, 3.0),
        help="task duration: SECONDS or LO,HI, uniform (default: 1,3)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="tasks processed at once (default: unbounded)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--api-key",
        default=DEFAULT_API_KEY,
        help="the only API key accepted (default: %(default)s)",
    )
    p.add_argument(
        "--failure-rate",
        type=float,
        default=0.0,
        help="probability a task ends FAILED (default: %(default)s)",
    )
    p.add_argument(
        "--queue-delay",
        type=float,
        default=0.0,
        help="seconds each task stays queued (default: %(default)s)",
    )
    p.add_argument(
        "--image-url-ttl",
        type=float,
        default=3600.0,
        help="seconds image URLs stay valid (default: %(default)s)",
    )
    p.add_argument(
        "--images-per-minute",
        type=float,
        default=None,
        help="enforce an IPM quota with 429s (default: none; Novita's is 20)",
    )
    p.add_argument("--envelope", action="store_true", help="answer txt2img in the v2 envelope")
    p.add_argument(
        "--webhooks",
        action="store_true",
        help="POST webhooks to each task's extra.webhook.url when it ends (default: off)",
    )
    p.add_argument(
        "--webhook-delay",
        type=_durations,
        default=(0.05, 0.2),
        metavar="FIXED[,RANDOM]",
        help="seconds after a task ends: FIXED + uniform(0, RANDOM) (default: 0.05,0.2)",
    )
    p.add_argument(
        "--webhook-duplicate-rate",
        type=float,
        default=0.0,
        help="share of tasks delivered twice (default: %(default)s)",
    )
    p.add_argument(
        "--webhook-loss-rate",
        type=float,
        default=0.0,
        help="share of tasks never delivered (default: %(default)s)",
    )
    p.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="async backend (default: %(default)s)",
    )
    return p


def _webhook_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "delay": args.webhook_delay,
        "duplicate_rate": args.webhook_duplicate_rate,
        "loss_rate": args.webhook_loss_rate,
        "seed": args.seed,
    }


async def _serve(emulator: NovitaEmulator, args: argparse.Namespace) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        webhooks = _webhook_options(args) if args.webhooks else None
        serving = emulator.serve(
            args.host, args.port, image_port=args.image_port, webhooks=webhooks
        )
        async with serving as server:
            line = {
                "base_url": server.base_url,
                "image_base_url": server.image_base_url,
                "api_key": emulator.api_key,
            }
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
            async for _ in signals:
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        emulator = NovitaEmulator(
            durations=args.durations,
            workers=args.workers,
            api_key=args.api_key,
            seed=args.seed,
            failure_rate=args.failure_rate,
            queue_delay=args.queue_delay,
            image_url_ttl=args.image_url_ttl,
            images_per_minute=args.images_per_minute,
            envelope=args.envelope,
        )
        if args.webhooks:
            emulator.webhooks(**_webhook_options(args))  # checks the options
    except ValueError as exc:
        parser.error(str(exc))
    try:
        anyio.run(_serve, emulator, args, backend=args.backend)
    except OSError as exc:  # e.g. the port is in use
        where = f"{args.host} (--port {args.port}, --image-port {args.image_port})"
        print(
            f"{parser.prog}: error: cannot listen on {where}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
