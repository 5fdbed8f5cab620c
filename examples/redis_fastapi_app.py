"""FastAPI under several workers, one Novita account: a shared quota and a webhook relay.

Every uvicorn worker (and every pod) is its own process with its own client. Through
Redis they share:

* ONE images-per-minute quota and ONE slow-down after a 429
  (:class:`~novita_async.redis.RedisRateLimiter`, passed as ``rate_limiter=``): four
  workers pace together at the account's rate instead of four times it;
* webhook deliveries (:class:`~novita_async.redis.RedisWebhookRelay`, passed as
  ``webhook_relay=``): Novita posts a task's webhook to whichever worker the load
  balancer picks; that worker's client hands a delivery it is not waiting for to
  the relay, and the worker whose request waits for that task gets it. Each delivery
  is still confirmed by exactly one GET, by the worker that waits for it.

Run it (``pip install 'novita-async[redis]' fastapi uvicorn``, a Redis on localhost)::

    export REDIS_URL=redis://localhost:6379/0 NOVITA_API_KEY=...
    export PUBLIC_URL=https://my.app          # where Novita can reach this app
    uvicorn examples.redis_fastapi_app:app --workers 4

    curl -X POST localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"prompts": ["a red fox in the snow", "a lighthouse in a storm"]}'

Locally, without an account: ``python -m novita_async.testing --port 9000
--images-per-minute 20`` runs the emulator; add ``NOVITA_BASE_URL=http://127.0.0.1:9000``.

asyncio only: redis-py's client does not run on trio (uvicorn runs asyncio).
tests/test_examples.py runs two of these apps ("workers") against one Redis.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, Field

from novita_async import AsyncNovita, InvalidRequestError, Txt2ImgRequest
from novita_async.redis import RedisRateLimiter, RedisUnavailableError, RedisWebhookRelay

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
#: Novita's default txt2img quota; set yours (Novita's dashboard shows it).
IMAGES_PER_MINUTE = float(os.environ.get("NOVITA_IMAGES_PER_MINUTE", "20"))
WEBHOOK_PATH = "/webhooks/novita"


class GenerateBody(BaseModel):
    prompts: list[str] = Field(min_length=1, max_length=100)
    model: str = "sd_xl_base_1.0.safetensors"
    image_num: int = Field(default=1, ge=1, le=8)
    timeout: float | None = Field(default=300.0, gt=0)


class GeneratedItem(BaseModel):
    index: int
    task_id: str | None
    image_urls: list[str]
    error: str | None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        # One Redis client per worker, shared by the limiter and the relay.
        limiter = await stack.enter_async_context(
            RedisRateLimiter(REDIS_URL, IMAGES_PER_MINUTE, key="novita:ratelimit")
        )
        relay = await stack.enter_async_context(
            RedisWebhookRelay(REDIS_URL, channel="novita:webhooks")
        )
        public_url = os.environ.get("PUBLIC_URL")
        base_url = os.environ.get("NOVITA_BASE_URL") or "https://api.novita.ai"
        client = await stack.enter_async_context(
            AsyncNovita(
                base_url=base_url,
                rate_limiter=limiter,  # every submission of this worker, shared quota
                webhook_url=f"{public_url}{WEBHOOK_PATH}" if public_url else None,
                webhook_relay=relay,  # the client runs relay.serve() in its task group
            )
        )
        app.state.novita = client
        yield


app = FastAPI(title="novita_async on Redis", lifespan=lifespan)


@app.post("/generate")
async def generate(body: GenerateBody, request: Request) -> list[GeneratedItem]:
    """Generate one image set per prompt; paced by the quota shared by every worker."""
    client: AsyncNovita = request.app.state.novita
    try:
        jobs = [
            Txt2ImgRequest(model_name=body.model, prompt=prompt, image_num=body.image_num)
            for prompt in body.prompts
        ]
    except InvalidRequestError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    items = await client.txt2img_all(jobs, timeout=body.timeout)
    return [
        GeneratedItem(
            index=item.index,
            task_id=item.task_id,
            image_urls=[image.image_url for image in item.result.images]
            if item.result is not None and item.error is None
            else [],
            error=None if item.error is None else str(item.error),
        )
        for item in items
    ]


@app.post(WEBHOOK_PATH)
async def novita_webhook(request: Request) -> Response:
    """Novita's deliveries, whichever worker they reach. The body is never trusted: the
    client confirms with one GET (only for a task someone waits on, here or, through the
    relay, on another worker) and ignores duplicates and strangers' ids."""
    client: AsyncNovita = request.app.state.novita
    try:
        await client.receive_webhook(await request.body())
    except RedisUnavailableError:
        # Not relayed: answer non-2xx so that Novita delivers it again (up to 5 times).
        return Response(status_code=503)
    return Response(status_code=204)
