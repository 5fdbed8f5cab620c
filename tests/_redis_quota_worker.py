"""Child process of tests/test_redis_ratelimit.py: one of several processes sharing a quota.

    python tests/_redis_quota_worker.py REDIS_URL KEY BASE_URL API_KEY
        --quota Q --window W --scale K --weights 1,2,3,... --concurrency C

Prints ``{"event": "ready"}`` once connected, waits for a line on stdin (so every
process starts at once), then POSTs one txt2img per weight (``image_num`` = weight)
through a shared :class:`~novita_async.redis.RedisRateLimiter` of ``Q`` images per ``W``
seconds, ``C`` at a time. A 429 is reported to the limiter (``Retry-After`` divided
by ``K``: the emulator's clock runs ``K`` times faster than real time) and retried.
Ends with ``{"event": "done", "rate_limited": n}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import anyio
import httpx

from novita_async import Txt2ImgRequest
from novita_async._convert import request_body
from novita_async.redis import RedisRateLimiter


def emit(**line: Any) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


async def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("redis_url", "key", "base_url", "api_key"):
        parser.add_argument(name)
    parser.add_argument("--quota", type=float, required=True)
    parser.add_argument("--window", type=float, required=True)
    parser.add_argument("--scale", type=float, required=True)
    parser.add_argument("--margin", type=float, default=0.05)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    weights = [int(w) for w in args.weights.split(",")]
    rate_limited = 0
    limiter = RedisRateLimiter(
        args.redis_url,
        args.quota,
        key=args.key,
        window=args.window,
        margin=args.margin,
        recovery_period=args.window / 10,
    )
    headers = {"Authorization": f"Bearer {args.api_key}"}
    async with limiter, httpx.AsyncClient(base_url=args.base_url, headers=headers) as http:
        await limiter.flush()  # connected
        emit(event="ready")
        await anyio.to_thread.run_sync(sys.stdin.readline)
        send, receive = anyio.create_memory_object_stream[int](len(weights))
        for weight in weights:
            send.send_nowait(weight)
        send.close()

        async def worker() -> None:
            nonlocal rate_limited
            async for weight in receive:
                request = Txt2ImgRequest(model_name="m.safetensors", prompt="p", image_num=weight)
                while True:
                    admission = await limiter.acquire(weight)
                    answer = await http.post("/v3/async/txt2img", json=request_body(request, None))
                    if answer.status_code != 429:
                        answer.raise_for_status()
                        break
                    rate_limited += 1
                    retry_after = float(answer.headers["retry-after"]) / args.scale
                    limiter.on_rate_limited(retry_after, admission)

        async with anyio.create_task_group() as tg:
            for _ in range(args.concurrency):
                tg.start_soon(worker)
    emit(event="done", rate_limited=rate_limited)


if __name__ == "__main__":
    asyncio.run(main())
