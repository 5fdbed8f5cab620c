"""Image downloads: streamed, size-capped, retried, never signed, saved atomically.

Novita's image URLs are presigned S3 GET URLs on a host other than the API's
(``X-Amz-Expires=3600``). Requests to them are built here WITHOUT the
``Authorization`` header, without cookies (and with the client's own auth
disabled), whatever the host; redirects are followed here, hop by hop, so no
hop gets them either. An expired URL raises :class:`ImageExpiredError`; every
other failure (HTTP status, network, too many redirects, undecodable or cut
body, a file that cannot be written) raises :class:`DownloadError`, carrying the
HTTP status when there was one; nothing else escapes. A web page (``text/html``)
is never taken for an image, even with a success status.

A body is complete only if it is: fewer bytes than its ``Content-Length`` is a
cut transfer (retried, then an error), and a body delimited by the connection's
end alone (HTTP/1.x without length or chunking) must end the way its format
ends (PNG ``IEND``, JPEG ``FFD9``, the RIFF length of WebP, GIF ``;``); a body
in an unrecognised format cannot be checked that way and is taken as it is.

Files are written to ``.<name>.<8 hex>.part`` next to the target and renamed into
place. Part files of a killed process are removed by the next save into the same
directory once they are older than ``STALE_PART_AGE`` seconds (a live download
rewrites its part file continuously, so it is never that old).
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import anyio
import httpx

from ._errors import DownloadError, ImageExpiredError
from ._results import Image, TaskResult
from ._retry import parse_retry_after
from ._transport import Transport

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "download_image",
    "image_filename",
    "safe_name",
    "save_image",
    "save_images",
]

logger = logging.getLogger("novita_async")
T = TypeVar("T")

#: Largest image body accepted (bytes); Novita's biggest outputs are a few MB.
DEFAULT_MAX_IMAGE_BYTES = 50 * 1024 * 1024
#: Images of one result downloaded at the same time by :func:`save_images`.
SAVE_CONCURRENCY = 4
_CHUNK = 256 * 1024
_ERROR_BODY_PREVIEW = 16 * 1024
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp", "gif": "gif"}
#: Media types of web pages: a body declared so is never saved as an image.
_PAGES = frozenset({"text/html", "application/xhtml+xml"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_STEM = 100
#: Seconds after which a ``.part`` file nobody writes is taken as left by a dead process.
STALE_PART_AGE = 60.0
_PART = re.compile(r"^\..+\.[0-9a-f]{8}\.part$")
_cleaned: dict[str, float] = {}  # directory -> time.monotonic() of its last cleanup
#: Part files this process is writing now (in their folder's real path): never stale,
#: however long since their last write.
_live_parts: set[str] = set()
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
)


# --------------------------------------------------------------------------- names


def safe_name(text: str, *, max_length: int = _MAX_STEM, default: str = "image") -> str:
    """A file-name stem made of ``[A-Za-z0-9._-]`` only: no separators, no ``..``, no dotfiles."""
    stem = _UNSAFE.sub("_", text)
    stem = re.sub(r"\.{2,}", ".", stem)  # no ".." anywhere
    stem = re.sub(r"_{2,}", "_", stem)
    stem = stem.strip("._-")[:max_length].strip("._-")
    if not stem:
        return default
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = f"_{stem}"
    return stem


def _extension(image: Image) -> str:
    """From ``image_type``, else the URL's suffix (whitelisted only), else ``bin``."""
    known = _EXTENSIONS.get(image.image_type.strip().lower())
    if known:
        return known
    try:
        suffix = httpx.URL(image.image_url).path.rsplit(".", 1)[-1].lower()
    except httpx.InvalidURL:
        suffix = ""
    return _EXTENSIONS.get(suffix, "bin")


def image_filename(
    task_id: str, index: int, image: Image, *, prefix: str | None = None, count: int = 1
) -> str:
    """``<prefix or task_id>-<index>.<ext>``; sanitized, the index zero-padded to sort.

    When sanitizing changes the prefix (non-ASCII text, separators, spaces, too long),
    8 hex digits of its sha256 are appended to the safe stem, so that distinct prefixes
    never collapse into one name (``猫`` and ``犬`` are not both ``task-0.png``).
    """
    source = prefix if prefix else task_id
    stem = safe_name(source, default="task")
    if stem != source:
        digest = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
        stem = f"{stem}-{digest[:8]}"
    width = len(str(max(count - 1, 0)))
    return f"{stem}-{index:0{width}d}.{_extension(image)}"


# --------------------------------------------------------------------------- HTTP


