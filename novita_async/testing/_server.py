"""A small HTTP/1.1 server on anyio that puts a :class:`NovitaEmulator` on loopback sockets.

Two listeners (API and image host, so images come from another origin), one
task per connection, keep-alive, ``Content-Length`` request bodies. Works on
asyncio and trio with no dependency beyond anyio. An emulated reset
closes the socket without a response. Idle keep-alive connections are never
closed by the server (only when it stops).
"""

from __future__ import annotations

import http
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from ._wire import Call, EmulatedReset, Reply, parse_query

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .._client import AsyncNovita, ClientOptions
    from ._delivery import WebhookSender

__all__ = ["EmulatorServer", "ServedEmulator"]

logger = logging.getLogger("novita_async.testing")

_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024
_RECEIVE = 64 * 1024


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ServedEmulator(Protocol):
    """What an :class:`EmulatorServer` needs from the emulator it serves (a ``NovitaEmulator``).

    The server depends on this, not on the emulator's class, so imports point
    one way: the emulator imports the server, never the reverse.
    """

    @property
    def api_key(self) -> str: ...

    def webhooks(self, *args: Any, **kwargs: Any) -> WebhookSender: ...

    async def _dispatch(self, call: Call, *, image: bool, image_base_url: str = ...) -> Reply: ...


class EmulatorServer:
    """The emulator on real sockets; use as ``async with emu.serve() as server``.

    Attributes:
        base_url: the API's base URL, e.g. ``http://127.0.0.1:41234``.
        image_base_url: the image host's base URL (another port, another origin).
        connections: connections accepted so far (both listeners).
        webhooks: the running :class:`WebhookSender` when served with ``webhooks=``.
    """

    def __init__(
        self,
        emulator: ServedEmulator,
        *,
        host: str,
        port: int,
        image_port: int,
        webhooks: Mapping[str, Any] | None = None,
    ) -> None:
        self.emulator = emulator
        self.host = host
        self._ports = (port, image_port)
        self._url_host = _url_host(host)
        self.port = 0
        self.image_port = 0
        self.base_url = ""
        self.image_base_url = ""
        self.connections = 0
        self._listeners: list[anyio.abc.Listener[anyio.abc.SocketStream]] = []
        self._task_group: anyio.abc.TaskGroup | None = None
        self._webhook_options = webhooks
        self.webhooks: WebhookSender | None = None

    def __repr__(self) -> str:
        return f"<EmulatorServer {self.base_url or 'stopped'} images={self.image_base_url!r}>"

    def client(self, **kwargs: Unpack[ClientOptions]) -> AsyncNovita:
        """An :class:`~novita_async.AsyncNovita` talking to this server over loopback."""
        from .._client import AsyncNovita

        kwargs.setdefault("api_key", self.emulator.api_key)
        kwargs.setdefault("base_url", self.base_url)
        return AsyncNovita(**kwargs)

    async def __aenter__(self) -> EmulatorServer:
        if self._task_group is not None:
            raise RuntimeError("this EmulatorServer is already running")
        try:
            for port in self._ports:
                self._listeners.append(
                    await anyio.create_tcp_listener(local_host=self.host, local_port=port)
                )
            api, image = self._listeners
            self.port = int(api.extra(SocketAttribute.local_port))
            self.image_port = int(image.extra(SocketAttribute.local_port))
            self.base_url = f"http://{self._url_host}:{self.port}"
            self.image_base_url = f"http://{self._url_host}:{self.image_port}"
            task_group = anyio.create_task_group()
            await task_group.__aenter__()
        except BaseException:
            await self._close_listeners()
            raise
        if self._webhook_options is not None:
            options = {"image_base_url": self.image_base_url, **self._webhook_options}
            sender = self.emulator.webhooks(**options)
            try:
                await sender.__aenter__()
            except BaseException:
                task_group.cancel_scope.cancel()
                await task_group.__aexit__(None, None, None)
                await self._close_listeners()
                raise
            self.webhooks = sender
        self._task_group = task_group
        task_group.start_soon(api.serve, self._connection_handler(image=False))
        task_group.start_soon(image.serve, self._connection_handler(image=True))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The body's exception is not fed to the task group, so it propagates
        # unchanged (not wrapped in an exception group).
        task_group, self._task_group = self._task_group, None
        sender, self.webhooks = self.webhooks, None
        try:
            if sender is not None:
                await sender.__aexit__(None, None, None)
            if task_group is not None:
                task_group.cancel_scope.cancel()
                await task_group.__aexit__(None, None, None)
        finally:
            await self._close_listeners()

    async def _close_listeners(self) -> None:
        listeners, self._listeners = self._listeners, []
        with anyio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()

    # ------------------------------------------------------------- connections

    def _connection_handler(
        self, *, image: bool
    ) -> Callable[[anyio.abc.SocketStream], Awaitable[None]]:
        async def handler(stream: anyio.abc.SocketStream) -> None:
            self.connections += 1
            async with stream:
                try:
                    await self._serve_connection(stream, image=image)
                except (
                    anyio.EndOfStream,
                    anyio.BrokenResourceError,
                    anyio.ClosedResourceError,
                    EmulatedReset,
                    OSError,
                ):
                    pass
                except Exception:
                    logger.exception("emulator server: connection failed")

        return handler

    async def _serve_connection(self, stream: anyio.abc.SocketStream, *, image: bool) -> None:
        buffer = bytearray()
        while True:
            head = await _read_head(stream, buffer)
            if head is None:
                return
            try:
                method, target, version, headers = _parse_head(head)
                length = _content_length(headers)
            except _BadRequest as exc:
                await _send_plain(stream, exc.status, str(exc))
                return
            while len(buffer) < length:
                buffer += await stream.receive(_RECEIVE)
            body = bytes(buffer[:length])
            del buffer[:length]
            path, _, query = target.partition("?")
            call = Call(
                method,
                urllib.parse.unquote(path),
                parse_query(query),
                {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers},
                body,
            )
            reply = await self.emulator._dispatch(  # EmulatedReset: just close
                call, image=image, image_base_url=self.image_base_url
            )
            keep_alive = _keep_alive(version, headers)
            await stream.send(_serialize(reply, keep_alive=keep_alive))
            if not keep_alive:
                return


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def _read_head(stream: anyio.abc.SocketStream, buffer: bytearray) -> bytes | None:
    """The next request head (without the blank line); None when the client has gone."""
    searched = 0
    while True:
        end = buffer.find(b"\r\n\r\n", max(searched - 3, 0))
        if end >= 0:
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            return head.lstrip(b"\r\n")
        if len(buffer) > _MAX_HEAD:
            await _send_plain(stream, 431, "request head too large")
            return None
        searched = len(buffer)
        try:
            buffer += await stream.receive(_RECEIVE)
        except anyio.EndOfStream:
            return None


