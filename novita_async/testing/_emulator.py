"""The emulator facade: configuration, counters and request routing.

One :class:`NovitaEmulator` holds every task, counter and injected fault; its
:meth:`NovitaEmulator.handle` turns an :class:`httpx.Request` into an
:class:`httpx.Response` and is shared by the in-process transport and the
loopback server. Task state is derived lazily from the clock at each request:
no background tasks, O(1) (O(log workers)) work per request. The parts live in
their own modules: wire types (``_wire``), tasks and durations (``_tasks``),
validation (``_validation``), faults (``_faults``), the IPM quota (``_quota``)
and the image host (``_images``).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import anyio
import httpx

from ._catalogue import Catalogue, default_models
from ._delivery import Deliver, WebhookSender, WebhookStats
from ._faults import Fault, Faults, fault_reply
from ._images import IMAGE_TYPES, ImageHost
from ._quota import Quota
from ._server import EmulatorServer
from ._tasks import (
    DurationSpec,
    EmulatedTask,
    ManualClock,
    Proportional,
    duration_source,
    request_cost,
    request_info,
    result_body,
)
from ._validation import validate_txt2img
from ._wire import (
    API_BASE_URL,
    ENDPOINTS,
    IMAGE_BASE_URL,
    IMAGE_HOST,
    MODEL_PATH,
    TASK_RESULT_PATH,
    TXT2IMG_PATH,
    Call,
    EmulatedReset,
    Endpoint,
    Reply,
    error,
    format_seconds,
    json_reply,
    parse_query,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .._client import AsyncNovita, ClientOptions

__all__ = [
    "API_BASE_URL",
    "DEFAULT_API_KEY",
    "ENDPOINTS",
    "FAILURE_REASON",
    "FAIL_MARKER",
    "IMAGE_BASE_URL",
    "EmulatedReset",
    "EmulatedTask",
    "EmulatorTransport",
    "ManualClock",
    "NovitaEmulator",
    "Proportional",
    "default_models",
    "request_cost",
]

#: The API key the emulator accepts unless told otherwise (``api_key=``).
DEFAULT_API_KEY = "emulator-key"
#: A prompt containing this marker makes the emulated task end FAILED.
FAIL_MARKER = "[fail]"
FAILURE_REASON = "emulated failure"


class NovitaEmulator:
    """A local emulator of Novita's v3 async image API (see the package docstring).

    Args:
        durations: seconds a task runs: ``(lo, hi)`` drawn uniformly from the
            seeded RNG, a fixed number, or a callable taking the POST JSON body
            (e.g. :meth:`proportional`).
        workers: ``None`` runs every task at once; ``N`` runs N at a time and
            queues the rest FIFO (``eta`` includes the queue wait).
        api_key: the only key accepted (``Authorization: Bearer <key>``);
            default :data:`DEFAULT_API_KEY` (``"emulator-key"``).
        clock: time source for task states, URL expiry and the rate window
            (default :func:`time.monotonic`; :class:`ManualClock` or
            :func:`anyio.current_time` in tests).
        seed: seeds task ids, durations, failures and image seeds.
        failure_rate: probability that a task ends FAILED (besides prompts
            containing ``[fail]``).
        queue_delay: seconds every task stays QUEUED before it can start: a number,
            ``(lo, hi)`` drawn uniformly, or a callable of the POST JSON body.
        image_url_ttl: seconds image URLs stay valid after completion (3600).
        envelope: answer txt2img with the v2 envelope ``{"code":0,"msg":"","data":{...}}``.
        latency: seconds every request takes (slept on anyio's clock).
        not_found_for: task-result answers 404 TASK_NOT_FOUND this long after creation.
        report_eta: ``False`` answers ``eta`` 0 while tasks run (as Novita's image
            examples show), leaving a poller no server hint; ``"whole"`` answers
            whole seconds left, rounded up; ``True``: exact seconds.
        images_per_minute: enforce Novita's IPM quota (429 + Retry-After); see :meth:`rate_limit`.
        models: the ``GET /v3/model`` catalogue (default :func:`default_models`).
        strict_models: reject txt2img whose ``model_name`` is not a catalogue checkpoint.
        stamps: ``False`` answers ``debug_info``'s submit, execute and complete times
            ``""`` (Novita's examples show them; a proxy or another server may not).
    """

    API_BASE_URL = API_BASE_URL
    IMAGE_BASE_URL = IMAGE_BASE_URL

    def __init__(
        self,
        *,
        durations: DurationSpec = (1.0, 3.0),
        workers: int | None = None,
        api_key: str = DEFAULT_API_KEY,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
        failure_rate: float = 0.0,
        queue_delay: DurationSpec = 0.0,
        image_url_ttl: float = 3600.0,
        envelope: bool = False,
        latency: float = 0.0,
        not_found_for: float = 0.0,
        report_eta: bool | Literal["whole"] = True,
        images_per_minute: float | None = None,
        models: Iterable[Mapping[str, Any]] | None = None,
        strict_models: bool = False,
        stamps: bool = True,
    ) -> None:
        self._rng = random.Random(seed)
        self._durations = durations
        self._duration = duration_source(durations, self._rng, name="durations")
        if workers is not None and workers < 1:
            raise ValueError("workers must be None (unbounded) or >= 1")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError("failure_rate must be within [0, 1]")
        self._queue_delay = duration_source(queue_delay, self._rng, name="queue_delay")
        delays = (latency, not_found_for, image_url_ttl)
        if not all(math.isfinite(d) for d in delays) or min(delays[:2]) < 0 or image_url_ttl <= 0:
            raise ValueError("delays must be finite and >= 0, and image_url_ttl finite and > 0")
        if not api_key:
            raise ValueError("api_key must be non-empty")
        self.api_key = api_key
        self.clock = clock
        self.workers = workers
        self.failure_rate = failure_rate
        self.queue_delay = queue_delay
        self.image_url_ttl = image_url_ttl
        self.envelope = envelope
        self.latency = latency
        self.not_found_for = not_found_for
        self.report_eta = report_eta
        self.strict_models = strict_models
        self.stamps = stamps
        self._images = ImageHost(hashlib.sha256(f"novita-emulator:{seed}".encode()).digest())
        self._epoch_offset: float | None = None  # set at first use: clock() may need a loop
        self._worker_free: list[float] = [] if workers is None else [-math.inf] * workers
        self._faults = Faults()
        self._quota = Quota()
        self.rate_limit(images_per_minute)
        self.catalogue = Catalogue(default_models() if models is None else models)
        #: Called with each new task (the webhook sender listens here).
        self._on_create: list[Callable[[EmulatedTask], None]] = []
        self._senders: list[WebhookSender] = []
        #: Webhook deliveries, duplicates, losses, forgeries (see :meth:`webhooks`).
        self.webhook_stats = WebhookStats()

        #: Every created task, by id.
        self.tasks: dict[str, EmulatedTask] = {}
        #: Tasks created (txt2img answered or faulted after creation).
        self.tasks_created = 0
        #: txt2img POSTs received (whatever became of them).
        self.submissions = 0
        #: task-result requests received per ``task_id`` (known or not, faulted or not).
        self.polls: Counter[str] = Counter()
        self.polls_total = 0
        self.image_requests = 0
        #: Image requests that carried an ``Authorization`` header (must stay 0).
        self.image_auth_headers = 0
        self.model_requests = 0
        #: txt2img requests refused with 429 by the IPM limiter.
        self.rate_limited = 0

    def __repr__(self) -> str:
        return (
            f"NovitaEmulator(durations={self._durations!r}, workers={self.workers!r}, "
            f"tasks={len(self.tasks)})"
        )

    # ------------------------------------------------------------- configuration

    proportional = staticmethod(Proportional)

    def rate_limit(self, images_per_minute: float | None = 20) -> None:
        """Enforce an images-per-minute quota on txt2img (``None`` turns it off).

        Each request weighs its ``image_num``; over quota it gets 429
        RATE_LIMIT_EXCEEDED with ``Retry-After`` (whole seconds until enough of
        the sliding 60 s window frees up). A request heavier than the whole
        quota is let through once the window is empty.
        """
        self._quota = Quota(images_per_minute)

    def fail_next(
        self,
        endpoint: Endpoint,
        *,
        status: int | None = 500,
        times: int = 1,
        retry_after: float | None = None,
        reason: str | None = None,
        message: str | None = None,
        reset: bool = False,
        malformed: bool = False,
        envelope: bool = False,
        envelope_code: int = 0,
        delay: float = 0.0,
        after_create: bool = False,
    ) -> None:
        """Inject a fault into the next ``times`` requests to ``endpoint``.

        ``endpoint`` is ``"txt2img"``, ``"task-result"``, ``"model"`` or ``"image"``.
        After ``delay`` seconds the request gets, by priority:

        * ``reset=True``: the connection drops with no response;
        * ``malformed=True``: 200 with a truncated JSON (or image) body;
        * ``envelope=True`` (txt2img): a 200 v2 envelope; ``envelope_code=0`` is
          a normal success in envelope form, anything else an error envelope;
        * ``status``: that HTTP error with Novita's error body (``reason``
          defaults per status; 502/504 send a proxy's HTML page; image faults
          send S3 XML) and ``Retry-After: retry_after`` if given;
        * ``status=None``: the normal response, only delayed.

        ``after_create=True`` (txt2img only) creates and counts the task first,
        then answers with the fault: the client cannot know the task exists.
        Faults queue up in call order.
        """
        fault = Fault(
            status=status,
            remaining=times,
            retry_after=retry_after,
            reason=reason,
            message=message,
            reset=reset,
            malformed=malformed,
            envelope=envelope,
            envelope_code=envelope_code,
            delay=delay,
            after_create=after_create,
        )
        self._faults.add(endpoint, fault)

    def pending_faults(self, endpoint: Endpoint) -> int:
        """How many injected faults ``endpoint`` has yet to deliver."""
        return self._faults.pending(endpoint)

    # ------------------------------------------------------------- wiring

    @property
    def image_auth_headers_seen(self) -> int:
        """Alias of :attr:`image_auth_headers`."""
        return self.image_auth_headers

    def transport(self) -> EmulatorTransport:
        """An in-process :class:`httpx.AsyncBaseTransport` serving this emulator.

        Requests to :data:`IMAGE_BASE_URL`'s host go to the image host, all
        others to the API. Resets raise :class:`httpx.RemoteProtocolError`; a
        request whose read timeout runs out raises :class:`httpx.ReadTimeout`.
        """
        return EmulatorTransport(self)

    def client(self, **kwargs: Unpack[ClientOptions]) -> AsyncNovita:
        """An :class:`~novita_async.AsyncNovita` wired to the in-process emulator.

        ``kwargs`` go to ``AsyncNovita`` (``api_key``/``base_url`` may be overridden).
        """
        from .._client import AsyncNovita

        kwargs.setdefault("api_key", self.api_key)
        kwargs.setdefault("base_url", API_BASE_URL)
        if kwargs.get("http_client") is None:
            kwargs.pop("http_client", None)
            kwargs.setdefault("transport", self.transport())
        return AsyncNovita(**kwargs)

    def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        image_port: int = 0,
        webhooks: Mapping[str, Any] | None = None,
    ) -> EmulatorServer:
        """Serve over real loopback sockets: ``async with emu.serve() as server``.

        The API listens on ``port`` and the image host on ``image_port`` (0 =
        any free port), so images come from another origin. ``webhooks`` (the
        keyword arguments of :meth:`webhooks`, ``{}`` for the defaults) also
        delivers webhooks over HTTP while the server runs (``server.webhooks``).
        See :class:`~novita_async.testing.EmulatorServer`.
        """
        return EmulatorServer(self, host=host, port=port, image_port=image_port, webhooks=webhooks)

    def webhooks(
        self,
        *,
        deliver: Deliver | None = None,
        delay: float | tuple[float, float] = (0.05, 0.2),
        duplicate_rate: float = 0.0,
        loss_rate: float = 0.0,
        retries: int = 5,
        retry_delay: float = 1.0,
        timeout: float = 5.0,
        seed: int = 0,
        image_base_url: str = IMAGE_BASE_URL,
    ) -> WebhookSender:
        """Deliver webhooks while ``async with emu.webhooks(...) as hooks:`` lasts.

        When a task whose body had ``extra.webhook.url`` ends, its
        ``ASYNC_TASK_RESULT`` event is POSTed there after ``delay`` seconds
        (``fixed`` or ``(fixed, random)``: fixed + uniform(0, random)). A
        non-2xx answer, an error or no answer within ``timeout`` is retried
        after ``retry_delay``, up to ``retries`` times (Novita: 5, 5 s).
        ``duplicate_rate`` delivers a task twice, ``loss_rate`` never (seeded
        by ``seed``). ``deliver=None`` POSTs with an ``httpx.AsyncClient``;
        ``deliver=async f(url, body) -> status`` delivers in-process (e.g. to
        your app's receiver). ``hooks.forge(url, task_id, status=...)`` posts
        a forgery. Counters: :attr:`webhook_stats`. Tasks created before the
        block are delivered too.
        """
        return WebhookSender(
            self,
            deliver=deliver,
            delay=delay,
            duplicate_rate=duplicate_rate,
            loss_rate=loss_rate,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            seed=seed,
            image_base_url=image_base_url,
        )

    async def post_forgery(
        self,
        url: str,
        task_id: str | None = None,
        *,
        status: str = "TASK_STATUS_SUCCEED",
        reason: str = "",
        images: list[dict[str, Any]] | None = None,
        seed: str | None = None,
    ) -> int | None:
        """:meth:`WebhookSender.forge` on the running sender (RuntimeError if none runs)."""
        if not self._senders:
            raise RuntimeError("no webhook sender runs: use `async with emu.webhooks()`")
        return await self._senders[-1].forge(
            url, task_id, status=status, reason=reason, images=images, seed=seed
        )

    # ------------------------------------------------------------- results, for webhooks too

    def result_json(self, task_id: str, *, image_base_url: str = IMAGE_BASE_URL) -> dict[str, Any]:
        """The task-result body of ``task_id`` now (counts no poll)."""
        return self._result(self.tasks[task_id], self.clock(), image_base_url)

    def webhook_event(
        self, task_id: str, *, image_base_url: str = IMAGE_BASE_URL
    ) -> dict[str, Any]:
        """The ``ASYNC_TASK_RESULT`` webhook body Novita would POST for ``task_id`` now."""
        payload = self.result_json(task_id, image_base_url=image_base_url)
        webhook = self.tasks[task_id].extra.get("webhook")
        if webhook is not None:
            payload["extra"]["webhook"] = webhook
            test_mode = webhook.get("test_mode") if isinstance(webhook, Mapping) else None
            if isinstance(test_mode, Mapping) and test_mode.get("enabled"):
                # Novita's test mode sends a mock event with the status asked for.
                status = test_mode.get("return_task_status") or "TASK_STATUS_SUCCEED"
                task = payload["task"]
                task["status"] = status
                if status == "TASK_STATUS_FAILED":
                    task["reason"] = task["reason"] or FAILURE_REASON
                    payload["images"] = []
                else:
                    task["reason"] = ""
        return {"event_type": "ASYNC_TASK_RESULT", "payload": payload}

    # ------------------------------------------------------------- the handler

    async def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer one in-process request; the response has ``request`` set, like httpx's.

        Requests to :data:`IMAGE_BASE_URL`'s host go to the image host, any
        other host to the API. Raises :class:`EmulatedReset` when the
        connection must drop instead.
        """
        await request.aread()
        url = request.url
        call = Call(
            request.method,
            url.path,
            parse_query(url.query.decode("ascii", "replace")),
            dict(request.headers.items()),
            request.content,
        )
        reply = await self._dispatch(call, image=url.host == IMAGE_HOST)
        return httpx.Response(
            reply.status, headers=reply.headers, content=reply.body, request=request
        )

    async def _dispatch(
        self, call: Call, *, image: bool, image_base_url: str = IMAGE_BASE_URL
    ) -> Reply:
        """The one handler behind :meth:`handle` and the loopback server."""
        if self.latency:
            await anyio.sleep(self.latency)
        if image:
            return await self._image(call)
        path = call.path.rstrip("/")
        routes = {
            TXT2IMG_PATH: ("POST", self._txt2img),
            TASK_RESULT_PATH: ("GET", lambda c: self._task_result(c, image_base_url)),
            MODEL_PATH: ("GET", self._list_models),
        }
        route = routes.get(path)
        if route is None:
            return error(404, "API_NOT_FOUND", f"no API at {path}")
        method, handler = route
        if call.method != method:
            return error(405, "METHOD_NOT_ALLOWED", f"{call.method} not allowed")
        return await handler(call)

    def _auth_error(self, call: Call) -> Reply | None:
        header = call.headers.get("authorization")
        if not header:
            return error(400, "MISSING_API_KEY", "missing API key")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode(), self.api_key.encode()
        ):
            return error(403, "INVALID_API_KEY", "invalid API key")
        return None

    async def _faulted(self, endpoint: str, *, after_create: bool = False) -> Reply | Fault | None:
        """The injected fault's reply, the fault itself when it answers normally, or None."""
        fault = self._faults.take(endpoint, after_create=after_create)
        if fault is None:
            return None
        reply = await fault_reply(endpoint, fault, request_id=self.image_requests)
        return fault if reply is None else reply

    # txt2img

    async def _txt2img(self, call: Call) -> Reply:
        self.submissions += 1
        envelope = self.envelope
        faulted = await self._faulted("txt2img")
        if isinstance(faulted, Reply):
            return faulted
        envelope = envelope or (faulted is not None and faulted.envelope)
        denied = self._auth_error(call)
        if denied is not None:
            return denied
        try:
            body = json.loads(call.body)
        except ValueError:
            return error(400, "INVALID_REQUEST_BODY", "request body is not valid JSON")
        problem = validate_txt2img(body)
        model_name = body["request"]["model_name"] if problem is None else None
        if (
            self.strict_models
            and model_name is not None
            and model_name not in self.catalogue.checkpoints
        ):
            problem = f"model {model_name!r} not found"
        if problem is not None:
            return error(400, "INVALID_REQUEST_BODY", problem)
        now = self.clock()
        retry_after = self._quota.admit(int(body["request"]["image_num"]), now)
        if retry_after is not None:
            self.rate_limited += 1
            return error(
                429,
                "RATE_LIMIT_EXCEEDED",
                "images per minute limit "
                f"{format_seconds(self._quota.images_per_minute or 0)} exceeded",
                {"retry-after": str(max(1, math.ceil(retry_after)))},
            )
        task = self._create(body, now)
        faulted = await self._faulted("txt2img", after_create=True)
        if isinstance(faulted, Reply):
            return faulted
        if envelope or (faulted is not None and faulted.envelope):
            return json_reply(200, {"code": 0, "msg": "", "data": {"task_id": task.task_id}})
        return json_reply(200, {"task_id": task.task_id})

    def _create(self, body: dict[str, Any], now: float) -> EmulatedTask:
        req: dict[str, Any] = body["request"]
        extra: dict[str, Any] = body.get("extra") or {}
        duration = self._duration(body)
        start = now + self._queue_delay(body)
        if self.workers is not None:
            start = max(start, heapq.heappop(self._worker_free))
            heapq.heappush(self._worker_free, start + duration)
        failed = FAIL_MARKER in req["prompt"] or (
            self.failure_rate > 0 and self._rng.random() < self.failure_rate
        )
        seed = req.get("seed")
        if not isinstance(seed, int) or seed < 0:
            seed = self._rng.randrange(2**32)
        image_num = int(req["image_num"])
        nsfw = None
        if extra.get("enable_nsfw_detection"):
            nsfw = tuple(round(self._rng.uniform(0.5, 15.0), 4) for _ in range(image_num))
        task_id = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        image_type = extra.get("response_image_type") or "png"
        assert image_type in IMAGE_TYPES  # validated
        task = EmulatedTask(
            task_id=task_id,
            request=req,
            extra=extra,
            created_at=now,
            started_at=start,
            completed_at=start + duration,
            visible_at=now + self.not_found_for,
            failed=failed,
            reason=FAILURE_REASON if failed else "",
            seed=seed,
            image_type=image_type,
            image_num=image_num,
            nsfw_confidences=nsfw,
            request_info=request_info(req, seed),
            clock=self.clock,
        )
        self.tasks[task_id] = task
        self.tasks_created += 1
        for listener in self._on_create:
            listener(task)
        return task

    # task-result

    async def _task_result(self, call: Call, image_base_url: str) -> Reply:
        task_id = call.param("task_id")
        self.polls_total += 1
        if task_id:
            self.polls[task_id] += 1
        faulted = await self._faulted("task-result")
        if isinstance(faulted, Reply):
            return faulted
        denied = self._auth_error(call)
        if denied is not None:
            return denied
        if not task_id:
            return error(400, "INVALID_REQUEST_BODY", "task_id is required")
        task = self.tasks.get(task_id)
        now = self.clock()
        if task is None or now < task.visible_at:
            return error(404, "TASK_NOT_FOUND", f"task {task_id} not found")
        body = self._result(task, now, image_base_url)
        if task.first_terminal_poll_at is None and now >= task.completed_at:
            task.first_terminal_poll_at = now
        return json_reply(200, body)

    def _ms(self, instant: float) -> str:
        """An emulator-clock instant as Novita's epoch-milliseconds string."""
        if self._epoch_offset is None:
            self._epoch_offset = time.time() - self.clock()
        return str(int((instant + self._epoch_offset) * 1000))

    def _result(self, task: EmulatedTask, now: float, image_base_url: str) -> dict[str, Any]:
        return result_body(
            task,
            now,
            report_eta=self.report_eta,
            image_url_ttl=self.image_url_ttl,
            image_url=lambda key, expires: self._images.url(image_base_url, key, expires),
            epoch_ms=self._ms if self.stamps else lambda instant: "",
        )

    # model listing

    async def _list_models(self, call: Call) -> Reply:
        self.model_requests += 1
        faulted = await self._faulted("model")
        if isinstance(faulted, Reply):
            return faulted
        denied = self._auth_error(call)
        if denied is not None:
            return denied
        try:
            page = self.catalogue.page(call.query)
        except ValueError as exc:
            return error(400, "INVALID_REQUEST_BODY", str(exc))
        return json_reply(200, page)

    # image host

    async def _image(self, call: Call) -> Reply:
        self.image_requests += 1
        if "authorization" in call.headers:
            self.image_auth_headers += 1
        faulted = await self._faulted("image")
        if isinstance(faulted, Reply):
            return faulted
        return self._images.serve(call, self.tasks, self.clock(), request_id=self.image_requests)


class EmulatorTransport(httpx.AsyncBaseTransport):
    """Serves a :class:`NovitaEmulator` in-process (``emu.transport()``)."""

    def __init__(self, emulator: NovitaEmulator) -> None:
        self.emulator = emulator

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {}).get("read")
        try:
            with anyio.fail_after(timeout):
                return await self.emulator.handle(request)
        except TimeoutError:
            raise httpx.ReadTimeout("emulated read timeout", request=request) from None
        except EmulatedReset as exc:
            raise httpx.RemoteProtocolError(
                f"Server disconnected without sending a response. ({exc})", request=request
            ) from None
