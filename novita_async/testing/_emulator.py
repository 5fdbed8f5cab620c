"""State and request handling of the Novita v3 emulator.

One :class:`NovitaEmulator` holds every task, counter and injected fault; its
:meth:`NovitaEmulator.handle` turns an :class:`httpx.Request` into an
:class:`httpx.Response` and is shared by the in-process transport and the
loopback server. Task state is derived lazily from the clock at each request:
no background tasks, O(1) (O(log workers)) work per request.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import json
import math
import random
import struct
import time
import urllib.parse
import uuid
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args
from xml.sax.saxutils import escape

import anyio
import attrs
import httpx

from .._models import SAMPLERS, UPSCALERS, TaskStatus
from ._catalogue import Catalogue, default_models

if TYPE_CHECKING:
    from .._client import AsyncNovita
    from ._server import EmulatorServer

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

#: Base URL of the in-process API host (``.emulator`` never resolves on a real network).
API_BASE_URL = "https://api.novita.emulator"
#: Base URL of the in-process image host (a different origin, like Novita's S3 bucket).
IMAGE_BASE_URL = "https://images.novita.emulator"
DEFAULT_API_KEY = "emulator-key"
#: A prompt containing this marker makes the emulated task end FAILED.
FAIL_MARKER = "[fail]"
FAILURE_REASON = "emulated failure"

Endpoint: TypeAlias = Literal["txt2img", "task-result", "model", "image"]
ENDPOINTS: frozenset[str] = frozenset(get_args(Endpoint))
DurationSpec: TypeAlias = "float | tuple[float, float] | Callable[[Mapping[str, Any]], float]"

TXT2IMG_PATH = "/v3/async/txt2img"
TASK_RESULT_PATH = "/v3/async/task-result"
MODEL_PATH = "/v3/model"

_IMAGE_HOST = httpx.URL(IMAGE_BASE_URL).host
_IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_TERMINAL = (TaskStatus.SUCCEED, TaskStatus.FAILED)
_MALFORMED_JSON = b'{"emulated": "malformed'
_RATE_WINDOW = 60.0


# --------------------------------------------------------------------------- small public helpers


class ManualClock:
    """A clock that only moves when told to: ``clock.advance(2.5)``.

    Pass it as ``NovitaEmulator(clock=clock)`` to step task states without
    sleeping (for raw-HTTP tests; the client itself sleeps on anyio's clock).
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self.now += seconds


def request_cost(body: Mapping[str, Any]) -> float:
    """steps x megapixels x image_num of a POST body (or its ``request`` object).

    Mirrors :attr:`novita_async.Txt2ImgRequest.cost` (hires_fix pixels included).
    """
    req = body.get("request", body)
    if not isinstance(req, Mapping):
        return 0.0
    pixels = float(req.get("width", 512)) * float(req.get("height", 512))
    hires = req.get("hires_fix")
    if isinstance(hires, Mapping):
        pixels += float(hires.get("target_width", 0)) * float(hires.get("target_height", 0))
    return float(req.get("steps", 20)) * pixels / 1_000_000 * float(req.get("image_num", 1))


class Proportional:
    """Durations proportional to GPU work, like real GPUs.

    ``base + seconds_per_cost * cost``, times ``1 ± jitter`` (uniform, seeded),
    where cost = steps x megapixels x image_num (:func:`request_cost`).
    """

    def __init__(
        self, seconds_per_cost: float, *, jitter: float = 0.05, base: float = 0.0, seed: int = 0
    ) -> None:
        if seconds_per_cost < 0 or base < 0 or not 0 <= jitter < 1:
            raise ValueError("need seconds_per_cost >= 0, base >= 0 and 0 <= jitter < 1")
        self.seconds_per_cost = seconds_per_cost
        self.jitter = jitter
        self.base = base
        self._rng = random.Random(seed)

    def __repr__(self) -> str:
        return (
            f"Proportional(seconds_per_cost={self.seconds_per_cost!r}, "
            f"jitter={self.jitter!r}, base={self.base!r})"
        )

    def __call__(self, body: Mapping[str, Any]) -> float:
        seconds = self.base + self.seconds_per_cost * request_cost(body)
        if self.jitter:
            seconds *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        return seconds


class EmulatedReset(Exception):
    """Raised by :meth:`NovitaEmulator.handle` when the connection must drop with no response.

    The in-process transport turns it into :class:`httpx.RemoteProtocolError`;
    the loopback server closes the socket.
    """


# --------------------------------------------------------------------------- task record


@attrs.define(kw_only=True, eq=False)
class EmulatedTask:
    """One created task. Times are on the emulator's clock; ``status`` is derived from it."""

    task_id: str
    request: dict[str, Any] = attrs.field(repr=False)
    extra: dict[str, Any] = attrs.field(repr=False)
    created_at: float
    started_at: float
    completed_at: float
    #: Until this instant task-result answers 404 (``not_found_for``).
    visible_at: float
    failed: bool
    reason: str
    seed: int
    image_type: str
    image_num: int
    nsfw_confidences: tuple[float, ...] | None = attrs.field(repr=False)
    request_info: str = attrs.field(repr=False)
    #: When task-result first served this task as SUCCEED/FAILED (None: not yet).
    first_terminal_poll_at: float | None = None
    _clock: Callable[[], float] = attrs.field(repr=False, alias="clock")

    @property
    def duration(self) -> float:
        return self.completed_at - self.started_at

    @property
    def queue_wait(self) -> float:
        return self.started_at - self.created_at

    @property
    def status(self) -> TaskStatus:
        """The status at the emulator clock's current time."""
        return self.status_at(self._clock())

    def status_at(self, now: float) -> TaskStatus:
        if now < self.started_at:
            return TaskStatus.QUEUED
        if now < self.completed_at:
            return TaskStatus.PROCESSING
        return TaskStatus.FAILED if self.failed else TaskStatus.SUCCEED


# --------------------------------------------------------------------------- faults


@attrs.define(kw_only=True)
class _Fault:
    status: int | None
    remaining: int
    retry_after: float | None
    reason: str | None
    message: str | None
    reset: bool
    malformed: bool
    envelope: bool
    envelope_code: int
    delay: float
    after_create: bool


_DEFAULT_REASONS = {
    400: "INVALID_REQUEST_BODY",
    401: "FAILED_TO_AUTH",
    403: "INVALID_API_KEY",
    404: "API_NOT_FOUND",
    429: "RATE_LIMIT_EXCEEDED",
    500: "INTERNAL_SERVER_ERROR",
    503: "SERVICE_NOT_AVAILABLE",
}
_ENDPOINT_REASONS = {
    ("txt2img", 500): "CREATE_TASK_FAILED",
    ("task-result", 500): "GET_RESULT_FAILED",
    ("task-result", 404): "TASK_NOT_FOUND",
}
_S3_CODES = {403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError", 503: "SlowDown"}


# --------------------------------------------------------------------------- requests, replies


class _Call:
    """One request, reduced to what the emulator reads (cheap to build from raw bytes)."""

    __slots__ = ("body", "headers", "method", "path", "query")

    def __init__(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        self.method = method
        self.path = path  # percent-decoded
        self.query = query  # parse_qs(..., keep_blank_values=True)
        self.headers = headers  # lower-case names
        self.body = body

    def param(self, name: str) -> str:
        values = self.query.get(name)
        return values[0] if values else ""


class _Reply:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def parse_query(query: str) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(query, keep_blank_values=True)


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _json_reply(status: int, data: Any, headers: Mapping[str, str] | None = None) -> _Reply:
    return _Reply(status, {"content-type": "application/json", **(headers or {})}, _dumps(data))


def _error(
    status: int, reason: str, message: str, headers: Mapping[str, str] | None = None
) -> _Reply:
    """Novita's error body ``{code, reason, message, metadata}``."""
    body = {"code": status, "reason": reason, "message": message, "metadata": {}}
    return _json_reply(status, body, headers)


def _gateway_page(status: int, headers: Mapping[str, str]) -> _Reply:
    """What a proxy in front of Novita sends on 502/504: HTML, not JSON."""
    phrase = httpx.codes.get_reason_phrase(status)
    page = (
        f"<html>\r\n<head><title>{status} {phrase}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {phrase}</h1></center>\r\n</body>\r\n</html>\r\n"
    )
    return _Reply(status, {"content-type": "text/html", **headers}, page.encode())


def _format_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# --------------------------------------------------------------------------- image payloads


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(label: str, size: int = 8) -> bytes:
    """A real 8x8 PNG of one colour derived from ``label`` (which it also carries)."""
    red, green, blue = hashlib.sha256(label.encode()).digest()[:3]
    row = b"\x00" + bytes((red, green, blue)) * size
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
        + _png_chunk(b"tEXt", b"Comment\x00" + label.encode("latin-1", "replace"))
        + _png_chunk(b"IDAT", zlib.compress(row * size))
        + _png_chunk(b"IEND", b"")
    )


def _jpeg(label: str) -> bytes:
    """A real 8x8 grey baseline JPEG carrying ``label`` in a comment segment."""

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload

    one_code = bytes([1] + [0] * 15)  # a Huffman table with one 1-bit code
    return (
        b"\xff\xd8"
        + segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        + segment(0xFE, label.encode("latin-1", "replace"))
        + segment(0xDB, b"\x00" + b"\x01" * 64)
        + segment(0xC0, struct.pack(">BHHB", 8, 8, 8, 1) + b"\x01\x11\x00")
        + segment(0xC4, b"\x00" + one_code + b"\x00")
        + segment(0xC4, b"\x10" + one_code + b"\x00")
        + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
        + b"\x3f\xff\xd9"
    )


# A 1x1 lossless WebP.
_WEBP = base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==")


def _image_bytes(image_type: str, label: str) -> bytes:
    if image_type == "jpeg":
        return _jpeg(label)
    if image_type == "webp":
        return _WEBP
    return _png(label)


# --------------------------------------------------------------------------- validation


def _check_number(
    obj: Mapping[str, Any], key: str, where: str, lo: float, hi: float | None, *, integer: bool
) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return f"{where}.{key} must be {'an integer' if integer else 'a number'}"
    if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
        return f"{where}.{key} must be in [{lo}, {'inf' if hi is None else hi}], got {value}"
    return None


def _check_text(obj: Mapping[str, Any], key: str, where: str, hi: int | None = None) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        return f"{where}.{key} must be a non-empty string"
    if hi is not None and len(value) > hi:
        return f"{where}.{key} must have at most {hi} characters, got {len(value)}"
    return None


def _check_list(
    obj: Mapping[str, Any], key: str, where: str, max_len: int, *, strength: bool
) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > max_len:
        return f"{where}.{key} must be a list of at most {max_len} items"
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            return f"{where}.{key}[{i}] must be an object"
        problem = _check_text(item, "model_name", f"{where}.{key}[{i}]")
        if problem is None and "model_name" not in item:
            problem = f"{where}.{key}[{i}].model_name is required"
        if problem is None and strength:
            problem = _check_number(item, "strength", f"{where}.{key}[{i}]", 0, 1, integer=False)
            if problem is None and item.get("strength") is None:
                problem = f"{where}.{key}[{i}].strength is required"
        if problem:
            return problem
    return None


_REQUIRED = (
    "model_name",
    "prompt",
    "width",
    "height",
    "image_num",
    "steps",
    "guidance_scale",
    "sampler_name",
)


def validate_txt2img(body: Any) -> str | None:
    """Why Novita would answer 400 INVALID_REQUEST_BODY, or None (documented ranges)."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    req = body.get("request")
    if not isinstance(req, dict):
        return "request is required and must be an object"
    for key in _REQUIRED:
        if req.get(key) is None:
            return f"request.{key} is required"
    extra = body.get("extra")
    if extra is not None and not isinstance(extra, dict):
        return "extra must be an object"
    extra = extra or {}
    checks = (
        _check_text(req, "model_name", "request"),
        _check_text(req, "prompt", "request", 1024),
        _check_text(req, "negative_prompt", "request", 1024),
        _check_text(req, "sd_vae", "request"),
        _check_number(req, "width", "request", 128, 2048, integer=True),
        _check_number(req, "height", "request", 128, 2048, integer=True),
        _check_number(req, "image_num", "request", 1, 8, integer=True),
        _check_number(req, "steps", "request", 1, 100, integer=True),
        _check_number(req, "guidance_scale", "request", 1, 30, integer=False),
        _check_number(req, "seed", "request", -1, None, integer=True),
        _check_number(req, "clip_skip", "request", 1, 12, integer=True),
        _check_list(req, "loras", "request", 5, strength=True),
        _check_list(req, "embeddings", "request", 5, strength=False),
    )
    for problem in checks:
        if problem:
            return problem
    if req["sampler_name"] not in SAMPLERS:
        return f"request.sampler_name {req['sampler_name']!r} is not a supported sampler"
    for flag in ("restore_faces", "enable_transparent_background"):
        if req.get(flag) is not None and not isinstance(req[flag], bool):
            return f"request.{flag} must be a boolean"
    hires = req.get("hires_fix")
    if hires is not None:
        if not isinstance(hires, dict):
            return "request.hires_fix must be an object"
        for key in ("target_width", "target_height", "strength"):
            if hires.get(key) is None:
                return f"request.hires_fix.{key} is required"
        problem = (
            _check_number(hires, "target_width", "request.hires_fix", 128, 4096, integer=True)
            or _check_number(hires, "target_height", "request.hires_fix", 128, 4096, integer=True)
            or _check_number(hires, "strength", "request.hires_fix", 0, 1, integer=False)
        )
        if problem:
            return problem
        if hires.get("upscaler") is not None and hires["upscaler"] not in UPSCALERS:
            return f"request.hires_fix.upscaler {hires['upscaler']!r} is not supported"
    refiner = req.get("refiner")
    if refiner is not None:
        if not isinstance(refiner, dict) or refiner.get("switch_at") is None:
            return "request.refiner.switch_at is required"
        problem = _check_number(refiner, "switch_at", "request.refiner", 0, 1, integer=False)
        if problem:
            return problem
    image_type = extra.get("response_image_type")
    if image_type is not None and image_type not in _IMAGE_TYPES:
        return f"extra.response_image_type must be png, webp or jpeg, got {image_type!r}"
    if extra.get("enable_nsfw_detection") is not None and not isinstance(
        extra["enable_nsfw_detection"], bool
    ):
        return "extra.enable_nsfw_detection must be a boolean"
    level = extra.get("nsfw_detection_level")
    if level is not None and (isinstance(level, bool) or level not in (0, 1, 2)):
        return "extra.nsfw_detection_level must be 0, 1 or 2"
    webhook = extra.get("webhook")
    if webhook is not None and (
        not isinstance(webhook, dict) or not isinstance(webhook.get("url"), str)
    ):
        return "extra.webhook.url is required"
    if req.get("enable_transparent_background") and (image_type or "png") != "png":
        return "enable_transparent_background needs extra.response_image_type png"
    return None


# --------------------------------------------------------------------------- the emulator


class NovitaEmulator:
    """A local emulator of Novita's v3 async image API (see the package docstring).

    Args:
        durations: seconds a task runs: ``(lo, hi)`` drawn uniformly from the
            seeded RNG, a fixed number, or a callable taking the POST JSON body
            (e.g. :meth:`proportional`).
        workers: ``None`` runs every task at once; ``N`` runs N at a time and
            queues the rest FIFO (``eta`` includes the queue wait).
        api_key: the only key accepted (``Authorization: Bearer <key>``).
        clock: time source for task states, URL expiry and the rate window
            (default :func:`time.monotonic`; :class:`ManualClock` or
            :func:`anyio.current_time` in tests).
        seed: seeds task ids, durations, failures and image seeds.
        failure_rate: probability that a task ends FAILED (besides prompts
            containing ``[fail]``).
        queue_delay: seconds every task stays QUEUED before it can start.
        image_url_ttl: seconds image URLs stay valid after completion (3600).
        envelope: answer txt2img with the v2 envelope ``{"code":0,"msg":"","data":{...}}``.
        latency: seconds every request takes (slept on anyio's clock).
        not_found_for: task-result answers 404 TASK_NOT_FOUND this long after creation.
        report_eta: ``False`` answers ``eta`` 0 while tasks run (as Novita's image
            examples show), leaving a poller no server hint.
        images_per_minute: enforce Novita's IPM quota (429 + Retry-After); see :meth:`rate_limit`.
        models: the ``GET /v3/model`` catalogue (default :func:`default_models`).
        strict_models: reject txt2img whose ``model_name`` is not a catalogue checkpoint.
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
        queue_delay: float = 0.0,
        image_url_ttl: float = 3600.0,
        envelope: bool = False,
        latency: float = 0.0,
        not_found_for: float = 0.0,
        report_eta: bool = True,
        images_per_minute: float | None = None,
        models: Iterable[Mapping[str, Any]] | None = None,
        strict_models: bool = False,
    ) -> None:
        self._durations = durations
        self._duration = self._duration_source(durations)
        if workers is not None and workers < 1:
            raise ValueError("workers must be None (unbounded) or >= 1")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError("failure_rate must be within [0, 1]")
        if min(queue_delay, latency, not_found_for) < 0 or image_url_ttl <= 0:
            raise ValueError("delays must be >= 0 and image_url_ttl > 0")
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
        self._rng = random.Random(seed)
        self._secret = hashlib.sha256(f"novita-emulator:{seed}".encode()).digest()
        self._epoch_offset: float | None = None  # set at first use: clock() may need a loop
        self._worker_free: list[float] = [] if workers is None else [-math.inf] * workers
        self._faults: dict[str, deque[_Fault]] = {name: deque() for name in ENDPOINTS}
        self._ipm: float | None = None
        self._window: deque[tuple[float, int]] = deque()
        self._window_weight = 0
        self.rate_limit(images_per_minute)
        self.catalogue = Catalogue(default_models() if models is None else models)

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

    def _duration_source(self, spec: DurationSpec) -> Callable[[Mapping[str, Any]], float]:
        if callable(spec):
            return spec
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            if spec < 0:
                raise ValueError("durations must be >= 0")
            fixed = float(spec)
            return lambda _body: fixed
        if isinstance(spec, tuple) and len(spec) == 2:
            lo, hi = float(spec[0]), float(spec[1])
            if not 0 <= lo <= hi:
                raise ValueError("durations=(lo, hi) needs 0 <= lo <= hi")
            return lambda _body: self._rng.uniform(lo, hi)
        raise TypeError("durations must be a number, a (lo, hi) tuple or a callable")

    def rate_limit(self, images_per_minute: float | None = 20) -> None:
        """Enforce an images-per-minute quota on txt2img (``None`` turns it off).

        Each request weighs its ``image_num``; over quota it gets 429
        RATE_LIMIT_EXCEEDED with ``Retry-After`` (whole seconds until enough of
        the sliding 60 s window frees up). A request heavier than the whole
        quota is let through once the window is empty.
        """
        if images_per_minute is not None and images_per_minute <= 0:
            raise ValueError("images_per_minute must be > 0 or None")
        self._ipm = images_per_minute
        self._window.clear()
        self._window_weight = 0

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
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {endpoint!r}")
        if times < 1 or delay < 0:
            raise ValueError("times must be >= 1 and delay >= 0")
        if status is not None and not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status code, got {status}")
        if (after_create or envelope) and endpoint != "txt2img":
            raise ValueError("after_create and envelope apply to the txt2img endpoint only")
        self._faults[endpoint].append(
            _Fault(
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
        )

    def pending_faults(self, endpoint: Endpoint) -> int:
        """How many injected faults ``endpoint`` has yet to deliver."""
        return sum(fault.remaining for fault in self._faults[endpoint])

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

    def client(self, **kwargs: Any) -> AsyncNovita:
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
        self, host: str = "127.0.0.1", port: int = 0, *, image_port: int = 0
    ) -> EmulatorServer:
        """Serve over real loopback sockets: ``async with emu.serve() as server``.

        The API listens on ``port`` and the image host on ``image_port`` (0 =
        any free port), so images come from another origin. See
        :class:`~novita_async.testing.EmulatorServer`.
        """
        from ._server import EmulatorServer

        return EmulatorServer(self, host=host, port=port, image_port=image_port)

    # ------------------------------------------------------------- results, for webhooks too

    def result_json(self, task_id: str, *, image_base_url: str = IMAGE_BASE_URL) -> dict[str, Any]:
        """The task-result body of ``task_id`` now (counts no poll)."""
        return self._result(self.tasks[task_id], self.clock(), image_base_url)

    def webhook_event(
        self, task_id: str, *, image_base_url: str = IMAGE_BASE_URL
    ) -> dict[str, Any]:
        """The ``ASYNC_TASK_RESULT`` webhook body Novita would POST for ``task_id``.

        The emulator never delivers webhooks itself; post this to your receiver.
        """
        payload = self.result_json(task_id, image_base_url=image_base_url)
        webhook = self.tasks[task_id].extra.get("webhook")
        if webhook is not None:
            payload["extra"]["webhook"] = webhook
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
        call = _Call(
            request.method,
            url.path,
            parse_query(url.query.decode("ascii", "replace")),
            dict(request.headers.items()),
            request.content,
        )
        reply = await self._dispatch(call, image=url.host == _IMAGE_HOST)
        return httpx.Response(
            reply.status, headers=reply.headers, content=reply.body, request=request
        )

    async def _dispatch(
        self, call: _Call, *, image: bool, image_base_url: str = IMAGE_BASE_URL
    ) -> _Reply:
        """The one handler behind :meth:`handle` and the loopback server."""
        if self.latency:
            await anyio.sleep(self.latency)
        if image:
            return await self._image(call)
        path = call.path.rstrip("/")
        method = call.method
        if path == TXT2IMG_PATH:
            if method != "POST":
                return _error(405, "METHOD_NOT_ALLOWED", f"{method} not allowed")
            return await self._txt2img(call)
        if path == TASK_RESULT_PATH:
            if method != "GET":
                return _error(405, "METHOD_NOT_ALLOWED", f"{method} not allowed")
            return await self._task_result(call, image_base_url)
        if path == MODEL_PATH:
            if method != "GET":
                return _error(405, "METHOD_NOT_ALLOWED", f"{method} not allowed")
            return await self._list_models(call)
        return _error(404, "API_NOT_FOUND", f"no API at {path}")

    def _auth_error(self, call: _Call) -> _Reply | None:
        header = call.headers.get("authorization")
        if not header:
            return _error(400, "MISSING_API_KEY", "missing API key")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode(), self.api_key.encode()
        ):
            return _error(403, "INVALID_API_KEY", "invalid API key")
        return None

    # faults

    def _take_fault(self, endpoint: str, *, after_create: bool = False) -> _Fault | None:
        queue = self._faults[endpoint]
        if not queue or queue[0].after_create != after_create:
            return None
        fault = queue[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            queue.popleft()
        return fault

    async def _fault_response(self, endpoint: str, fault: _Fault) -> _Reply | None:
        """The response that replaces the normal one, or None to answer normally."""
        if fault.delay:
            await anyio.sleep(fault.delay)
        if fault.reset:
            raise EmulatedReset(f"emulated connection reset on {endpoint}")
        if fault.malformed:
            if endpoint == "image":
                return _Reply(200, {"content-type": "image/png"}, _png("malformed")[:20])
            return _Reply(200, {"content-type": "application/json"}, _MALFORMED_JSON)
        if fault.envelope:
            if fault.envelope_code == 0:
                return None
            message = fault.message or fault.reason or "emulated envelope error"
            return _json_reply(200, {"code": fault.envelope_code, "msg": message, "data": {}})
        if fault.status is None:
            return None
        headers = {}
        if fault.retry_after is not None:
            headers["retry-after"] = _format_seconds(fault.retry_after)
        if endpoint == "image":
            code = fault.reason or _S3_CODES.get(fault.status, "InternalError")
            return self._s3_error(fault.status, code, fault.message or "emulated fault", headers)
        if fault.status in (502, 504):
            return _gateway_page(fault.status, headers)
        reason = (
            fault.reason
            or _ENDPOINT_REASONS.get((endpoint, fault.status))
            or _DEFAULT_REASONS.get(fault.status, "EMULATED_FAULT")
        )
        return _error(fault.status, reason, fault.message or "emulated fault", headers)

    # txt2img

    async def _txt2img(self, call: _Call) -> _Reply:
        self.submissions += 1
        envelope = self.envelope
        fault = self._take_fault("txt2img")
        if fault is not None:
            faulted = await self._fault_response("txt2img", fault)
            if faulted is not None:
                return faulted
            envelope = envelope or fault.envelope
        denied = self._auth_error(call)
        if denied is not None:
            return denied
        try:
            body = json.loads(call.body)
        except ValueError:
            return _error(400, "INVALID_REQUEST_BODY", "request body is not valid JSON")
        problem = validate_txt2img(body)
        model_name = body["request"]["model_name"] if problem is None else None
        if (
            self.strict_models
            and model_name is not None
            and model_name not in self.catalogue.checkpoints
        ):
            problem = f"model {model_name!r} not found"
        if problem is not None:
            return _error(400, "INVALID_REQUEST_BODY", problem)
        now = self.clock()
        retry_after = self._over_quota(int(body["request"]["image_num"]), now)
        if retry_after is not None:
            self.rate_limited += 1
            return _error(
                429,
                "RATE_LIMIT_EXCEEDED",
                f"images per minute limit {_format_seconds(self._ipm or 0)} exceeded",
                {"retry-after": str(max(1, math.ceil(retry_after)))},
            )
        task = self._create(body, now)
        fault = self._take_fault("txt2img", after_create=True)
        if fault is not None:
            faulted = await self._fault_response("txt2img", fault)
            if faulted is not None:
                return faulted
            envelope = envelope or fault.envelope
        if envelope:
            return _json_reply(200, {"code": 0, "msg": "", "data": {"task_id": task.task_id}})
        return _json_reply(200, {"task_id": task.task_id})

    def _over_quota(self, weight: int, now: float) -> float | None:
        """Seconds until ``weight`` images fit the IPM window, or None (and record them)."""
        if self._ipm is None:
            return None
        window = self._window
        while window and window[0][0] <= now - _RATE_WINDOW:
            self._window_weight -= window.popleft()[1]
        if window and self._window_weight + weight > self._ipm:
            excess = self._window_weight + weight - self._ipm
            for stamp, used in window:
                excess -= used
                if excess <= 0:
                    return stamp + _RATE_WINDOW - now
            return window[-1][0] + _RATE_WINDOW - now  # heavier than the quota: when empty
        window.append((now, weight))
        self._window_weight += weight
        return None

    def _create(self, body: dict[str, Any], now: float) -> EmulatedTask:
        req: dict[str, Any] = body["request"]
        extra: dict[str, Any] = body.get("extra") or {}
        duration = float(self._duration(body))
        if not (math.isfinite(duration) and duration >= 0):
            raise ValueError(f"durations gave {duration!r}; need a finite number >= 0")
        start = now + self.queue_delay
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
            image_type=extra.get("response_image_type") or "png",
            image_num=image_num,
            nsfw_confidences=nsfw,
            request_info=self._request_info(req, seed),
            clock=self.clock,
        )
        self.tasks[task_id] = task
        self.tasks_created += 1
        return task

    @staticmethod
    def _request_info(req: Mapping[str, Any], seed: int) -> str:
        image_num = int(req["image_num"])
        negative = req.get("negative_prompt") or ""
        return json.dumps(
            {
                "model": req["model_name"],
                "prompts": [req["prompt"]],
                "negative_prompts": [negative],
                "seeds": [seed + i for i in range(image_num)],
                "height": req["height"],
                "width": req["width"],
                "guidance_scale": req["guidance_scale"],
                "num_images_per_prompt": image_num,
                "num_inference_steps": req["steps"],
                "sampler_name": req["sampler_name"],
                "clip_skip": req.get("clip_skip", 1),
            },
            separators=(",", ":"),
        )

    # task-result

    async def _task_result(self, call: _Call, image_base_url: str) -> _Reply:
        task_id = call.param("task_id")
        self.polls_total += 1
        if task_id:
            self.polls[task_id] += 1
        fault = self._take_fault("task-result")
        if fault is not None:
            faulted = await self._fault_response("task-result", fault)
            if faulted is not None:
                return faulted
        denied = self._auth_error(call)
        if denied is not None:
            return denied
        if not task_id:
            return _error(400, "INVALID_REQUEST_BODY", "task_id is required")
        task = self.tasks.get(task_id)
        now = self.clock()
        if task is None or now < task.visible_at:
            return _error(404, "TASK_NOT_FOUND", f"task {task_id} not found")
        body = self._result(task, now, image_base_url)
        if task.first_terminal_poll_at is None and now >= task.completed_at:
            task.first_terminal_poll_at = now
        return _json_reply(200, body)

    def _ms(self, instant: float) -> str:
        """An emulator-clock instant as Novita's epoch-milliseconds string."""
        if self._epoch_offset is None:
            self._epoch_offset = time.time() - self.clock()
        return str(int((instant + self._epoch_offset) * 1000))

    def _result(self, task: EmulatedTask, now: float, image_base_url: str) -> dict[str, Any]:
        status = task.status_at(now)
        if status is TaskStatus.PROCESSING and task.duration > 0:
            progress = min(99, int((now - task.started_at) / task.duration * 100))
        else:
            progress = 0  # like Novita: 0 while queued and (!) on finished tasks
        eta = 0.0
        if self.report_eta and status not in _TERMINAL:
            eta = round(task.completed_at - now, 3)
        images = []
        if status is TaskStatus.SUCCEED:
            ttl = self.image_url_ttl
            expires = f"{task.completed_at + ttl:.3f}"
            for n in range(task.image_num):
                key = f"{task.task_id}/{n}.{task.image_type}"
                nsfw = None
                if task.nsfw_confidences is not None:
                    nsfw = {"valid": True, "confidence": task.nsfw_confidences[n]}
                images.append(
                    {
                        "image_url": (
                            f"{image_base_url}/{key}?expires={expires}"
                            f"&signature={self._sign(key, expires)}"
                        ),
                        "image_url_ttl": _format_seconds(ttl),
                        "image_type": task.image_type,
                        "nsfw_detection_result": nsfw,
                    }
                )
        started = now >= task.started_at
        return {
            "extra": {
                "seed": str(task.seed),
                "enable_nsfw_detection": task.nsfw_confidences is not None,
                "debug_info": {
                    "request_info": task.request_info,
                    "submit_time_ms": self._ms(task.created_at),
                    "execute_time_ms": self._ms(task.started_at) if started else "",
                    "complete_time_ms": self._ms(task.completed_at) if status in _TERMINAL else "",
                },
            },
            "task": {
                "task_id": task.task_id,
                "task_type": "TXT_TO_IMG",
                "status": status.value,
                "reason": task.reason if status is TaskStatus.FAILED else "",
                "eta": eta,
                "progress_percent": progress,
            },
            "images": images,
            "videos": [],
            "audios": [],
        }

    # model listing

    async def _list_models(self, call: _Call) -> _Reply:
        self.model_requests += 1
        fault = self._take_fault("model")
        if fault is not None:
            faulted = await self._fault_response("model", fault)
            if faulted is not None:
                return faulted
        denied = self._auth_error(call)
        if denied is not None:
            return denied
        try:
            page = self.catalogue.page(call.query)
        except ValueError as exc:
            return _error(400, "INVALID_REQUEST_BODY", str(exc))
        return _json_reply(200, page)

    # image host

    def _sign(self, key: str, expires: str) -> str:
        digest = hmac.new(self._secret, f"{key}|{expires}".encode(), hashlib.sha256)
        return digest.hexdigest()[:32]

    def _s3_error(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> _Reply:
        request_id = f"{self.image_requests:016X}"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
            f"<RequestId>{request_id}</RequestId><HostId>novita-emulator</HostId></Error>"
        )
        return _Reply(status, {"content-type": "application/xml", **(headers or {})}, body.encode())

    async def _image(self, call: _Call) -> _Reply:
        self.image_requests += 1
        signed = "authorization" in call.headers
        if signed:
            self.image_auth_headers += 1
        fault = self._take_fault("image")
        if fault is not None:
            faulted = await self._fault_response("image", fault)
            if faulted is not None:
                return faulted
        if call.method != "GET":
            return self._s3_error(405, "MethodNotAllowed", "The specified method is not allowed")
        if signed:  # what S3 says to a presigned URL that also carries a header
            return self._s3_error(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be specified",
            )
        key = call.path.lstrip("/")
        expires, signature = call.param("expires"), call.param("signature")
        if not expires or not signature:
            return self._s3_error(
                403,
                "AccessDenied",
                "Query-string authentication requires the Signature and Expires parameters",
            )
        if not hmac.compare_digest(signature, self._sign(key, expires)):
            return self._s3_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided",
            )
        now = self.clock()
        try:
            expired = now >= float(expires)
        except ValueError:
            expired = True
        if expired:  # checked before the key, like S3
            return self._s3_error(403, "AccessDenied", "Request has expired")
        task_id, _, name = key.partition("/")
        index, _, extension = name.partition(".")
        task = self.tasks.get(task_id)
        if (
            task is None
            or task.status_at(now) is not TaskStatus.SUCCEED
            or not (index.isdigit() and int(index) < task.image_num)
            or extension != task.image_type
        ):
            return self._s3_error(404, "NoSuchKey", "The specified key does not exist.")
        etag = hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()
        return _Reply(
            200,
            {"content-type": _IMAGE_TYPES[task.image_type], "etag": f'"{etag}"'},
            _image_bytes(task.image_type, f"novita-emulator {key} seed={task.seed}"),
        )


# --------------------------------------------------------------------------- in-process transport


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