def _parse_head(head: bytes) -> tuple[str, str, bytes, list[tuple[bytes, bytes]]]:
    request_line, *lines = head.split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _BadRequest(400, "malformed request line")
    headers = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "malformed header line")
        headers.append((name, value.strip()))
    try:
        return parts[0].decode("ascii"), parts[1].decode("ascii"), parts[2], headers
    except UnicodeDecodeError:
        raise _BadRequest(400, "non-ASCII request line") from None


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    if _header(headers, b"transfer-encoding") is not None:
        raise _BadRequest(501, "chunked request bodies are not supported")
    raw = _header(headers, b"content-length")
    if raw is None:
        return 0
    if not raw.isdigit() or int(raw) > _MAX_BODY:
        raise _BadRequest(400 if not raw.isdigit() else 413, "bad Content-Length")
    return int(raw)


def _keep_alive(version: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    connection = (_header(headers, b"connection") or b"").lower()
    if version == b"HTTP/1.0":
        return b"keep-alive" in connection
    return b"close" not in connection


def _serialize(reply: Reply, *, keep_alive: bool) -> bytes:
    body = reply.body
    lines = [f"HTTP/1.1 {reply.status} {_phrase(reply.status)}".encode()]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in reply.headers.items()]
    lines.append(b"content-length: %d" % len(body))
    lines.append(b"server: novita-emulator")
    if not keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


async def _send_plain(stream: anyio.abc.SocketStream, status: int, message: str) -> None:
    reply = Reply(status, {"content-type": "text/plain"}, message.encode())
    await stream.send(_serialize(reply, keep_alive=False))
