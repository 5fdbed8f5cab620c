"""Image downloads: streamed, size-capped, retried, never signed, saved atomically.

Novita's image URLs are presigned S3 GET URLs on a host other than the API's
(``X-Amz-Expires=3600``). Requests to them are built here WITHOUT the
``Authorization`` header (and with the client's own auth disabled), whatever
the host. An expired URL raises :class:`ImageExpiredError`; any other failure
raises :class:`DownloadError` carrying the HTTP status when there was one.
"""

from __future__ import annotations

import calendar
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio
import httpx

from ._errors import DownloadError, ImageExpiredError
from ._models import Image, TaskResult
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
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_STEM = 100
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
    """``<prefix or task_id>-<index>.<ext>``; sanitized, the index zero-padded to sort."""
    stem = safe_name(prefix if prefix else task_id, default="task")
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
    request = transport.http.build_request(
        "GET", url, headers={"User-Agent": transport.user_agent, "Accept": "image/*, */*;q=0.5"}
    )
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


def _status_failure(url: httpx.URL, status: int, body: str) -> DownloadError:
    lowered = body.lower()
    where = _shown(url)
    expiry = _presigned_expiry(url)
    # S3 answers 403 AccessDenied "Request has expired"; some hosts say 410 Gone.
    expired = status == 410 or (
        status in (400, 401, 403)
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
    return DownloadError(
        f"image download failed with HTTP {status}: {where}" + (f" ({detail})" if detail else ""),
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


class _Body:
    """Pull-reader over a response body that enforces ``max_bytes``."""

    def __init__(self, response: httpx.Response, url: httpx.URL, max_bytes: int) -> None:
        self._chunks = response.aiter_bytes(_CHUNK)
        self._url = url
        self._max_bytes = max_bytes
        self._received = 0

    async def read(self) -> bytes | None:
        """The next chunk, or None at the end."""
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            return None
        self._received += len(chunk)
        if self._received > self._max_bytes:
            raise _too_large(self._url, self._max_bytes)
        return chunk

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]


async def _fetch(
    transport: Transport,
    image: Image | str,
    consume: Callable[[Callable[[], Awaitable[bytes | None]]], Awaitable[T]],
    *,
    max_bytes: int,
) -> T:
    """GET the image and hand its body's reader to ``consume``; retry transient failures.

    Transient: connection errors, timeouts, a body cut short, 429 and 5xx.
    ``consume`` must start from scratch on every call (a retry restarts it).
    """
    url = _url_of(image)
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    attempt = 0
    while True:
        retryable = False
        request = _build(transport, url)
        try:
            response = await transport.http.send(
                request, stream=True, auth=None, follow_redirects=True
            )
        except httpx.TransportError as exc:
            retryable = not isinstance(exc, httpx.UnsupportedProtocol)
            error = DownloadError(f"cannot download {_shown(url)}: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
        else:
            try:
                if not response.is_success:
                    status = response.status_code
                    error = _status_failure(url, status, await _read_preview(response))
                    retryable = status == 429 or status >= 500
                else:
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise _too_large(url, max_bytes)
                    body = _Body(response, url, max_bytes)
                    try:
                        return await consume(body.read)
                    except httpx.TransportError as exc:  # connection lost mid-body
                        retryable = True
                        error = DownloadError(
                            f"download of {_shown(url)} interrupted: {type(exc).__name__}: {exc}",
                            status_code=response.status_code,
                        )
                        error.__cause__ = exc
                    finally:
                        with anyio.CancelScope(shield=True):
                            await body.aclose()
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
        if not retryable or attempt >= transport.retry.max_retries:
            raise error
        delay = transport.retry.delay(attempt)
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
    await target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{safe_name(target.name)}.{secrets.token_hex(4)}.part"

    async def write(next_chunk: Callable[[], Awaitable[bytes | None]]) -> None:
        async with await anyio.open_file(temp, "wb") as file:  # "wb": a retry starts over
            while (chunk := await next_chunk()) is not None:
                await file.write(chunk)

    try:
        await _fetch(transport, image, write, max_bytes=max_bytes)
        await temp.replace(target)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await temp.unlink(missing_ok=True)
        raise
    return Path(path)


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
    await anyio.Path(directory).mkdir(parents=True, exist_ok=True)
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
