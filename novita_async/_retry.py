"""What an HTTP answer means: the error it maps to, and whether to send the request again.

Non-2xx answers (and 2xx envelopes of the deprecated v2 API with a non-zero ``code``)
map to the :class:`~novita_async.NovitaError` tree, by Novita's ``reason`` first, then
by status. :func:`should_retry` is the one retry decision for every request: a GET is
idempotent and retried on 408, 429, 5xx (except ``TASK_FAILED``), connection errors,
timeouts and malformed bodies; a task-creating POST is retried only where Novita
certainly created no task (never sent, 429, 503), and is ``uncertain`` after anything
else that may have reached Novita. :class:`RetryPolicy` says how long to wait.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import math
import random
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import httpx

from ._convert import decode_json, envelope_error, parse_error_body
from ._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InsufficientBalanceError,
    MalformedResponseError,
    NotFoundError,
    NovitaError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
)

__all__ = [
    "Decision",
    "RetryPolicy",
    "connection_error",
    "parse_retry_after",
    "read_answer",
    "request_of",
    "should_retry",
    "status_error",
]

_AUTH_REASONS = frozenset({"INVALID_API_KEY", "MISSING_API_KEY", "FAILED_TO_AUTH", "INVALID_AUTH"})
_BALANCE_REASONS = frozenset(
    {"BILLING_BALANCE_NOT_ENOUGH", "NOT_ENOUGH_BALANCE", "COST_BALANCE_ERROR"}
)
# Exceptions raised before a single byte of the request left this process.
_NEVER_SENT: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)
# Statuses after which a POST certainly created no task (retry_429 permitting).
_POST_RETRYABLE_STATUS = frozenset({429, 503})
# Codes of the deprecated v2 envelope {"code", "msg", "data"} -> (HTTP-like status, name).
_ENVELOPE_CODES: Mapping[int, tuple[int, str]] = {
    -1: (500, "INTERNAL_ERROR"),
    1: (400, "INVALID_JSON"),
    2: (400, "MODEL_NOT_EXISTS"),
    3: (404, "TASK_ID_NOT_EXISTS"),
    4: (401, "INVALID_AUTH"),
    5: (503, "HOST_UNAVAILABLE"),
    6: (400, "PARAM_RANGE_ERROR"),
    7: (400, "COST_BALANCE_ERROR"),
    8: (400, "SAMPLER_NOT_EXISTS"),
    9: (504, "TIMEOUT"),
}


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter; ``Retry-After`` wins but is capped.

    Retry ``n`` (0-based) sleeps ``uniform(0, min(max_backoff, initial_backoff * 2**n))``,
    or the server's ``Retry-After`` capped at ``max_retry_after``.
    ``max_retries`` counts retries, so a request is sent at most ``max_retries + 1`` times.
    """

    max_retries: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    initial_backoff: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    max_backoff: float = attrs.field(default=8.0, validator=attrs.validators.ge(0))
    max_retry_after: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to sleep before retry number ``attempt`` (0-based)."""
        if retry_after is not None and math.isfinite(retry_after):
            return min(max(retry_after, 0.0), self.max_retry_after)
        ceiling = min(self.max_backoff, self.initial_backoff * (2.0 ** min(attempt, 64)))
        return random.uniform(0, ceiling)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are always GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    current = datetime.datetime.now(datetime.timezone.utc).timestamp() if now is None else now
    return max(when.timestamp() - current, 0.0)


def _error_class(status: int, reason: str) -> type[APIStatusError]:
    """Classify by Novita's ``reason`` first, then by (HTTP-like) status."""
    reason = reason.upper()
    if reason in _AUTH_REASONS or status == 401:
        return AuthenticationError
    if status == 429:
        return RateLimitError
    if reason in _BALANCE_REASONS:
        return InsufficientBalanceError
    if status == 400:
        return BadRequestError
    if status == 403:
        return PermissionDeniedError
    if status == 404:
        return NotFoundError
    if status >= 500:
        return ServerError
    return APIStatusError


def request_of(response: httpx.Response) -> tuple[str, str]:
    try:
        request = response.request
    except RuntimeError:  # a Response built by hand has no request
        return "", ""
    return request.method, request.url.path


def _text_of(response: httpx.Response) -> str:
    try:
        return response.text
    except httpx.ResponseNotRead:
        return ""


