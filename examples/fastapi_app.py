"""FastAPI + novita_async: one shared client, a fan-out endpoint and a webhook receiver.

Run it (``pip install fastapi uvicorn``)::

    NOVITA_API_KEY=... uvicorn examples.fastapi_app:app
    NOVITA_EMULATOR=1 uvicorn examples.fastapi_app:app     # on the built-in emulator
    NOVITA_WEBHOOK_URL=https://my.app/webhooks/novita ...  # waits driven by Novita's deliveries

    curl -X POST localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"prompts": ["a red fox in the snow", "a lighthouse in a storm"]}'

The app creates ONE :class:`AsyncNovita` in its lifespan: every request shares
its connection pool and its polling scheduler (a hundred concurrent requests
waiting on tasks cost one poll per task, not a hundred polling loops). With
``NOVITA_WEBHOOK_URL`` set, every task carries that webhook and the route below
hands each delivery to ``client.receive_webhook``: one confirming GET per task,
no polling.
Tests build the app with ``create_app(client_factory=...)``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from novita_async import AsyncNovita, InvalidRequestError, Txt2ImgRequest

ClientFactory = Callable[[], AsyncNovita]


def default_client() -> AsyncNovita:
    """The real API (``NOVITA_API_KEY``), or the in-process emulator with ``NOVITA_EMULATOR=1``."""
    webhook_url = os.environ.get("NOVITA_WEBHOOK_URL") or None
    if os.environ.get("NOVITA_EMULATOR") == "1":
        from novita_async.testing import NovitaEmulator

        return NovitaEmulator(durations=(0.5, 2.0)).client(webhook_url=webhook_url)
    return AsyncNovita(webhook_url=webhook_url)


class GenerateBody(BaseModel):
    prompts: list[str] = Field(min_length=1, max_length=100)
    model: str = "sd_xl_base_1.0.safetensors"
    width: int = 512
    height: int = 512
    steps: int = 20
    image_num: int = 1
    timeout: float | None = Field(default=300.0, gt=0)


class GeneratedItem(BaseModel):
    index: int
    prompt: str
    task_id: str | None
    ok: bool
    image_urls: list[str]
    error: str | None


class GenerateResponse(BaseModel):
    items: list[GeneratedItem]


def create_app(client_factory: ClientFactory = default_client) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with client_factory() as client:
            app.state.novita = client
            app.state.received = {}  # task_id -> status name; stands in for your database
            yield

    app = FastAPI(title="novita_async example", lifespan=lifespan)

    @app.post("/generate")
    async def generate(body: GenerateBody, request: Request) -> GenerateResponse:
        """Fan the prompts out; one item per prompt, failures included."""
        client: AsyncNovita = request.app.state.novita
        try:
            jobs = [
                Txt2ImgRequest(
                    model_name=body.model,
                    prompt=prompt,
                    width=body.width,
                    height=body.height,
                    steps=body.steps,
                    image_num=body.image_num,
                )
                for prompt in body.prompts
            ]
        except InvalidRequestError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        items = await client.txt2img_all(jobs, timeout=body.timeout)
        return GenerateResponse(
            items=[
                GeneratedItem(
                    index=item.index,
                    prompt=item.request.prompt,
                    task_id=item.task_id,
                    ok=item.error is None,
                    image_urls=[image.image_url for image in item.result.images]
                    if item.result is not None and item.error is None
                    else [],
                    error=None if item.error is None else str(item.error),
                )
                for item in items
            ]
        )

    @app.post("/webhooks/novita")
    async def novita_webhook(request: Request) -> dict[str, str]:
        """Novita's deliveries. They are not signed, so the client never trusts them: a
        delivery for a task some request here waits on is confirmed with ONE GET and wakes
        every waiter; duplicates, forgeries and strangers' ids cost nothing. Answer 2xx."""
        client: AsyncNovita = request.app.state.novita
        result = await client.receive_webhook(await request.body())
        if result is None:
            return {"status": "ignored"}  # nothing confirmed: duplicate, unknown, forged
        request.app.state.received[result.task_id] = result.status.name  # your processing
        return {"status": "accepted", "task_id": result.task_id}

    return app


app = create_app()