def _url_of(image: Image | str) -> httpx.URL:
    raw = image.image_url if isinstance(image, Image) else image
    if not isinstance(raw, str) or not raw:
        raise DownloadError(f"not an image URL: {raw!r}")
    try:
        url = httpx.URL(raw)
    except httpx.InvalidURL as exc:
        raise DownloadError(f"invalid image URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise DownloadError(f"image URL must be http(s): {_shown(url)}")
    return url


def _shown(url: httpx.URL) -> str:
    """The URL without its query (presigned signatures are noise in messages)."""
    return str(url.copy_with(query=None, fragment=None))


def _build(transport: Transport, url: httpx.URL) -> httpx.Request:
    headers = {"User-Agent": transport.user_agent, "Accept": "image/*, */*;q=0.5"}
    request = transport.client_request("GET", url, headers=headers)
    # The client may carry default headers of its own (a user's http_client):
    # whatever they are, credentials never go to the image host.
    for name in ("Authorization", "Proxy-Authorization", "Cookie"):
        request.headers.pop(name, None)
    return request


def _presigned_expiry(url: httpx.URL) -> float | None:
    """Epoch seconds at which an ``X-Amz-Date`` + ``X-Amz-Expires`` URL stops working."""
    params = {key.lower(): value for key, value in url.params.multi_items()}
    date, expires = params.get("x-amz-date"), params.get("x-amz-expires")
    if not date or not expires:
        return None
    try:
        signed = calendar.timegm(time.strptime(date, "%Y%m%dT%H%M%SZ"))
        return signed + float(expires)
    except ValueError:
        return None


def _status_failure(
    url: httpx.URL, status: int, body: str, *, page: str | None = None
) -> DownloadError:
    """The error of an answer that is no image: an HTTP error status, or (``page``: its
    media type) a web page served with a success status."""
    lowered = body.lower()
    where = _shown(url)
    expiry = _presigned_expiry(url)
    # S3 answers 403 AccessDenied "Request has expired"; some hosts say 410 Gone,
    # or serve a page saying so.
    expired = status == 410 or (
        (status in (400, 401, 403) or page is not None)
        and ("expired" in lowered or (expiry is not None and expiry <= time.time()))
    )
    if expired:
        when = ""
        if expiry is not None:
            when = f" at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expiry))}"
        return ImageExpiredError(
            f"image URL expired{when} (HTTP {status}): {where}. Novita's image URLs live "
            "image_url_ttl seconds (3600) after the task finished: download images promptly",
            status_code=status,
        )
    detail = " ".join(body.split())[:200]
    what = f"HTTP {status}" if page is None else f"a {page} page (HTTP {status}), not an image"
    return DownloadError(
        f"image download failed with {what}: {where}" + (f" ({detail})" if detail else ""),
        status_code=status,
    )


def _too_large(url: httpx.URL, max_bytes: int) -> DownloadError:
    return DownloadError(f"image larger than max_bytes={max_bytes}: {_shown(url)}")


async def _read_preview(response: httpx.Response) -> str:
    data = bytearray()
    chunks = response.aiter_bytes()
    try:
        async for chunk in chunks:
            data += chunk
            if len(data) >= _ERROR_BODY_PREVIEW:
                break
    except httpx.HTTPError:
        pass
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    return bytes(data[:_ERROR_BODY_PREVIEW]).decode("utf-8", "replace")


class _Transient(Exception):
    """A failure worth retrying; carries the DownloadError to raise if retries run out,
    and the server's ``Retry-After`` (seconds) if it sent one."""

    def __init__(self, error: DownloadError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def _wrapped(message: str, exc: BaseException, status_code: int | None = None) -> DownloadError:
    error = DownloadError(f"{message}: {type(exc).__name__}: {exc}", status_code=status_code)
    error.__cause__ = exc
    return error


def _content_length(response: httpx.Response) -> int | None:
    declared = response.headers.get("content-length", "").strip()
    return int(declared) if declared.isdigit() else None


def _complete_format(head: bytes, tail: bytes, size: int) -> bool:
    """Whether a body that starts with ``head`` and ends with ``tail`` ends like its format
    does; True for formats not recognised (nothing to check)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return tail.endswith(b"IEND\xaeB`\x82")
    if head.startswith(b"\xff\xd8\xff"):
        return tail.rstrip(b"\x00\r\n").endswith(b"\xff\xd9")
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return size >= int.from_bytes(head[4:8], "little") + 8
    if head.startswith((b"GIF87a", b"GIF89a")):
        return tail.endswith(b";")
    return True


class _Body:
    """Pull-reader over a response body that enforces ``max_bytes`` and completeness."""

    def __init__(self, response: httpx.Response, url: httpx.URL, max_bytes: int) -> None:
        self._response = response
        self._chunks = response.aiter_bytes(_CHUNK)
        self._url = url
        self._max_bytes = max_bytes
        self._received = 0
        self._head = b""
        self._tail = b""

    async def read(self) -> bytes | None:
        """The next chunk, or None at the end."""
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            return None
        self._received += len(chunk)
        if self._received > self._max_bytes:
            raise _too_large(self._url, self._max_bytes)
        if len(self._head) < 16:
            self._head = (self._head + chunk)[:16]
        self._tail = (self._tail + chunk)[-16:]
        return chunk

    def check_complete(self) -> None:
        """Raise (retryably) if the body that was read to its end is cut short."""
        response = self._response
        declared = _content_length(response)
        if declared is not None:
            # Content-Length counts the bytes on the wire: decoded bytes are comparable
            # only without a content encoding. (A body httpx already held in memory
            # counts no downloaded bytes: nothing was streamed that could be cut.)
            encoded = response.headers.get("content-encoding", "identity").lower()
            if encoded.strip() in ("", "identity"):
                got = self._received
            else:
                got = response.num_bytes_downloaded or declared
            if got < declared:
                raise _Transient(
                    DownloadError(
                        f"download of {_shown(self._url)} cut short: {got} of {declared} bytes",
                        status_code=response.status_code,
                    )
                )
            return
        chunked = "chunked" in response.headers.get("transfer-encoding", "").lower()
        if chunked or response.http_version not in ("HTTP/1.1", "HTTP/1.0"):
            return  # framed: the HTTP layer itself reports a cut
        if not _complete_format(self._head, self._tail, self._received):
            raise _Transient(
                DownloadError(
                    f"download of {_shown(self._url)} cut short: the connection closed after "
                    f"{self._received} bytes, before the end of the image",
                    status_code=response.status_code,
                )
            )

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]


async def _open(transport: Transport, url: httpx.URL) -> httpx.Response:
    """Send the GET and follow redirects here, each hop built afresh without credentials
    or cookies (httpx would re-add the client's cookie jar on every redirect)."""
    max_redirects = transport.http.max_redirects
    for _ in range(max_redirects + 1):
        try:
            response = await transport.http.send(
                _build(transport, url), stream=True, auth=None, follow_redirects=False
            )
        except httpx.UnsupportedProtocol as exc:
            raise _wrapped(f"cannot download {_shown(url)}", exc) from exc
        except httpx.TransportError as exc:
            raise _Transient(_wrapped(f"cannot download {_shown(url)}", exc)) from exc
        except httpx.HTTPError as exc:  # e.g. an unusable Location header
            raise _wrapped(f"cannot download {_shown(url)}", exc) from exc
        target = response.next_request
        if target is None:
            return response
        with anyio.CancelScope(shield=True):
            await response.aclose()
        url = _url_of(str(target.url))
    raise DownloadError(f"more than {max_redirects} redirects downloading {_shown(url)}")


async def _once(
    transport: Transport,
    url: httpx.URL,
    consume: Callable[[Callable[[], Awaitable[bytes | None]]], Awaitable[T]],
    max_bytes: int,
) -> T:
    """One download attempt: the value of ``consume``, a DownloadError, or _Transient."""
    response = await _open(transport, url)
    try:
        if not response.is_success:
            status = response.status_code
            error = _status_failure(url, status, await _read_preview(response))
            if status == 429 or status >= 500:
                raise _Transient(error, parse_retry_after(response.headers.get("retry-after")))
            raise error
        media = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if media in _PAGES:  # an error or login page of a proxy or CDN, sent as 200
            raise _status_failure(
                url, response.status_code, await _read_preview(response), page=media
            )
        declared = _content_length(response)
        if declared is not None and declared > max_bytes:
            raise _too_large(url, max_bytes)
        body = _Body(response, url, max_bytes)
        try:
            value = await consume(body.read)
            body.check_complete()
            return value
        except httpx.TransportError as exc:  # connection lost mid-body
            where = f"download of {_shown(url)} interrupted"
            raise _Transient(_wrapped(where, exc, response.status_code)) from exc
        except (httpx.HTTPError, httpx.StreamError) as exc:  # undecodable body, ...
            where = f"download of {_shown(url)} failed"
            raise _wrapped(where, exc, response.status_code) from exc
        finally:
            with anyio.CancelScope(shield=True):
                await body.aclose()
    finally:
        with anyio.CancelScope(shield=True):
            await response.aclose()


async def _fetch(
    transport: Transport,
    image: Image | str,
    consume: Callable[[Callable[[], Awaitable[bytes | None]]], Awaitable[T]],
    *,
    max_bytes: int,
) -> T:
    """GET the image and hand its body's reader to ``consume``; retry transient failures.

    Transient: connection errors, timeouts, a body cut short, 429 and 5xx (after the
    server's ``Retry-After``, capped by the retry policy, when it sends one).
    ``consume`` must start from scratch on every call (a retry restarts it).
    """
    url = _url_of(image)
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    attempt = 0
    while True:
        try:
            return await _once(transport, url, consume, max_bytes)
        except _Transient as transient:
            error, retry_after = transient.error, transient.retry_after
        if attempt >= transport.retry.max_retries:
            raise error
        delay = transport.retry.delay(attempt, retry_after)
        logger.info("image download failed (%s); retry %d in %.2fs", error, attempt + 1, delay)
        attempt += 1
        await anyio.sleep(delay)


# --------------------------------------------------------------------------- public helpers


async def download_image(
    transport: Transport, image: Image | str, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> bytes:
    """The image's bytes (at most ``max_bytes``)."""

    async def collect(next_chunk: Callable[[], Awaitable[bytes | None]]) -> bytes:
        data = bytearray()
        while (chunk := await next_chunk()) is not None:
            data += chunk
        return bytes(data)

    return await _fetch(transport, image, collect, max_bytes=max_bytes)


async def save_image(
    transport: Transport,
    image: Image | str,
    path: Path,
    *,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Path:
    """Stream the image to a temp file next to ``path``, then rename it into place.

    The parent directory is created if needed. On any error (or cancellation)
    the temp file is removed and ``path`` is untouched.
    """
    target = anyio.Path(path)
    try:
        await target.parent.mkdir(parents=True, exist_ok=True)
        # The folder as the cleanup of every save sees it, however each save spells it
        # (relative, absolute, through a symlink): a live part file is known by that path.
        folder = await anyio.to_thread.run_sync(os.path.realpath, target.parent)
        await _clean_stale_parts(Path(folder))
    except OSError as exc:
        _cannot_save(path, exc)
    temp = target.parent / f".{safe_name(target.name)}.{secrets.token_hex(4)}.part"
    live = os.path.join(folder, temp.name)
    _live_parts.add(live)

    async def write(next_chunk: Callable[[], Awaitable[bytes | None]]) -> None:
        async with await anyio.open_file(temp, "wb") as file:  # "wb": a retry starts over
            while (chunk := await next_chunk()) is not None:
                await file.write(chunk)

    try:
        await _fetch(transport, image, write, max_bytes=max_bytes)
        await temp.replace(target)
    except BaseException as exc:
        with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
            await temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            _cannot_save(path, exc)
        raise
    finally:
        _live_parts.discard(live)
    return Path(path)


def _cannot_save(path: Path, exc: OSError) -> NoReturn:
    raise DownloadError(f"cannot save image to {path}: {type(exc).__name__}: {exc}") from exc


async def _clean_stale_parts(directory: Path) -> None:
    """Remove ``.part`` files of dead processes from ``directory`` (at most once per
    ``STALE_PART_AGE`` per directory and process; this process's live part files are
    never stale, even when a slow body leaves them unwritten for longer)."""
    key = str(directory)
    now = time.monotonic()
    last = _cleaned.get(key)
    if last is not None and now - last < STALE_PART_AGE:
        return
    _cleaned[key] = now
    await anyio.to_thread.run_sync(_remove_stale_parts, directory)


def _remove_stale_parts(directory: Path) -> None:
    cutoff = time.time() - STALE_PART_AGE
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        if not _PART.match(entry.name) or entry.path in _live_parts:
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                logger.info("removed stale partial download %s", entry.path)
        except OSError:
            pass  # gone meanwhile, or not ours to remove


async def save_images(
    transport: Transport,
    result: TaskResult,
    directory: Path,
    *,
    prefix: str | None = None,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    concurrency: int = SAVE_CONCURRENCY,
) -> list[Path]:
    """Save every image of ``result`` as ``directory/<prefix or task_id>-<i>.<ext>``.

    Paths come back in ``result.images`` order. The first failure cancels the
    other downloads and is raised (images already saved are kept; no partial
    file is ever left behind).
    """
    images = result.images
    if not images:
        return []
    names = [
        image_filename(result.task_id, i, image, prefix=prefix, count=len(images))
        for i, image in enumerate(images)
    ]
    try:
        await anyio.Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _cannot_save(directory / names[0], exc)
    paths: list[Path | None] = [None] * len(images)
    errors: list[tuple[int, BaseException]] = []
    limiter = anyio.CapacityLimiter(max(concurrency, 1))

    async with anyio.create_task_group() as group:

        async def one(i: int) -> None:
            try:
                async with limiter:
                    paths[i] = await save_image(
                        transport, images[i], directory / names[i], max_bytes=max_bytes
                    )
            except Exception as exc:  # reported below, without an ExceptionGroup
                errors.append((i, exc))
                group.cancel_scope.cancel()

        for i in range(len(images)):
            group.start_soon(one, i)

    if errors:
        raise min(errors, key=lambda pair: pair[0])[1]
    return [path for path in paths if path is not None]
