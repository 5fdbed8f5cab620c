"""Exception tree of novita_async.

Every exception raised by the library derives from :class:`NovitaError`.
No exception message, attribute or repr ever contains the API key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "DownloadError",
    "ImageExpiredError",
    "InsufficientBalanceError",
    "InvalidRequestError",
    "MalformedResponseError",
    "NotFoundError",
    "NovitaError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "WebhookVerificationError",
]


class NovitaError(Exception):
    """Base class of every error raised by novita_async."""


class InvalidRequestError(NovitaError, ValueError):
    """A request failed local validation; nothing was sent."""


class MalformedResponseError(NovitaError):
    """Novita answered 2xx with a body that is not the documented JSON."""

    def __init__(self, message: str, *, body: str = "") -> None:
        super().__init__(message)
        self.body = body


class APIConnectionError(NovitaError):
    """The request did not get an HTTP response (DNS, connect, reset, protocol)."""


class APITimeoutError(APIConnectionError):
    """The request timed out before a response arrived."""


class APIStatusError(NovitaError):
    """Novita answered with an error status (or a 2xx envelope with a non-zero code).

    ``status_code`` is the HTTP status (for an envelope, the status its ``code``
    stands for; ``envelope`` is then True), ``reason`` Novita's UPPER_SNAKE error
    name (``INVALID_REQUEST_BODY``…), ``message`` its human text, ``metadata`` its
    free-form details, ``code`` the body's ``code`` field and ``body`` the raw
    response text. ``retry_after`` is the ``Retry-After`` hint in seconds, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        reason: str = "",
        metadata: Mapping[str, Any] | None = None,
        body: str = "",
        method: str = "",
        path: str = "",
        code: int | None = None,
        envelope: bool = False,
        retry_after: float | None = None,
    ) -> None:
        self.status_code = status_code
        self.reason = reason
        self.message = message
        self.metadata: Mapping[str, Any] = dict(metadata or {})
        self.body = body
        self.method = method
        self.path = path
        self.code = code
        self.envelope = envelope
        self.retry_after = retry_after
        where = f" ({method} {path})" if method else ""
        label = f" {reason}" if reason else ""
        origin = f"HTTP {status_code}"
        if envelope:
            origin = f"2xx envelope code {code} (~HTTP {status_code})"
        super().__init__(f"{origin}{label}: {message or '<no message>'}{where}")

    def __reduce__(self) -> Any:  # keyword-only __init__: pickle by state (anyio.to_process)
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[APIStatusError], args: tuple[Any, ...], state: dict[str, Any]
) -> APIStatusError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class BadRequestError(APIStatusError):
    """HTTP 400: Novita rejected the request (validation, moderation, …)."""


class InsufficientBalanceError(BadRequestError):
    """HTTP 400 ``BILLING_BALANCE_NOT_ENOUGH``: top up the account."""


class AuthenticationError(APIStatusError):
    """HTTP 401, 403 ``INVALID_API_KEY`` or 400 ``MISSING_API_KEY``."""


class PermissionDeniedError(APIStatusError):
    """HTTP 403 other than a bad key (feature not allowed, verification needed…)."""


class NotFoundError(APIStatusError):
    """HTTP 404 (``TASK_NOT_FOUND``, ``API_NOT_FOUND``)."""


class RateLimitError(APIStatusError):
    """HTTP 429; ``retry_after`` is the server's hint in seconds, if any."""


class ServerError(APIStatusError):
    """HTTP 5xx."""


class DownloadError(NovitaError):
    """An image could not be downloaded."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ImageExpiredError(DownloadError):
    """The presigned image URL has expired (Novita keeps them for ``image_url_ttl`` s)."""


class WebhookVerificationError(NovitaError):
    """A webhook delivery could not be confirmed with ``GET /v3/async/task-result``.

    Novita does not sign webhooks, so a delivery is trusted only once the API
    itself reports the task as finished. Answer such a delivery with a non-2xx
    status: a genuine one is redelivered by Novita (up to 5 times).
    """

    def __init__(self, message: str, *, task_id: str) -> None:
        super().__init__(message)
        self.task_id = task_id
