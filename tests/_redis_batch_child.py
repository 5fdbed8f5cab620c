"""Child process of tests/test_redis_batch.py: a batch through the engine, journaled in Redis.

    python tests/_redis_batch_child.py --redis-url URL --name NAME --base-url URL
        --api-key KEY --prompts N [--concurrency C] [--lease S] [--hold-after K] [--on-go]

It runs ``AsyncNovita.txt2img_many(requests, journal=RedisJournal(URL, NAME, lease=S))``
(asyncio: the Redis extra is asyncio-only) on the prompts ``redis prompt 00`` ..
``redis prompt N-1``, so every run with the same ``--prompts`` is the same batch, and
prints JSON lines: ``{"event": "ready"}`` once imported; per run ``{"event": "item",
"index", "task_id", "status", "error_type", "error", "from_journal"}`` per item, then
``{"event": "done", "submitted"}`` or, if the run raised, ``{"event": "failed",
"error_type", "error", "leaves"}`` (``leaves``: the exception types inside a group).

``--on-go``: wait for a ``go`` line on stdin before each run (one run per line; EOF
ends the process), so that the test can start the process (slow imports) ahead and
make it try the journal at a chosen moment. Without it: one run at once.

``--hold-after K`` lets K txt2img POSTs through and holds every later one *before it
is sent* (``{"event": "held", "prompt"}``). A ``release N`` line on stdin sends the
N oldest held POSTs for real (``{"event": "released", "prompt"}``); the others stay
held until the process dies. So the test can kill the process with prompts journaled
``submitting`` whose POST never left, and others whose POST reached the emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import anyio
import anyio.abc
import httpx

from novita_async import AsyncNovita, Txt2ImgRequest
from novita_async.redis import RedisJournal

TXT2IMG_PATH = "/v3/async/txt2img"


def prompts(n: int) -> list[str]:
    return [f"redis prompt {i:02d}" for i in range(n)]


def emit(**line: Any) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


class HoldingTransport(httpx.AsyncBaseTransport):
    """Forwards to a real transport; txt2img POSTs after the first ``hold_after`` wait for
    :meth:`release` before they are sent."""

    def __init__(self, inner: httpx.AsyncBaseTransport, hold_after: int | None) -> None:
        self.inner = inner
        self.hold_after = hold_after
        self.posts = 0
        self.held: list[anyio.Event] = []

    def release(self, count: int) -> None:
        for _ in range(min(count, len(self.held))):
            self.held.pop(0).set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == TXT2IMG_PATH:
            self.posts += 1
            if self.hold_after is not None and self.posts > self.hold_after:
                prompt = json.loads(request.content)["request"]["prompt"]
                gate = anyio.Event()
                self.held.append(gate)
                emit(event="held", prompt=prompt)
                await gate.wait()
                emit(event="released", prompt=prompt)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def leaves(exc: BaseException) -> list[str]:
    inner = getattr(exc, "exceptions", None)  # an exception group
    if inner is None:
        return [type(exc).__name__]
    return [name for each in inner for name in leaves(each)]


async def run_batch(args: argparse.Namespace, transport: HoldingTransport) -> None:
    requests = [Txt2ImgRequest(model_name="redis-model", prompt=p) for p in prompts(args.prompts)]
    journal = RedisJournal(args.redis_url, args.name, lease=args.lease)
    try:
        async with AsyncNovita(args.api_key, base_url=args.base_url, transport=transport) as client:
            batch = client.txt2img_many(
                requests, max_concurrent_submissions=args.concurrency, journal=journal
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
                        from_journal=item.from_journal,
                    )
            submitted = batch.submitted
    except Exception as exc:  # the run's own failure (the journal, Redis): reported
        emit(event="failed", error_type=type(exc).__name__, error=str(exc), leaves=leaves(exc))
    else:
        emit(event="done", submitted=submitted)
    finally:
        await journal.aclose()  # idempotent; closes the client if the engine never opened it


async def read_commands(
    transport: HoldingTransport, runs: anyio.abc.ObjectSendStream[None]
) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with runs:
        while line := (await reader.readline()).decode():
            command, *rest = line.split()
            if command == "go":
                await runs.send(None)
            elif command == "release":
                transport.release(int(rest[0]))


async def main(args: argparse.Namespace) -> None:
    transport = HoldingTransport(httpx.AsyncHTTPTransport(), args.hold_after)
    send, receive = anyio.create_memory_object_stream[None](10)
    emit(event="ready")
    async with anyio.create_task_group() as group:
        group.start_soon(read_commands, transport, send)
        if args.on_go:
            async with receive:
                async for _ in receive:
                    await run_batch(args, transport)
        else:
            await run_batch(args, transport)
        group.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--prompts", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--hold-after", type=int, default=None)
    parser.add_argument("--on-go", action="store_true")
    anyio.run(main, parser.parse_args(), backend="asyncio")