def _body_code(text: str) -> int | None:
    try:
        data = json.loads(text) if text else None
    except (ValueError, RecursionError):
        return None
    code = data.get("code") if isinstance(data, dict) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def status_error(response: httpx.Response, *, body: str | None = None) -> APIStatusError:
    """Map a non-2xx response to the error tree, by Novita's ``reason`` first.

    400 ``MISSING_API_KEY``, 401 and 403 ``INVALID_API_KEY`` are
    :class:`AuthenticationError`; ``BILLING_BALANCE_NOT_ENOUGH`` is
    :class:`InsufficientBalanceError`; other 403s :class:`PermissionDeniedError`.
    """
    text = _text_of(response) if body is None else body
    reason, message, metadata = parse_error_body(text)
    method, path = request_of(response)
    status = response.status_code
    return _error_class(status, reason)(
        message or response.reason_phrase,
        status_code=status,
        reason=reason,
        metadata=metadata,
        body=text[:4000],
        method=method,
        path=path,
        code=_body_code(text),
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )


def _envelope_status_error(
    response: httpx.Response, data: Any, content: bytes
) -> APIStatusError | None:
    """The error a 2xx envelope with a non-zero ``code`` stands for, else None."""
    failure = envelope_error(data)
    if failure is None:
        return None
    code, message = failure
    status, name = _ENVELOPE_CODES.get(code, (code, "") if 100 <= code <= 599 else (500, ""))
    reason = data.get("reason") if isinstance(data.get("reason"), str) else ""
    reason = reason or name or f"ENVELOPE_CODE_{code}"
    metadata = data.get("metadata")
    method, path = request_of(response)
    return _error_class(status, reason)(
        message or f"{response.status_code} response with error code {code}",
        status_code=status,
        reason=reason,
        metadata=metadata if isinstance(metadata, Mapping) else None,
        body=content[:4000].decode("utf-8", "replace"),
        method=method,
        path=path,
        code=code,
        envelope=True,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )


def connection_error(exc: httpx.RequestError, method: str, path: str) -> APIConnectionError:
    kind = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    detail = str(exc) or type(exc).__name__
    error = kind(f"{method} {path}: {type(exc).__name__}: {detail}")
    error.__cause__ = exc
    return error


def _decode_json(response: httpx.Response, content: bytes) -> Any:
    method, path = request_of(response)
    return decode_json(content, what=f"{method} {path}: {response.status_code}")


def read_answer(response: httpx.Response, content: bytes) -> Any:
    """The decoded JSON of a successful answer; raises the mapped error otherwise."""
    if not response.is_success:
        raise status_error(response, body=content.decode("utf-8", "replace"))
    data = _decode_json(response, content)
    if isinstance(data, Mapping) and "code" in data:  # the deprecated v2 envelope
        error = _envelope_status_error(response, data, content)
        if error is not None:
            raise error
    return data


def _never_sent(exc: BaseException | None) -> bool:
    """Whether a transport error happened before any byte of the request left.

    httpx-aiohttp maps every ``aiohttp.ClientConnectionError`` to ``ConnectTimeout``,
    including a server hanging up after reading the body: for those the aiohttp cause
    decides (only a failed connect, a timeout getting a connection, or a URL aiohttp
    refuses before connecting is never sent).
    """
    if not isinstance(exc, _NEVER_SENT):
        return False
    cause = exc.__cause__
    if cause is None or not type(cause).__module__.startswith("aiohttp"):
        return True
    import aiohttp

    return isinstance(
        cause, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL)
    )


def _get_retryable(error: APIStatusError) -> bool:
    status = error.status_code
    return status in (408, 429) or (status >= 500 and error.reason.upper() != "TASK_FAILED")


Decision = Literal["retry", "raise", "uncertain"]


def should_retry(method: str, error: NovitaError) -> Decision:
    """The one retry decision for every request: retry, raise, or (POST) uncertain.

    A GET is idempotent: retried on connection errors, timeouts, malformed bodies,
    408, 429 and 5xx (except ``TASK_FAILED``). A task-creating POST is retried
    only where Novita certainly created no task (never sent, 429, 503); after
    anything else that may have reached Novita it is ``uncertain``.
    """
    if method == "GET":
        if isinstance(error, (APIConnectionError, MalformedResponseError)):
            return "retry"
        if isinstance(error, APIStatusError) and _get_retryable(error):
            return "retry"
        return "raise"
    if isinstance(error, APIConnectionError):
        return "retry" if _never_sent(error.__cause__) else "uncertain"
    if isinstance(error, MalformedResponseError):
        return "uncertain"  # a 2xx (or a 5xx) we cannot read: the task may exist
    if isinstance(error, APIStatusError):
        if error.status_code in _POST_RETRYABLE_STATUS:
            return "retry"
        if error.status_code >= 500:
            return "uncertain"
    return "raise"
