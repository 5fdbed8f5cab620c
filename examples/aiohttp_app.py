"""aiohttp + novita_async: the client lives in ``cleanup_ctx``; fan-out and webhook endpoints.

Run it::

    NOVITA_API_KEY=... python examples/aiohttp_app.py
    NOVITA_EMULATOR=1 python examples/aiohttp_app.py       # on the built-in emulator
    NOVITA_WEBHOOK_URL=https://my.app/webhooks/novita ...  # waits driven by Novita's deliveries

    curl -X POST localhost:8080/generate -d '{"prompts": ["a red fox in the snow"]}'

One :class:`AsyncNovita` is created when the app starts and closed when it
stops; every request shares it. Tests build the app with
``create_app(client_factory=...)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from novita_async import AsyncNovita, InvalidRequestError, Txt2ImgRequest

ClientFactory = Callable[[], AsyncNovita]

NOVITA = web.AppKey("novita", AsyncNovita)
RECEIVED = web.AppKey("received", dict[str, str])  # task_id -> status; stands in for a database


def default_client() -> AsyncNovita:
    """The real API (``NOVITA_API_KEY``), or the in-process emulator with ``NOVITA_EMULATOR=1``."""
    webhook_url = os.environ.get("NOVITA_WEBHOOK_URL") or None
    if os.environ.get("NOVITA_EMULATOR") == "1":
        from novita_async.testing import NovitaEmulator

        return NovitaEmulator(durations=(0.5, 2.0)).client(webhook_url=webhook_url)
    return AsyncNovita(webhook_url=webhook_url)


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


async def generate(request: web.Request) -> web.Response:
    """POST ``{"prompts": [...], "model": ..., "timeout": ...}``; one item per prompt."""
    try:
        body: Any = await request.json()
    except ValueError:
        raise _bad_request("body is not JSON") from None
    prompts = body.get("prompts") if isinstance(body, dict) else None
    if not isinstance(prompts, list) or not prompts or len(prompts) > 100:
        raise _bad_request("'prompts' must be a list of 1 to 100 strings")
    try:
        jobs = [
            Txt2ImgRequest(
                model_name=body.get("model", "sd_xl_base_1.0.safetensors"),
                prompt=prompt,
                image_num=body.get("image_num", 1),
            )
            for prompt in prompts
        ]
    except InvalidRequestError as exc:
        raise _bad_request(str(exc)) from None
    items = await request.app[NOVITA].txt2img_all(jobs, timeout=body.get("timeout", 300.0))
    return web.json_response(
        {
            "items": [
                {
                    "index": item.index,
                    "prompt": item.request.prompt,
                    "task_id": item.task_id,
                    "ok": item.error is None,
                    "image_urls": [image.image_url for image in item.result.images]
                    if item.result is not None and item.error is None
                    else [],
                    "error": None if item.error is None else str(item.error),
                }
                for item in items
            ]
        }
    )


async def novita_webhook(request: web.Request) -> web.Response:
    """Novita's unsigned deliveries: one confirming GET for a task a request here waits
    on (every waiter wakes); duplicates, forgeries and strangers' ids cost nothing."""
    result = await request.app[NOVITA].receive_webhook(await request.read())
    if result is None:
        return web.json_response({"status": "ignored"})  # nothing confirmed
    request.app[RECEIVED][result.task_id] = result.status.name  # your processing goes here
    return web.json_response({"status": "accepted", "task_id": result.task_id})


def create_app(client_factory: ClientFactory = default_client) -> web.Application:
    async def novita_client(app: web.Application) -> AsyncIterator[None]:
        async with client_factory() as client:
            app[NOVITA] = client
            yield

    app = web.Application()
    app[RECEIVED] = {}
    app.cleanup_ctx.append(novita_client)
    app.router.add_post("/generate", generate)
    app.router.add_post("/webhooks/novita", novita_webhook)
    return app


if __name__ == "__main__":
    web.run_app(create_app())
