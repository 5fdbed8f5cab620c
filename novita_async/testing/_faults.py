"""Injected faults: queued per endpoint by :meth:`NovitaEmulator.fail_next`, served in order."""

from __future__ import annotations

from collections import deque

import anyio
import attrs

from ._images import picture_png, s3_code, s3_error
from ._wire import (
    ENDPOINTS,
    EmulatedReset,
    Endpoint,
    Reply,
    error,
    format_seconds,
    gateway_page,
    json_reply,
)

__all__ = ["Fault", "Faults"]

_MALFORMED_JSON = b'{"emulated": "malformed'
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


@attrs.define(kw_only=True)
class Fault:
    """One injected fault; see :meth:`NovitaEmulator.fail_next` for the fields."""

    status: int | None
    remaining: int
    retry_after: float | None = None
    reason: str | None = None
    message: str | None = None
    reset: bool = False
    malformed: bool = False
    envelope: bool = False
    envelope_code: int = 0
    delay: float = 0.0
    after_create: bool = False


class Faults:
    """The per-endpoint fault queues."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Fault]] = {name: deque() for name in ENDPOINTS}

    def add(self, endpoint: Endpoint, fault: Fault) -> None:
        """Queue ``fault`` for ``endpoint`` after checking that it makes sense."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {endpoint!r}")
        if fault.remaining < 1 or fault.delay < 0:
            raise ValueError("times must be >= 1 and delay >= 0")
        if fault.status is not None and not 100 <= fault.status <= 599:
            raise ValueError(f"status must be an HTTP status code, got {fault.status}")
        if (fault.after_create or fault.envelope) and endpoint != "txt2img":
            raise ValueError("after_create and envelope apply to the txt2img endpoint only")
        self._queues[endpoint].append(fault)

    def pending(self, endpoint: Endpoint) -> int:
        return sum(fault.remaining for fault in self._queues[endpoint])

    def take(self, endpoint: str, *, after_create: bool = False) -> Fault | None:
        """The fault the next request to ``endpoint`` gets (at this stage), or None."""
        queue = self._queues[endpoint]
        if not queue or queue[0].after_create != after_create:
            return None
        fault = queue[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            queue.popleft()
        return fault


async def fault_reply(endpoint: str, fault: Fault, *, request_id: int = 0) -> Reply | None:
    """The response that replaces the normal one, or None to answer normally.

    Raises :class:`EmulatedReset` for ``reset=True``.
    """
    if fault.delay:
        await anyio.sleep(fault.delay)
    if fault.reset:
        raise EmulatedReset(f"emulated connection reset on {endpoint}")
    if fault.malformed:
        if endpoint == "image":
            return Reply(200, {"content-type": "image/png"}, picture_png(8, 8, 0)[:20])
        return Reply(200, {"content-type": "application/json"}, _MALFORMED_JSON)
    if fault.envelope:
        if fault.envelope_code == 0:
            return None
        message = fault.message or fault.reason or "emulated envelope error"
        return json_reply(200, {"code": fault.envelope_code, "msg": message, "data": {}})
    if fault.status is None:
        return None
    headers = {}
    if fault.retry_after is not None:
        headers["retry-after"] = format_seconds(fault.retry_after)
    if endpoint == "image":
        code = fault.reason or s3_code(fault.status)
        message = fault.message or "emulated fault"
        return s3_error(fault.status, code, message, headers, request_id=request_id)
    if fault.status in (502, 504):
        return gateway_page(fault.status, headers)
    reason = (
        fault.reason
        or _ENDPOINT_REASONS.get((endpoint, fault.status))
        or _DEFAULT_REASONS.get(fault.status, "EMULATED_FAULT")
    )
    return error(fault.status, reason, fault.message or "emulated fault", headers)
