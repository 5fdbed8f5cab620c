"""``generate --webhook-listen HOST:PORT``: a small HTTP/1.1 receiver for Novita's deliveries.

Novita POSTs each finished task's result to ``--webhook-url``; a user behind a
tunnel (ngrok, cloudflared, ...) points the tunnel at this receiver. It runs in
the CLI's task group while the client lives, accepts a POST to any path with a
``Content-Length`` body, answers ``204`` at once (so Novita never retries for
our slowness) and hands the body to ``client.receive_webhook`` in a task of its
own, which trusts nothing in it: a task this run waits on is confirmed with one
GET, anything else costs no request.

Connections are kept alive (HTTP/1.1 without ``Connection: close``): after a
delivery the next request is read on the same connection, pipelined bytes
included, so a sender does not pay a TCP connect per delivery. HTTP/1.0 and
``Connection: close`` requests are answered with ``Connection: close``.

Bounded everywhere: the request head (16 KiB) and body (1 MiB), the time a
client may take to send a request once it began (10 s), the time a connection
may sit idle between requests (15 s, then it is closed quietly), and the
connections served at once (64). Anything else gets a status and a closed
connection; no request can stop the receiver or the run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.stapled import MultiListener

__all__ = ["WebhookReceiver"]

logger = logging.getLogger("novita_async.cli")

#: Largest body accepted (a delivery is a few kB: one task-result).
MAX_BODY = 1 << 20
#: Largest request line plus headers accepted.
MAX_HEAD = 16 * 1024
#: Seconds a client has to send a whole request (and read the answer).
REQUEST_TIMEOUT = 10.0
#: Seconds a kept-alive connection may wait for its next request before it is closed.
KEEPALIVE_TIMEOUT = 15.0
#: Connections served at once; more are answered 503 (Novita retries).
MAX_CONNECTIONS = 64
#: Bodies being handed over at once; reading further requests waits for a place.
MAX_HANDING_OVER = 256
#: After refusing a request whose body is on its way, read and drop up to this many
#: bytes, so that the sender sees our answer rather than a reset connection.
_LINGER_BYTES = 4 * MAX_BODY
_LINGER_SECONDS = 2.0


class _Refused(Exception):
    def __init__(self, status: HTTPStatus, *, pending: int = 0, allow: bool = False) -> None:
        super().__init__(status)
        self.status = status
        self.pending = pending  # body bytes still on their way
        self.allow = allow  # add ``Allow: POST`` (405)


def _answer(status: HTTPStatus, *, allow: bool = False, close: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
    if close:
        lines.append("Connection: close")
    if status is not HTTPStatus.NO_CONTENT:
        lines.append("Content-Length: 0")
    if allow:
        lines.append("Allow: POST")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class WebhookReceiver:
    """Receive deliveries on ``listener`` and hand each body to ``deliver``.

    ``deliver`` (``client.receive_webhook``) runs in a task of its own, started
    once the body is complete, so it never holds up the connection; its errors
    are logged, never raised. Counters: ``delivered`` (bodies handed over),
    ``refused`` (requests answered with an error status or dropped) and
    ``connections`` (connections accepted).
    """

    def __init__(
        self,
        listener: MultiListener[anyio.abc.SocketStream],
        deliver: Callable[[bytes], Awaitable[object]],
        *,
        max_body: int = MAX_BODY,
        max_head: int = MAX_HEAD,
        timeout: float = REQUEST_TIMEOUT,
        keepalive: float = KEEPALIVE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.listener = listener
        self.max_body = max_body
        self.max_head = max_head
        self.timeout = timeout
        self.keepalive = keepalive
        self.delivered = 0
        self.refused = 0
        self._accepted = 0
        self._deliver = deliver
        self._slots = anyio.CapacityLimiter(max_connections)
        self._handing_over = anyio.Semaphore(MAX_HANDING_OVER)

    @classmethod
    async def bind(
        cls,
        host: str,
        port: int,
        deliver: Callable[[bytes], Awaitable[object]],
        *,
        timeout: float = REQUEST_TIMEOUT,
        keepalive: float = KEEPALIVE_TIMEOUT,
    ) -> WebhookReceiver:
        """Listen on ``host:port`` (raises ``OSError`` if that is not possible)."""
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        return cls(listener, deliver, timeout=timeout, keepalive=keepalive)

    @property
    def port(self) -> int:
        return int(self.listener.extra(SocketAttribute.local_port))

    @property
    def connections(self) -> int:
        """Connections accepted so far (those answered 503 included)."""
        return self._accepted

    async def serve(self) -> None:
        """Serve until cancelled, then close the listener."""
        async with self.listener, anyio.create_task_group() as connections:
            for listener in self.listener.listeners:
                assert isinstance(listener, anyio.abc.SocketListener)
                connections.start_soon(self._accept, listener, connections)

    async def _accept(
        self,
        listener: anyio.abc.SocketListener,
        connections: anyio.abc.TaskGroup,
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # e.g. out of file descriptors: keep serving
                logger.warning("webhook receiver: cannot accept a connection: %s", exc)
                await anyio.sleep(0.5)
                continue
            self._accepted += 1
            connections.start_soon(self._connection, stream, connections)

    # ------------------------------------------------------------- one connection

    async def _connection(
        self, stream: anyio.abc.SocketStream, deliveries: anyio.abc.TaskGroup
    ) -> None:
        async with stream:
            try:
                self._slots.acquire_nowait()
            except anyio.WouldBlock:
                self.refused += 1
                with (
                    anyio.move_on_after(1.0),
                    contextlib.suppress(anyio.BrokenResourceError, OSError),
                ):
                    await stream.send(_answer(HTTPStatus.SERVICE_UNAVAILABLE))
                return
            try:
                await self._requests(stream, deliveries)
            finally:
                self._slots.release()

    async def _requests(
        self, stream: anyio.abc.SocketStream, deliveries: anyio.abc.TaskGroup
    ) -> None:
        """Serve the requests of one connection until one is refused or closes it."""
        buffer = bytearray()  # bytes received but not yet used (pipelined requests)
        while True:
            try:
                request = await self._exchange(stream, buffer)
            except Exception as exc:  # a client's misbehaviour never reaches the run
                logger.debug("webhook receiver: dropped a connection: %r", exc)
                request = None
            if request is None:
                self.refused += 1
                return
            body, keep = request
            self.delivered += 1
            await self._handing_over.acquire()  # released by _hand_over
            deliveries.start_soon(self._hand_over, body)
            if not (keep and await self._next_request(stream, buffer)):
                return

    async def _next_request(self, stream: anyio.abc.SocketStream, buffer: bytearray) -> bool:
        """Wait up to ``keepalive`` for the next request's first bytes: False if none come."""
        if buffer:
            return True
        with anyio.move_on_after(self.keepalive):
            try:
                buffer += await stream.receive()
            except Exception:  # e.g. EndOfStream: the client closed between requests
                return False
            return True
        return False  # idle: close quietly

    async def _hand_over(self, body: bytes) -> None:
        try:
            await self._deliver(body)
        except Exception as exc:
            logger.warning("could not handle a webhook delivery: %s: %s", type(exc).__name__, exc)
        finally:
            self._handing_over.release()

    async def _exchange(
        self, stream: anyio.abc.SocketStream, buffer: bytearray
    ) -> tuple[bytes, bool] | None:
        """Read one request and answer it.

        The body of a complete delivery and whether the connection stays open, else None.
        """
        request: tuple[bytes, bool] | None = None
        answered = sent = False
        with anyio.move_on_after(self.timeout):
            try:
                request = await self._read(stream, buffer)
            except _Refused as refused:
                answered = True
                await stream.send(_answer(refused.status, allow=refused.allow))
                if refused.pending > 0:
                    await self._linger(stream, refused.pending)
                return None
            except anyio.EndOfStream:
                return None
            answered = True
            # The body is complete: hand it over even if the answer cannot be sent.
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send(_answer(HTTPStatus.NO_CONTENT, close=not request[1]))
                sent = True
        if request is None:
            if not answered:  # too slow: say so, if it still listens
                with anyio.move_on_after(1.0):
                    await stream.send(_answer(HTTPStatus.REQUEST_TIMEOUT))
            return None
        return request[0], request[1] and sent

    async def _read(self, stream: anyio.abc.SocketStream, buffer: bytearray) -> tuple[bytes, bool]:
        """One request's body and whether to keep the connection; what follows stays in buffer."""
        searched = 0
        while (end := buffer.find(b"\r\n\r\n", max(0, searched - 3))) < 0:
            if len(buffer) > self.max_head:
                raise _Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            searched = len(buffer)
            buffer += await stream.receive()
        if end > self.max_head:
            raise _Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        method, version, headers = _parse_head(bytes(buffer[:end]))
        if method != "POST":
            raise _Refused(HTTPStatus.METHOD_NOT_ALLOWED, allow=True)
        if "transfer-encoding" in headers:  # Novita sends a Content-Length
            raise _Refused(HTTPStatus.NOT_IMPLEMENTED)
        text = headers.get("content-length")
        if text is None:
            raise _Refused(HTTPStatus.LENGTH_REQUIRED)
        if not (text.isascii() and text.isdigit()):
            raise _Refused(HTTPStatus.BAD_REQUEST)
        length, start = int(text), end + 4
        if length > self.max_body:
            pending = length - (len(buffer) - start)
            raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, pending=pending)
        if len(buffer) - start < length and headers.get("expect", "").lower() == "100-continue":
            await stream.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(buffer) - start < length:
            buffer += await stream.receive()
        body = bytes(buffer[start : start + length])
        del buffer[: start + length]  # keep the next (pipelined) request's bytes
        options = {token.strip().lower() for token in headers.get("connection", "").split(",")}
        return body, version == "HTTP/1.1" and "close" not in options

    async def _linger(self, stream: anyio.abc.SocketStream, pending: int) -> None:
        """Drop what the client still sends (bounded), so it reads our answer."""
        left = min(pending, _LINGER_BYTES)
        with anyio.move_on_after(_LINGER_SECONDS):
            try:
                while left > 0:
                    left -= len(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """The method, the HTTP version and the headers (lower-case names) of a request head."""
    request_line, *lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Refused(HTTPStatus.BAD_REQUEST)
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _Refused(HTTPStatus.BAD_REQUEST)
        name, value = name.lower(), value.strip()
        if name == "content-length" and headers.get(name, value) != value:
            raise _Refused(HTTPStatus.BAD_REQUEST)  # two lengths: which one is the body's?
        headers[name] = value
    return parts[0], parts[2], headers
