"""Wire types of the emulator: one request in, one reply out, and Novita's body shapes.

Shared by the emulator (:mod:`._emulator`), the loopback server (:mod:`._server`)
and the rest of the package; it imports none of them.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias, get_args

import httpx

__all__ = [
    "API_BASE_URL",
    "ENDPOINTS",
    "IMAGE_BASE_URL",
    "IMAGE_HOST",
    "MODEL_PATH",
    "TASK_RESULT_PATH",
    "TXT2IMG_PATH",
    "Call",
    "EmulatedReset",
    "Endpoint",
    "Reply",
    "dumps",
    "error",
    "format_seconds",
    "gateway_page",
    "json_reply",
    "parse_query",
]

#: Base URL of the in-process API host (``.emulator`` never resolves on a real network).
API_BASE_URL = "https://api.novita.emulator"
#: Base URL of the in-process image host (a different origin, like Novita's S3 bucket).
IMAGE_BASE_URL = "https://images.novita.emulator"
IMAGE_HOST = httpx.URL(IMAGE_BASE_URL).host

TXT2IMG_PATH = "/v3/async/txt2img"
TASK_RESULT_PATH = "/v3/async/task-result"
MODEL_PATH = "/v3/model"

Endpoint: TypeAlias = Literal["txt2img", "task-result", "model", "image"]
ENDPOINTS: frozenset[str] = frozenset(get_args(Endpoint))


class EmulatedReset(Exception):
    """Raised by :meth:`NovitaEmulator.handle` when the connection must drop with no response.

    The in-process transport turns it into :class:`httpx.RemoteProtocolError`;
    the loopback server closes the socket.
    """


class Call:
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


class Reply:
    """One response: status, headers (lower-case names) and body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def parse_query(query: str) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(query, keep_blank_values=True)


def dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def json_reply(status: int, data: Any, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status, {"content-type": "application/json", **(headers or {})}, dumps(data))


def error(
    status: int, reason: str, message: str, headers: Mapping[str, str] | None = None
) -> Reply:
    """Novita's error body ``{code, reason, message, metadata}``."""
    body = {"code": status, "reason": reason, "message": message, "metadata": {}}
    return json_reply(status, body, headers)


def gateway_page(status: int, headers: Mapping[str, str]) -> Reply:
    """What a proxy in front of Novita sends on 502/504: HTML, not JSON."""
    phrase = httpx.codes.get_reason_phrase(status)
    page = (
        f"<html>\r\n<head><title>{status} {phrase}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {phrase}</h1></center>\r\n</body>\r\n</html>\r\n"
    )
    return Reply(status, {"content-type": "text/html", **headers}, page.encode())


def format_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
