"""``python -m novita_async.testing``: run the emulator on loopback until SIGTERM/SIGINT.

Prints one JSON line ``{"base_url": ..., "image_base_url": ...}`` on stdout once
listening, so a parent process (a test, a benchmark) can read where it is.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence

import anyio

from ._emulator import DEFAULT_API_KEY, NovitaEmulator
from ._tasks import DurationSpec


def _durations(text: str) -> DurationSpec:
    parts = [float(part) for part in text.split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError("use SECONDS or LO,HI")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m novita_async.testing",
        description="Serve the Novita v3 API emulator on loopback (API + image host).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="API port (0: any free port)")
    p.add_argument("--image-port", type=int, default=0, help="image host port (0: any)")
    p.add_argument("--durations", type=_durations, default=(1.0, 3.0), help="SECONDS or LO,HI")
    p.add_argument("--workers", type=int, default=None, help="tasks processed at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=DEFAULT_API_KEY)
    p.add_argument("--failure-rate", type=float, default=0.0)
    p.add_argument("--queue-delay", type=float, default=0.0)
    p.add_argument("--image-url-ttl", type=float, default=3600.0)
    p.add_argument("--images-per-minute", type=float, default=None, help="enforce an IPM quota")
    p.add_argument("--envelope", action="store_true", help="answer txt2img in the v2 envelope")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return p


async def _serve(emulator: NovitaEmulator, args: argparse.Namespace) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with emulator.serve(args.host, args.port, image_port=args.image_port) as server:
            line = {"base_url": server.base_url, "image_base_url": server.image_base_url}
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
    except ValueError as exc:
        parser.error(str(exc))
    anyio.run(_serve, emulator, args, backend=args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
