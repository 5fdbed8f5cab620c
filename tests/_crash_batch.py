"""Child process of tests/test_journal_crash.py: run one journaled batch, print JSON lines.

    python tests/_crash_batch.py --base-url URL --api-key KEY --journal PATH --prompts N
        [--concurrency C] [--hold-after K] [--resubmit-uncertain] [--backend trio]

The prompts are always ``crash prompt 00`` .. ``crash prompt N-1``, so every run
of the same ``--prompts`` is the same batch. One line per finished item:
``{"event": "item", "index", "task_id", "status", "error_type", "error"}``, then
``{"event": "done"}``. ``--hold-after K`` lets K txt2img POSTs through and
holds every later one *before it is sent*: the test can then kill the process
with POSTs that are journaled as ``submitting`` but certainly never reached the
server. On SIGINT the batch is cancelled (what Ctrl-C does to an anyio program),
held POSTs fail as never sent, ``{"event": "interrupted"}`` is printed and the
exit status is 130. (The batch shields a POST in flight from cancellation so
its task id is not lost; a held POST therefore has to end by itself.)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

import anyio
import httpx

from novita_async import AsyncNovita, Txt2ImgRequest

TXT2IMG_PATH = "/v3/async/txt2img"


def prompts(n: int) -> list[str]:
    return [f"crash prompt {i:02d}" for i in range(n)]


def emit(**line: Any) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


class HoldingTransport(httpx.AsyncBaseTransport):
    """Forwards to a real transport, but holds txt2img POSTs after the first ``hold_after``.

    A held POST waits until :meth:`release`, then fails as never sent.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, hold_after: int | None) -> None:
        self.inner = inner
        self.hold_after = hold_after
        self.posts = 0
        self.released = anyio.Event()

    def release(self) -> None:
        self.released.set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == TXT2IMG_PATH:
            self.posts += 1
            if self.hold_after is not None and self.posts > self.hold_after:
                emit(event="held", post=self.posts)
                await self.released.wait()
                raise httpx.ConnectError("held by the test: never sent", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def on_sigint(
    scope: anyio.CancelScope, transport: HoldingTransport, flag: list[bool]
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            flag.append(True)
            scope.cancel()
            transport.release()
            return


async def run(args: argparse.Namespace) -> bool:
    """Run the batch; True if it was interrupted by SIGINT."""
    transport = HoldingTransport(httpx.AsyncHTTPTransport(), args.hold_after)
    interrupted: list[bool] = []
    async with anyio.create_task_group() as group:
        group.start_soon(on_sigint, group.cancel_scope, transport, interrupted)
        await batch(args, transport)
        group.cancel_scope.cancel()
    return bool(interrupted)


async def batch(args: argparse.Namespace, transport: HoldingTransport) -> None:
    requests = [Txt2ImgRequest(model_name="crash-model", prompt=p) for p in prompts(args.prompts)]
    async with AsyncNovita(args.api_key, base_url=args.base_url, transport=transport) as client:
        batch = client.txt2img_many(
            requests,
            max_concurrent_submissions=args.concurrency,
            journal=args.journal,
            resubmit_uncertain=args.resubmit_uncertain,
        )
        async with batch:
            async for item in batch:
                error = item.error
                emit(
                    event="item",
                    index=item.index,
                    task_id=item.task_id,
                    status=None if item.result is None else item.result.status.value,
                    error_type=None if error is None else type(error).__name__,
                    error=None if error is None else str(error),
                )
    emit(event="done")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--prompts", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--hold-after", type=int, default=None)
    parser.add_argument("--resubmit-uncertain", action="store_true")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()
    if anyio.run(run, args, backend=args.backend):
        emit(event="interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
