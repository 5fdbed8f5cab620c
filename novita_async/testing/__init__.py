"""A local emulator of Novita's v3 async image API, for tests, benchmarks and demos.

It speaks the API your code talks to (``POST /v3/async/txt2img``,
``GET /v3/async/task-result``, ``GET /v3/model``) plus an image host on
another origin, with Novita's real quirks: string ``seed`` and
``image_url_ttl``, ``progress_percent`` 0 on finished tasks, error bodies
``{code, reason, message, metadata}``, presigned image URLs that expire with
S3's XML ``AccessDenied``. Nothing runs in the background: task states are
computed from a clock at each request, so tests can step time by hand.

In-process (no sockets; ``emu.client()`` is an ``AsyncNovita`` wired to it)::

    from novita_async import Txt2ImgRequest
    from novita_async.testing import NovitaEmulator

    async def test_generates() -> None:
        emu = NovitaEmulator(durations=(0.05, 0.2))
        async with emu.client() as client:
            result = await client.txt2img(Txt2ImgRequest(model_name="m", prompt="a cat"))
        assert len(result.images) == 1 and emu.tasks_created == 1
        assert emu.image_auth_headers == 0  # the key never went to the image host

Any ``httpx.AsyncClient`` can use ``emu.transport()`` (the API answers on
:data:`API_BASE_URL`, images on :data:`IMAGE_BASE_URL`). Over real loopback
sockets (works on asyncio and trio)::

    async with emu.serve() as server:       # 127.0.0.1, two free ports
        async with server.client() as client:  # or any client on server.base_url
            ...

or from another process: ``python -m novita_async.testing --port 0 --durations 1,3``
prints ``{"base_url": ..., "image_base_url": ..., "api_key": ...}`` as one JSON
line and stops on SIGTERM/SIGINT.

The emulator accepts exactly one API key, :data:`DEFAULT_API_KEY`
(``"emulator-key"``) unless ``api_key=`` / ``--api-key`` says otherwise; any
other key gets 403 ``INVALID_API_KEY``, like Novita. To run the CLI or your
own app against the loopback emulator::

    python -m novita_async.testing --port 8765 &     # add --webhooks to deliver them
    NOVITA_API_KEY=emulator-key novita-async generate "a cat" \
        --base-url http://127.0.0.1:8765 --out cats
    # your app: AsyncNovita(api_key="emulator-key", base_url="http://127.0.0.1:8765")

Webhooks: a task whose body has ``extra.webhook.url`` gets its
``{"event_type": "ASYNC_TASK_RESULT", "payload": <task-result>}`` POSTed there
when it ends, while a sender runs (it needs a task group)::

    async with emu.webhooks(deliver=my_receiver, delay=(0.05, 0.2),
                            duplicate_rate=0.2, loss_rate=0.05, seed=1) as hooks:
        ...                                  # submit with Extra(webhook=Webhook(url=...))
        await hooks.forge(url, task_id, status="TASK_STATUS_SUCCEED")  # a forgery
    hooks.stats.sent, hooks.stats.duplicates, hooks.stats.lost, hooks.stats.per_task

``deliver=None`` POSTs over HTTP (httpx); ``deliver=async f(url, body) -> status``
delivers in-process. Non-2xx, errors and 5 s timeouts are retried up to 5 times,
like Novita. ``emu.serve(webhooks={...})`` runs a sender with the server (image
URLs then point at the loopback image host).
``extra.webhook.test_mode`` with ``enabled: true`` makes the event a mock with
``return_task_status`` (FAILED: no images), like Novita's test mode.

Stepping time and injecting faults::

    clock = ManualClock()
    emu = NovitaEmulator(clock=clock, durations=2.0, workers=4)
    ...submit...
    clock.advance(2.0)                          # the task is now SUCCEED
    emu.fail_next("task-result", status=503, times=2, retry_after=1)
    emu.fail_next("txt2img", reset=True, after_create=True)  # created, answer lost
    emu.rate_limit(images_per_minute=20)        # 429 + Retry-After, weight = image_num

The image host answers a request that carries ``Authorization`` with S3's
400 ``InvalidArgument`` and counts it in ``emu.image_auth_headers``, so a
test can prove the API key never leaves for another host.

Conventions: a prompt containing ``"[fail]"`` ends FAILED with reason
``"emulated failure"``; ``durations`` is ``(lo, hi)`` (seeded uniform), a
number, a callable of the POST JSON body or
``NovitaEmulator.proportional(seconds_per_cost=...)``. Counters:
``tasks_created``, ``submissions``, ``polls[task_id]``, ``polls_total``,
``image_requests``, ``image_auth_headers``, ``model_requests``,
``rate_limited``; ``tasks[task_id]`` records each task's times
(``created_at``, ``started_at``, ``completed_at``, ``first_terminal_poll_at``).
``report_eta=False`` hides ``eta`` (always 0), ``not_found_for=`` makes new
tasks 404 for a while, ``strict_models=True`` checks ``model_name`` against
the ``GET /v3/model`` catalogue (:func:`default_models`).

Images: PNGs are real pictures at the requested size, drawn from the task's
seed; JPEG and WebP are tiny placeholders. Limits: only txt2img creates tasks;
the in-process transport applies the request's *read* timeout to the whole answer.
"""

from ._delivery import WebhookSender, WebhookStats
from ._emulator import (
    API_BASE_URL,
    DEFAULT_API_KEY,
    FAIL_MARKER,
    FAILURE_REASON,
    IMAGE_BASE_URL,
    EmulatedReset,
    EmulatedTask,
    EmulatorTransport,
    ManualClock,
    NovitaEmulator,
    Proportional,
    default_models,
    request_cost,
)
from ._server import EmulatorServer

__all__ = [
    "API_BASE_URL",
    "DEFAULT_API_KEY",
    "FAILURE_REASON",
    "FAIL_MARKER",
    "IMAGE_BASE_URL",
    "EmulatedReset",
    "EmulatedTask",
    "EmulatorServer",
    "EmulatorTransport",
    "ManualClock",
    "NovitaEmulator",
    "Proportional",
    "WebhookSender",
    "WebhookStats",
    "default_models",
    "request_cost",
]
