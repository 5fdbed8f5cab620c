"""HTTP layer: the httpx client, the API key, and the one request loop.

The API key lives in a :class:`_Secret` (masked repr), is sent only to the API's
own scheme/host/port, and is scrubbed from every error this module raises.
:meth:`Transport.request` sends, reads and retries as :func:`~._retry.should_retry`
decides (:mod:`._retry`: what an answer means). A txt2img POST whose outcome is
unknown raises :class:`Uncertain`, which the client turns into
:class:`~novita_async.SubmissionUncertainError`; with ``attempts`` (pacing, the
journal) every attempt is admitted first and then sent shielded.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import platform
import ssl
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol, TypeVar

import anyio
import anyio.lowlevel
import httpx

from ._errors import APIStatusError, MalformedResponseError, NovitaError, RateLimitError
from ._pool import ShardedPool
from ._retry import (
    Decision,
    RetryPolicy,
    connection_error,
    read_answer,
    request_of,
    should_retry,
)
from ._version import __version__

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_ANSWER_BYTES",
    "NOT_GIVEN",
    "RATE_LIMIT_ATTEMPTS",
    "Attempts",
    "NotGiven",
    "Transport",
    "Uncertain",
]

logger = logging.getLogger("novita_async")
T = TypeVar("T")

#: Novita advises client timeouts above 60 s (its 503/504 are traffic shaping).
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
#: API answers larger than this are malformed (a task-result is a few kB).
MAX_ANSWER_BYTES = 8 * 1024 * 1024
#: Requests in flight at most on httpx's own pool (see ``Transport._in_flight_cap``).
HTTPX_POOL_IN_FLIGHT = 24
#: 429 answers one POST may get (each slows the pacing down) before it is an error.
RATE_LIMIT_ATTEMPTS = 10


class NotGiven:
    """The type of :data:`NOT_GIVEN`: "the caller did not pass this argument"."""

    _instance: NotGiven | None = None

    def __new__(cls) -> NotGiven:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __bool__(self) -> bool:
        return False


#: ``AsyncNovita(timeout=NOT_GIVEN)``: an owned client uses :data:`DEFAULT_TIMEOUT`,
#: a user-supplied ``http_client`` keeps its own timeout (``None`` means no timeout).
NOT_GIVEN: Final = NotGiven()

_REDACTED = "[REDACTED]"


def _default_transport(max_connections: int) -> httpx.AsyncBaseTransport | None:
    """httpx-aiohttp on asyncio (a fraction of httpx's CPU per request), else httpx's own
    pool in shards of a few connections (trio, :mod:`._pool`); None where the environment
    sets proxies (``HTTPS_PROXY``, ...): httpx's client then builds its pool and the
    proxies' itself, as it does for every httpx user."""
    if _environment_proxies():
        return None
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return ShardedPool(max_connections=max_connections, verify=_default_ssl_context())
    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )

    def session() -> aiohttp.ClientSession:  # made in the event loop, at the first request
        # httpx-aiohttp's own session would keep cookies in aiohttp's jar (below httpx)
        # and send them to every host of their domain: the library keeps none.
        connector = aiohttp.TCPConnector(
            limit=max_connections,
            keepalive_timeout=limits.keepalive_expiry,
            ssl=_default_ssl_context(),
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    return AiohttpTransport(limits=limits, client=session)


def _environment_proxies() -> bool:
    """Whether httpx would route requests through a proxy: ``HTTP_PROXY``, ``HTTPS_PROXY``
    or ``ALL_PROXY`` set (what httpx reads of ``urllib.request.getproxies()``), unless
    ``NO_PROXY=*``. ``NO_PROXY`` alone, or another ``*_PROXY`` (``FTP_PROXY``), is none."""
    proxies = urllib.request.getproxies()
    if not any(proxies.get(scheme) for scheme in ("http", "https", "all")):
        return False
    return "*" not in (host.strip() for host in proxies.get("no", "").split(","))


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """One verifying SSL context for every owned client (building one costs ~0.1 s)."""
    return httpx.create_ssl_context()


# --------------------------------------------------------------------------- secrets


class _Secret:
    """Holds the API key; its repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("the API key cannot be pickled")

    def reveal(self) -> str:
        return self._value

    def redact(self, value: Any) -> Any:
        """``value`` with every occurrence of the key replaced (str, lists, mappings)."""
        if isinstance(value, str):
            return value.replace(self._value, _REDACTED) if self._value in value else value
        if isinstance(value, Mapping):
            return {self.redact(k): self.redact(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.redact(item) for item in value)
        return value

    def scrub(self, error: BaseException) -> None:
        """Remove the key from an error's args and text attributes, in place."""
        error.args = tuple(self.redact(arg) for arg in error.args)
        for name in ("message", "body", "metadata"):
            if isinstance(getattr(error, name, None), (str, Mapping)):
                setattr(error, name, self.redact(getattr(error, name)))
        cause = getattr(error, "cause", None)
        if isinstance(cause, NovitaError) and cause is not error:
            self.scrub(cause)


def _checked_api_key(api_key: str) -> str:
    """The stripped key; rejects keys httpx could not send (never echoing the key)."""
    if not isinstance(api_key, str):
        raise NovitaError(f"api_key must be a str, got {type(api_key).__name__}")
    key = api_key.strip()
    if not key:
        raise NovitaError("api_key is empty")
    if not all(33 <= ord(char) <= 126 for char in key):
        raise NovitaError("api_key contains whitespace or non-ASCII characters")
    return key


class Attempts(Protocol):
    """What a caller plugs into :meth:`Transport.request` around each attempt."""

    async def admit(self) -> None:
        """Before every attempt (cancellable): pacing."""

    def withdraw(self) -> None:
        """Cancelled after :meth:`admit`, before sending: give back the admission."""

    async def sending(self) -> None:
        """Just before the bytes go, inside the shield (e.g. a journal write)."""

    async def accepted(self, answer: Any) -> None:
        """After a successful answer, still inside the shield (e.g. a journal write)."""

    async def refused(self, error: NovitaError, decision: Decision) -> float | None:
        """After a failed attempt: refund or slow down; a delay that replaces the backoff."""


# --------------------------------------------------------------------------- transport


class Transport:
    """Owns (or borrows) the httpx client; signs requests to the API host only.

    ``timeout``: :data:`NOT_GIVEN` means "not chosen": an owned client uses
    :data:`DEFAULT_TIMEOUT`, a user-supplied ``http_client`` keeps its own
    timeout. Any other value (``None`` = no timeout, as in httpx) applies to
    every request.
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        timeout: float | httpx.Timeout | NotGiven | None,
        retry: RetryPolicy,
        http_client: httpx.AsyncClient | None,
        transport: httpx.AsyncBaseTransport | None,
        max_connections: int,
    ) -> None:
        self._secret = _Secret(_checked_api_key(api_key))
        base = httpx.URL(base_url.rstrip("/") + "/")
        port_ok = base.port is None or 0 < base.port < 65536
        if base.scheme not in ("http", "https") or not base.host or not port_ok:
            raise ValueError(f"base_url must be an absolute http(s) URL, got {base_url!r}")
        self.base_url = base
        self.retry = retry
        self.max_connections = max_connections
        self.max_answer_bytes = MAX_ANSWER_BYTES
        self._owns_client = http_client is None
        self._timeout_override: httpx.Timeout | None = None
        self._timeout = DEFAULT_TIMEOUT if isinstance(timeout, NotGiven) else timeout
        self._given_transport = transport
        #: The transport of a client of our own, called directly (see ``_send``).
        self._direct: httpx.AsyncBaseTransport | None = None
        if http_client is not None and not isinstance(timeout, NotGiven):
            self._timeout_override = httpx.Timeout(timeout)
        self._http = http_client
        if http_client is None and transport is not None:
            self._http = self._owned_client(transport)
        #: path -> (URL, its headers: signed only for the API's origin), made once per path
        self._targets: dict[str, tuple[httpx.URL, dict[str, str], httpx.Headers]] = {}
        self._extensions = {"timeout": httpx.Timeout(self._timeout).as_dict()}
        #: Requests in flight, FIFO: none ever waits inside a pool (pools are not fair).
        #: A free slot is taken without a trip through the event loop (``fast_acquire``):
        #: every request awaits its answer right after, and a CapacityLimiter's extra
        #: checkpoint cost about 8 us per request.
        self._in_flight: anyio.Semaphore | None = None
        self.user_agent = (
            f"novita-async/{__version__} httpx/{httpx.__version__} "
            f"{platform.python_implementation()}/{platform.python_version()}"
        )
        self._headers = {
            "User-Agent": self.user_agent,
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        #: Sleep used between retries (tests may replace it).
        self.sleep: Callable[[float], Awaitable[None]] = anyio.sleep

    def __repr__(self) -> str:
        return f"<Transport base_url={str(self.base_url)!r}>"

    @property
    def http(self) -> httpx.AsyncClient:
        """The httpx client. Unless one was given (or a transport), it is made at first use:
        on asyncio with the httpx-aiohttp transport, on trio with httpx's pool in shards."""
        if self._http is None:
            self._http = self._owned_client(_default_transport(self.max_connections))
        return self._http

    def _in_flight_cap(self) -> int:
        """Requests in flight at most: the pool's size; on httpx's own single pool (an owned
        client where the environment sets proxies), whose CPU cost per request grows with
        the requests it holds, at most ``HTTPX_POOL_IN_FLIGHT`` (the default polls plus a
        batch's submissions). Trio's default, :class:`ShardedPool`, needs no such cap."""
        self.http  # noqa: B018  (made now: which pool it is depends on the running backend)
        if self._given_transport is None and self._owns_client and self.transport_name == "httpx":
            return min(self.max_connections, HTTPX_POOL_IN_FLIGHT)
        return self.max_connections

    def _owned_client(self, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        self._direct = transport
        return httpx.AsyncClient(
            verify=_default_ssl_context() if transport is None else True,
            timeout=self._timeout,
            limits=httpx.Limits(
                max_connections=self.max_connections,
                max_keepalive_connections=self.max_connections,
            ),
            transport=transport,
            follow_redirects=False,
        )

    @property
    def transport_name(self) -> str:
        """What carries the requests: ``httpx-aiohttp`` (asyncio), ``httpx-shards`` (trio),
        ``httpx`` (proxies) or the given transport's type."""
        if self._http is None:
            return "not chosen yet"
        inner = getattr(self._http, "_transport", None)
        name = type(inner).__name__ if inner is not None else "httpx"
        names = {
            "AiohttpTransport": "httpx-aiohttp",
            "AsyncHTTPTransport": "httpx",
            "ShardedPool": "httpx-shards",
        }
        return names.get(name, name)

    def url(self, path: str) -> httpx.URL:
        return self.base_url.join(path.lstrip("/"))

    def is_api_url(self, url: httpx.URL) -> bool:
        return (url.scheme, url.host, url.port) == (
            self.base_url.scheme,
            self.base_url.host,
            self.base_url.port,
        )

    def build(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
    ) -> httpx.Request:
        """A request for ``path`` (or an absolute URL); signed only for the API's origin.

        With a client of its own the request is built directly from what was made
        once per path (a fraction of ``build_request``'s cost: no merging with client
        defaults it does not have, no parsing of the URL again); a user's
        ``http_client`` merges its own headers, cookies and timeout.
        """
        target = self._targets.get(path)
        if target is None:
            url = self.url(path)
            headers = dict(self._headers)
            if self.is_api_url(url):  # never sign a request to any other host
                headers["Authorization"] = f"Bearer {self._secret.reveal()}"
            target = self._targets[path] = (url, headers, httpx.Headers(headers))
        url, headers, prepared = target
        if self._owns_client:
            if params:
                url = _with_params(url, params)
            content = None
            if json_body is not None:
                content = json.dumps(
                    json_body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
                ).encode()
            return httpx.Request(
                method, url, headers=prepared, content=content, extensions=self._extensions
            )
        return self.client_request(method, url, headers=headers, params=params, json_body=json_body)

    def client_request(
        self,
        method: str,
        url: httpx.URL,
        *,
        headers: Mapping[str, str],
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
    ) -> httpx.Request:
        """A request built by the httpx client (its defaults merged in), with the
        ``timeout`` given beside a user's ``http_client``, if any: API calls and image
        downloads alike."""
        if self._timeout_override is not None:
            return self.http.build_request(
                method,
                url,
                params=params,
                json=json_body,
                headers=headers,
                timeout=self._timeout_override,
            )
        return self.http.build_request(method, url, params=params, json=json_body, headers=headers)

    def scrub(self, error: BaseException) -> None:
        """Remove the API key from ``error`` (in place); for modules raising their own."""
        self._secret.scrub(error)

    def open(self) -> anyio.Semaphore:
        """Make the HTTP client (if it is ours) and the in-flight slots now, in the running
        event loop: on entering the client rather than in its first request, whose caller
        would wait for it (on asyncio that imports aiohttp: about 0.15 s of CPU)."""
        if self._in_flight is None:
            cap = self._in_flight_cap()
            self._in_flight = anyio.Semaphore(cap, max_value=cap, fast_acquire=True)
        return self._in_flight

    async def aclose(self) -> None:
        if self._owns_client and self._http is not None:
            await self._http.aclose()

    async def get(
        self, path: str, *, params: Mapping[str, Any] | None = None, parse: Callable[[Any], T]
    ) -> T:
        """GET ``path`` and ``parse`` its JSON; retried on anything transient."""
        return await self.request("GET", path, params=params, parse=parse)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        parse: Callable[[Any], T],
        attempts: Attempts | None = None,
        rate_limit_attempts: int = RATE_LIMIT_ATTEMPTS,
    ) -> T:
        """The one request loop: send, ``parse`` the JSON, retry per :func:`should_retry`.

        ``parse`` may raise :class:`MalformedResponseError` (an answer that is not
        what was asked for): that counts as a malformed body. With ``attempts``
        every attempt is admitted first (cancellable) and then sent shielded,
        so an answer on its way is never lost to a cancellation. A POST whose
        outcome is unknown raises :class:`Uncertain`. A POST gives up at its
        ``rate_limit_attempts``-th 429 (a GET's 429s count as ``max_retries``).
        """
        retry = self.retry
        failures = rate_limited = 0
        slots = self.open()
        while True:
            error: NovitaError
            if attempts is None:
                try:
                    async with slots:
                        return await self._attempt(method, path, params, json_body, parse)
                except NovitaError as exc:
                    error = exc
            else:
                await attempts.admit()
                acquired = False
                try:
                    await slots.acquire()
                    acquired = True
                    # A task resuming with its admission or slot may do so after a
                    # cancellation was asked for: it must not send then (the shield
                    # below would hide the cancellation).
                    await anyio.lowlevel.checkpoint_if_cancelled()
                except BaseException:
                    attempts.withdraw()
                    if acquired:
                        slots.release()
                    raise
                try:
                    with anyio.CancelScope(shield=True):
                        await attempts.sending()
                        answer = await self._attempt(method, path, params, json_body, parse)
                        await attempts.accepted(answer)
                        return answer
                except NovitaError as exc:
                    error = exc
                finally:
                    slots.release()
            self._secret.scrub(error)
            decision = should_retry(method, error)
            if decision == "retry":
                if isinstance(error, RateLimitError) and method != "GET":
                    rate_limited += 1
                    exhausted = rate_limited >= rate_limit_attempts
                else:
                    failures += 1
                    exhausted = failures > retry.max_retries
                if exhausted:
                    decision = "raise"
            delay = None
            if attempts is not None:  # what the attempt cost is recorded whatever happens
                with anyio.CancelScope(shield=True):
                    delay = await attempts.refused(error, decision)
            if decision == "uncertain":
                logger.warning("%s %s outcome unknown, not retried: %s", method, path, error)
                raise Uncertain(error)
            if decision == "raise":
                raise error
            if delay is None:
                retry_after = error.retry_after if isinstance(error, APIStatusError) else None
                delay = retry.delay(failures + rate_limited - 1, retry_after)
            logger.info("%s %s failed (%s); retry in %.2fs", method, path, error, delay)
            await self.sleep(delay)

    async def _attempt(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None,
        json_body: Any,
        parse: Callable[[Any], T],
    ) -> T:
        """One request; its parsed answer or the mapped :class:`NovitaError`."""
        request = self.build(method, path, params=params, json_body=json_body)
        try:
            response = await self._send(request)
            try:
                content = await _read_capped(response, self.max_answer_bytes)
            finally:
                await response.aclose()
        except httpx.RequestError as exc:
            raise connection_error(exc, method, path) from exc
        try:
            return parse(read_answer(response, content))
        except RecursionError:
            raise MalformedResponseError(f"{method} {path}: answer nested too deeply") from None

    async def _send(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; the answer's body is left to read.

        A client of our own with a known transport (by default httpx-aiohttp on
        asyncio and httpx's pool in shards on trio, or the ``transport=`` given) calls it
        directly: what
        ``AsyncClient.send`` adds around it is unused there (no auth, hooks,
        redirects or proxy mounts), and its cookie jar alone cost about a tenth of
        the library's CPU per request (API answers set no cookies we would send).
        """
        client, direct = self.http, self._direct
        if direct is None:
            return await client.send(request, stream=True)
        if client.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        response = await direct.handle_async_request(request)
        response.request = request
        return response


def _with_params(url: httpx.URL, params: Mapping[str, Any]) -> httpx.URL:
    """``url`` with the query ``params`` (httpx's own encoding). A URL without a query
    keeps its parsed parts and takes the encoded query where that gives what httpx's
    own parse gives (checked once, at import): parsing the whole URL again was about
    half of a task-result request's building. Otherwise httpx merges them."""
    if _QUERY_REPLACEABLE and not url.query:
        return _replace_query(url, str(httpx.QueryParams(params)))
    return url.copy_merge_params(params)


def _replace_query(url: httpx.URL, query: str) -> httpx.URL:
    replaced = httpx.URL.__new__(httpx.URL)
    replaced._uri_reference = url._uri_reference._replace(query=query)
    return replaced


def _query_replacing_agrees() -> bool:
    url = httpx.URL("https://api.example:8443/v3/async/task-result")
    query = str(httpx.QueryParams({"task_id": "a b/\u00e9?&=%+#~", "n": 1}))
    try:
        replaced = _replace_query(url, query)
        parsed = httpx.URL(f"{url}?{query}")
        return (str(replaced), replaced.params, replaced.raw_path, replaced.host) == (
            str(parsed),
            parsed.params,
            parsed.raw_path,
            parsed.host,
        )
    except Exception:  # another httpx: its internals moved
        return False


#: httpx's URL can take a new query without a parse (see :func:`_with_params`).
_QUERY_REPLACEABLE: Final = _query_replacing_agrees()


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """The body, or :class:`MalformedResponseError` once it passes ``limit`` bytes."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(response, limit)
    chunks: list[bytes] = []
    size = 0
    # Past the cap the rest is read and dropped (memory stays bounded): leaving httpx's
    # nested body generators half-read would leave them to the garbage collector.
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif chunks:
            chunks.clear()
    if size > limit:
        raise _too_large(response, limit)
    return b"".join(chunks)


def _too_large(response: httpx.Response, limit: int) -> MalformedResponseError:
    method, path = request_of(response)
    return MalformedResponseError(
        f"{method} {path}: {response.status_code} answer is larger than {limit} bytes"
    )


class Uncertain(Exception):
    """Internal: the POST reached Novita but its outcome is unknown."""

    def __init__(self, cause: NovitaError) -> None:
        super().__init__(str(cause))
        self.cause = cause
