"""Image downloads: no credentials to the image host, status/expiry handling, atomic saves."""

from __future__ import annotations

import hashlib
import os
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from _support import API, MODEL

from novita_async import (
    AsyncNovita,
    DownloadError,
    Extra,
    Image,
    ImageExpiredError,
    RetryPolicy,
    Task,
    TaskResult,
    TaskStatus,
    Txt2ImgRequest,
    _download,
)
from novita_async._download import image_filename, safe_name
from novita_async.testing import ManualClock, NovitaEmulator

pytestmark = pytest.mark.anyio

IMAGES = "https://faas-output-image.s3.ap-southeast-1.amazonaws.com"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
FAST_RETRY = RetryPolicy(max_retries=2, initial_backoff=0.0, max_backoff=0.0)

Handler = Callable[[httpx.Request], Any]


def sha8(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def names_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


class ImageHost:
    """A scripted image host: ``responses`` are served in order, then ``default``."""

    def __init__(self, default: Handler | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.script: list[Handler] = []
        self.default: Handler = default or (lambda request: httpx.Response(200, content=PNG))

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        handler = self.script.pop(0) if self.script else self.default
        response = handler(request)
        if isinstance(response, Exception):
            raise response
        assert isinstance(response, httpx.Response)
        return response


def client_for(host: ImageHost, **kwargs: Any) -> AsyncNovita:
    kwargs.setdefault("retry_policy", FAST_RETRY)
    return AsyncNovita("secret-key", transport=httpx.MockTransport(host), **kwargs)


def presigned(path: str = "/out/image_01.png", *, signed_at: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(signed_at or time.time()))
    return (
        f"{IMAGES}{path}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date={stamp}"
        "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=abc123"
    )


def result_with(*images: Image, task_id: str = "task-1") -> TaskResult:
    return TaskResult(task=Task(task_id=task_id, status=TaskStatus.SUCCEED), images=tuple(images))


S3_EXPIRED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message><X-Amz-Expires>3600</X-Amz-Expires></Error>"
)


# --------------------------------------------------------------------------- download_image


async def test_download_returns_the_bytes_and_never_sends_credentials() -> None:
    host = ImageHost()
    async with client_for(host) as client:
        data = await client.download_image(Image(image_url=presigned(), image_type="png"))
    assert data == PNG
    (request,) = host.requests
    assert request.url.host == "faas-output-image.s3.ap-southeast-1.amazonaws.com"
    assert "authorization" not in request.headers
    assert "secret-key" not in str(request.headers)
    assert request.headers["user-agent"].startswith("novita-async/")
    # the presigned query survives untouched
    assert request.url.params["X-Amz-Signature"] == "abc123"


async def test_no_credentials_even_from_a_user_http_client_with_default_auth() -> None:
    host = ImageHost()
    http = httpx.AsyncClient(
        transport=httpx.MockTransport(host),
        headers={"Authorization": "Bearer secret-key", "Cookie": "session=1"},
        auth=("user", "password"),
    )
    async with http, AsyncNovita("secret-key", http_client=http) as client:
        assert await client.download_image(presigned()) == PNG
    (request,) = host.requests
    assert "authorization" not in request.headers
    assert "cookie" not in request.headers


@pytest.mark.parametrize("timeout", [30.0, None])
async def test_downloads_with_a_user_http_client_honour_an_explicit_timeout(
    timeout: float | None,
) -> None:
    # AsyncNovita(timeout=...) is the HTTP timeout of each request, also with your own
    # http_client: an image download (and each redirect hop) is one of those requests.
    host = ImageHost()
    host.script.append(lambda request: httpx.Response(302, headers={"Location": "/b.png"}))
    http = httpx.AsyncClient(transport=httpx.MockTransport(host), timeout=httpx.Timeout(9.0))
    with anyio.fail_after(10):
        async with http, AsyncNovita("secret-key", http_client=http, timeout=timeout) as client:
            assert await client.download_image(presigned()) == PNG
    assert len(host.requests) == 2
    for request in host.requests:
        assert request.extensions["timeout"] == httpx.Timeout(timeout).as_dict()


async def test_image_url_on_the_api_host_is_not_signed_either() -> None:
    host = ImageHost()
    async with client_for(host) as client:
        await client.download_image(f"{API}/files/image.png")
    assert "authorization" not in host.requests[0].headers


async def test_s3_expired_url_raises_image_expired_without_retrying() -> None:
    host = ImageHost(lambda request: httpx.Response(403, content=S3_EXPIRED))
    old = time.time() - 7200
    async with client_for(host) as client:
        with pytest.raises(ImageExpiredError) as info:
            await client.download_image(presigned(signed_at=old))
    message = str(info.value)
    assert "expired" in message
    assert "3600" in message  # says why: the URL lifetime
    assert "X-Amz-Signature" not in message  # the signature is noise, not shown
    assert info.value.status_code == 403
    assert len(host.requests) == 1


async def test_access_denied_after_the_presigned_lifetime_is_expiry() -> None:
    body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
    host = ImageHost(lambda request: httpx.Response(403, content=body))
    async with client_for(host) as client:
        with pytest.raises(ImageExpiredError):
            await client.download_image(presigned(signed_at=time.time() - 4000))
        # the same answer for a URL still within its lifetime is a plain failure
        with pytest.raises(DownloadError) as info:
            await client.download_image(presigned())
    assert not isinstance(info.value, ImageExpiredError)
    assert info.value.status_code == 403


async def test_410_gone_is_expiry() -> None:
    host = ImageHost(lambda request: httpx.Response(410))
    async with client_for(host) as client:
        with pytest.raises(ImageExpiredError):
            await client.download_image(presigned())


async def test_404_is_a_download_error_and_not_retried() -> None:
    host = ImageHost(lambda request: httpx.Response(404, text="NoSuchKey"))
    async with client_for(host) as client:
        with pytest.raises(DownloadError) as info:
            await client.download_image(presigned())
    assert type(info.value) is DownloadError
    assert info.value.status_code == 404
    assert "404" in str(info.value)
    assert len(host.requests) == 1


async def test_5xx_and_connection_errors_are_retried() -> None:
    host = ImageHost()
    host.script = [
        lambda request: httpx.Response(503),
        lambda request: httpx.ConnectError("refused", request=request),
    ]
    async with client_for(host) as client:
        assert await client.download_image(presigned()) == PNG
    assert len(host.requests) == 3


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_of_the_image_host_is_honoured(status: int) -> None:
    """Regression: a 429/503 with ``Retry-After`` was retried after the policy's own
    backoff (here none), hammering the image host and using up the retries early."""
    sent: list[float] = []

    def throttled(request: httpx.Request) -> httpx.Response:
        sent.append(time.monotonic())
        return httpx.Response(status, headers={"retry-after": "0.6"})

    host = ImageHost()
    host.script = [throttled]
    with anyio.fail_after(5):
        async with client_for(host) as client:
            assert await client.download_image(presigned()) == PNG
            sent.append(time.monotonic())
    assert len(host.requests) == 2
    assert sent[1] - sent[0] >= 0.55


async def test_persistent_500_gives_up_after_the_retry_budget() -> None:
    host = ImageHost(lambda request: httpx.Response(500, text="boom"))
    async with client_for(host) as client:
        with pytest.raises(DownloadError) as info:
            await client.download_image(presigned())
    assert info.value.status_code == 500
    assert len(host.requests) == FAST_RETRY.max_retries + 1


async def test_max_bytes_from_content_length_and_from_the_stream() -> None:
    host = ImageHost()
    async with client_for(host) as client:
        with pytest.raises(DownloadError, match="max_bytes"):
            await client.download_image(presigned(), max_bytes=100)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 50

        host.default = lambda request: httpx.Response(200, content=chunks())  # no length
        with pytest.raises(DownloadError, match="max_bytes"):
            await client.download_image(presigned(), max_bytes=120)
        assert await client.download_image(presigned(), max_bytes=500) == b"x" * 500


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "not a url", "", "file:///etc/passwd"])
async def test_non_http_urls_are_refused(url: str) -> None:
    host = ImageHost()
    async with client_for(host) as client:
        with pytest.raises(DownloadError):
            await client.download_image(url)
    assert host.requests == []


# --------------------------------------------------------------------------- saving


async def test_save_image_writes_atomically_and_creates_the_directory(tmp_path: Path) -> None:
    host = ImageHost()
    target = tmp_path / "nested" / "dir" / "fox.png"
    async with client_for(host) as client:
        path = await client.save_image(presigned(), target)
    assert path == target
    assert target.read_bytes() == PNG
    assert sorted(p.name for p in target.parent.iterdir()) == ["fox.png"]


def _broken_body(request: httpx.Request) -> httpx.Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield PNG[:100]
        raise httpx.ReadError("connection reset", request=request)

    return httpx.Response(200, content=chunks())


async def test_failed_save_leaves_no_partial_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "image.png"
    target.write_bytes(b"previous")
    host = ImageHost(_broken_body)
    async with client_for(host) as client:
        with pytest.raises(DownloadError, match="interrupted"):
            await client.save_image(presigned(), target)
    assert len(host.requests) == FAST_RETRY.max_retries + 1  # a cut body is retried
    assert target.read_bytes() == b"previous"
    assert names_in(tmp_path) == ["image.png"]


async def test_retry_after_a_cut_body_starts_the_file_over(tmp_path: Path) -> None:
    host = ImageHost()
    host.script = [_broken_body]
    async with client_for(host) as client:
        path = await client.save_image(presigned(), tmp_path / "a.png")
    assert path.read_bytes() == PNG
    assert names_in(tmp_path) == ["a.png"]


async def test_cancelled_save_leaves_no_partial_file(tmp_path: Path) -> None:
    started = anyio.Event()

    def stalls(request: httpx.Request) -> httpx.Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield PNG[:100]
            started.set()
            await anyio.sleep_forever()
            yield b""  # pragma: no cover

        return httpx.Response(200, content=chunks())

    host = ImageHost(stalls)
    async with client_for(host) as client, anyio.create_task_group() as group:
        group.start_soon(client.save_image, presigned(), tmp_path / "a.png")
        await started.wait()
        group.cancel_scope.cancel()
    assert names_in(tmp_path) == []


async def test_save_images_names_are_safe_ordered_and_typed(tmp_path: Path) -> None:
    host = ImageHost(lambda request: httpx.Response(200, content=request.url.path.encode()))
    images = [
        Image(image_url=presigned(f"/x/{i}.bin"), image_type=kind)
        for i, kind in enumerate(["png", "jpeg", "webp", "", "", "png", "png", "png", "png"])
    ]
    images[3] = Image(image_url=presigned("/y/three.webp"), image_type="")
    images[4] = Image(image_url=presigned("/y/../../etc/passwd"), image_type="")
    result = result_with(*images, task_id="../../evil/task id")
    async with client_for(host) as client:
        paths = await client.save_images(result, tmp_path)
    names = [p.name for p in paths]
    stem = f"evil_task_id-{sha8('../../evil/task id')}"  # sanitized: the hash keeps it unique
    assert names == [
        f"{stem}-0.png",
        f"{stem}-1.jpg",
        f"{stem}-2.webp",
        f"{stem}-3.webp",  # whitelisted suffix from the URL
        f"{stem}-4.bin",  # never the URL's path itself
        f"{stem}-5.png",
        f"{stem}-6.png",
        f"{stem}-7.png",
        f"{stem}-8.png",
    ]
    assert all(p.parent == tmp_path for p in paths)
    assert sorted(names) == names  # sorts in image order
    # each file holds its own image (order preserved under concurrency)
    for path, image in zip(paths, images, strict=True):
        assert path.read_bytes() == httpx.URL(image.image_url).path.encode()


async def test_save_images_prefix_and_zero_padding(tmp_path: Path) -> None:
    host = ImageHost()
    images = [Image(image_url=presigned(), image_type="png") for _ in range(11)]
    async with client_for(host) as client:
        paths = await client.save_images(result_with(*images), tmp_path, prefix="fox/../run 1")
    assert paths[0].name == f"fox_._run_1-{sha8('fox/../run 1')}-00.png"
    assert paths[10].name.endswith("-10.png")
    assert ".." not in paths[0].name


async def test_save_images_with_no_images_returns_nothing(tmp_path: Path) -> None:
    host = ImageHost()
    async with client_for(host) as client:
        assert await client.save_images(result_with(), tmp_path / "none") == []
    assert host.requests == []


async def test_save_images_raises_the_first_failure_without_partial_files(tmp_path: Path) -> None:
    def by_path(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/1.png"):
            return httpx.Response(404)
        return httpx.Response(200, content=PNG)

    host = ImageHost(by_path)
    images = [Image(image_url=presigned(f"/x/{i}.png"), image_type="png") for i in range(3)]
    async with client_for(host) as client:
        with pytest.raises(DownloadError) as info:
            await client.save_images(result_with(*images), tmp_path)
    assert info.value.status_code == 404
    kept = names_in(tmp_path)
    assert not [name for name in kept if name.endswith(".part")]
    for name in kept:
        assert (tmp_path / name).read_bytes() == PNG  # whatever was kept is complete


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("task-123", "task-123"),
        ("../../etc/passwd", "etc_passwd"),
        ("a/b\\c", "a_b_c"),
        ("..", "image"),
        ("", "image"),
        (".hidden", "hidden"),
        ("-rf", "rf"),
        ("CON", "_CON"),
        ("renard roux 🦊", "renard_roux"),
        ("x" * 300, "x" * 100),
    ],
)
def test_safe_name(raw: str, expected: str) -> None:
    assert safe_name(raw) == expected


def test_image_filename_never_contains_separators() -> None:
    image = Image(image_url=f"{IMAGES}/a/b/../c.png?x=1", image_type="PNG")
    name = image_filename("t/../../1", 0, image, prefix=None, count=1)
    assert "/" not in name
    assert "\\" not in name
    assert ".." not in name
    assert name.endswith(".png")


# --------------------------------------------------------------------------- against the emulator


def emulator(**kwargs: Any) -> NovitaEmulator:
    kwargs.setdefault("durations", 0.0)
    return NovitaEmulator(**kwargs)


async def test_emulator_images_arrive_intact_and_unsigned(tmp_path: Path) -> None:
    emu = emulator()
    async with emu.client(retry_policy=FAST_RETRY) as client:
        result = await client.txt2img(Txt2ImgRequest(model_name=MODEL, prompt="a fox", image_num=2))
        data = await client.download_image(result.images[0])
        paths = await client.save_images(result, tmp_path)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert f"{result.task_id}/0.png".encode() in data  # the emulator labels each image
    assert [p.name for p in paths] == [f"{result.task_id}-0.png", f"{result.task_id}-1.png"]
    assert paths[0].read_bytes() == data
    assert f"{result.task_id}/1.png".encode() in paths[1].read_bytes()
    assert emu.image_requests == 3
    assert emu.image_auth_headers == 0


async def test_emulator_over_loopback_sockets(tmp_path: Path) -> None:
    emu = emulator()
    async with emu.serve() as server:
        assert server.image_base_url != server.base_url  # another origin
        async with server.client(retry_policy=FAST_RETRY) as client:
            extra = Extra(response_image_type="jpeg")
            result = await client.txt2img(Txt2ImgRequest(model_name=MODEL, prompt="x"), extra)
            assert result.images[0].image_url.startswith(server.image_base_url)
            (path,) = await client.save_images(result, tmp_path, prefix="loopback")
    assert path.name == "loopback-0.jpg"
    assert path.read_bytes().startswith(b"\xff\xd8")
    assert emu.image_auth_headers == 0


async def test_emulator_expired_url(tmp_path: Path) -> None:
    clock = ManualClock()
    emu = emulator(clock=clock)
    async with emu.client(retry_policy=FAST_RETRY) as client:
        result = await client.txt2img(Txt2ImgRequest(model_name=MODEL, prompt="x"))
        clock.advance(3600)
        with pytest.raises(ImageExpiredError, match="expired") as info:
            await client.save_image(result.images[0], tmp_path / "late.png")
    assert info.value.status_code == 403
    assert names_in(tmp_path) == []
    assert emu.image_requests == 1  # not retried


async def test_emulator_faults_retried_or_reported(tmp_path: Path) -> None:
    emu = emulator()
    async with emu.client(retry_policy=FAST_RETRY) as client:
        result = await client.txt2img(Txt2ImgRequest(model_name=MODEL, prompt="x"))
        image = result.images[0]
        emu.fail_next("image", status=500)
        emu.fail_next("image", reset=True)
        assert (await client.download_image(image)).startswith(b"\x89PNG")
        assert emu.image_requests == 3

        emu.fail_next("image", status=404)
        with pytest.raises(DownloadError) as info:
            await client.download_image(image)
        assert info.value.status_code == 404

        emu.fail_next("image", status=503, times=10)
        with pytest.raises(DownloadError) as info:
            await client.save_images(result, tmp_path)
        assert info.value.status_code == 503
    assert names_in(tmp_path) == []
    assert emu.image_auth_headers == 0


# --------------------------------------------------------------------------- hostile hosts (#10)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


REAL_PNG = (
    b"\x89PNG\r\n\x1a\n"
    + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
    + png_chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00\x00\xff\x00" * 2))
    + png_chunk(b"IEND", b"")
)


class Halves(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data[: len(self.data) // 2]
        yield self.data[len(self.data) // 2 :]


def streamed(data: bytes, **headers: str) -> Callable[[httpx.Request], httpx.Response]:
    """A response streamed in two halves with exactly ``headers``: without a
    content-length it is close-delimited, like an HTTP/1.0-style body."""
    return lambda request: httpx.Response(200, headers=headers, stream=Halves(data))


async def test_redirect_loop_is_a_download_error() -> None:
    """Regression: httpx.TooManyRedirects escaped raw (the CLI died with an ExceptionGroup)."""
    host = ImageHost(lambda request: httpx.Response(302, headers={"location": str(request.url)}))
    async with client_for(host) as client:
        with pytest.raises(DownloadError, match="redirects"):
            await client.download_image(presigned())
    assert 2 <= len(host.requests) <= 30


# httpx leaves its inner ``aiter_raw`` generator suspended when decoding fails (not ours to
# close); trio reports it when it is garbage-collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_undecodable_body_is_a_download_error(tmp_path: Path) -> None:
    """Regression: httpx.DecodingError (a bad gzip body) escaped raw."""
    host = ImageHost(streamed(b"this is not gzip at all", **{"content-encoding": "gzip"}))
    async with client_for(host) as client:
        with pytest.raises(DownloadError, match="DecodingError"):
            await client.download_image(presigned())
        with pytest.raises(DownloadError):
            await client.save_image(presigned(), tmp_path / "a.png")
    assert names_in(tmp_path) == []


async def test_redirect_to_a_non_http_url_is_a_download_error() -> None:
    host = ImageHost(lambda request: httpx.Response(302, headers={"location": "file:///etc/x"}))
    async with client_for(host) as client:
        with pytest.raises(DownloadError, match="http"):
            await client.download_image(presigned())


async def test_unwritable_target_is_a_download_error(tmp_path: Path) -> None:
    """OSError while saving (here: the target is a directory) is a DownloadError too."""
    (tmp_path / "taken.png").mkdir()
    (tmp_path / "a-file").write_bytes(b"")
    host = ImageHost()
    async with client_for(host) as client:
        with pytest.raises(DownloadError, match="cannot save image") as info:
            await client.save_image(presigned(), tmp_path / "taken.png")
        assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(DownloadError, match="cannot save image"):
            await client.save_image(presigned(), tmp_path / "a-file" / "x.png")
    assert names_in(tmp_path) == ["a-file", "taken.png"]  # no .part left


async def test_save_images_into_an_unusable_directory_is_a_download_error(
    tmp_path: Path,
) -> None:
    """Regression: save_images let the OSError of creating its directory escape (here
    FileExistsError: the directory is a file), though downloads raise DownloadError only."""
    (tmp_path / "a-file").write_bytes(b"")
    host = ImageHost()
    result = result_with(Image(image_url=presigned(), image_type="png"))
    async with client_for(host) as client:
        for directory in (tmp_path / "a-file", tmp_path / "a-file" / "sub"):
            with pytest.raises(DownloadError, match="cannot save image") as info:
                await client.save_images(result, directory)
            assert isinstance(info.value.__cause__, OSError)
    assert host.requests == []
    assert names_in(tmp_path) == ["a-file"]


async def test_a_web_page_sent_with_200_is_not_saved_as_an_image(tmp_path: Path) -> None:
    """Regression: a proxy's or CDN's HTML page answered with 200 (a login or error
    page, an expired link) was saved as ``x.png`` and reported a success."""
    html = {"content-type": "text/html; charset=utf-8"}
    page = b"<!DOCTYPE html><html><body><h1>Please sign in</h1></body></html>"
    host = ImageHost(lambda request: httpx.Response(200, content=page, headers=html))
    with anyio.fail_after(5):
        async with client_for(host) as client:
            with pytest.raises(DownloadError, match="text/html") as info:
                await client.save_image(presigned(), tmp_path / "x.png")
            assert type(info.value) is DownloadError
            assert info.value.status_code == 200
            with pytest.raises(DownloadError, match="not an image"):
                await client.download_image(presigned())
            assert len(host.requests) == 2  # not retried: it will not change
            host.default = lambda request: httpx.Response(
                200, content=b"<html><body>This link has expired</body></html>", headers=html
            )
            with pytest.raises(ImageExpiredError) as expired:
                await client.save_images(
                    result_with(Image(image_url=presigned(), image_type="png")), tmp_path
                )
            assert expired.value.status_code == 200
    assert names_in(tmp_path) == []


async def test_body_shorter_than_content_length_is_not_saved(tmp_path: Path) -> None:
    """Regression: a body cut before its Content-Length was saved as if complete."""
    host = ImageHost(streamed(PNG[:1000], **{"content-length": str(len(PNG))}))
    async with client_for(host) as client:
        with pytest.raises(DownloadError, match=f"cut short: 1000 of {len(PNG)} bytes"):
            await client.save_image(presigned(), tmp_path / "a.png")
    assert names_in(tmp_path) == []
    assert len(host.requests) == 3  # retried like a cut connection


async def test_close_delimited_body_must_end_like_its_format(tmp_path: Path) -> None:
    """Regression: a close-delimited PNG cut in the middle was saved as if complete."""
    host = ImageHost(streamed(REAL_PNG[:-5]))
    async with client_for(host) as client:
        with pytest.raises(DownloadError, match="connection closed after"):
            await client.save_image(presigned(), tmp_path / "cut.png")
        assert names_in(tmp_path) == []
        host.script.append(streamed(REAL_PNG[:-5]))
        host.default = streamed(REAL_PNG)  # the retry gets all of it
        saved = await client.save_image(presigned(), tmp_path / "whole.png")
        assert saved.read_bytes() == REAL_PNG
        jpeg = b"\xff\xd8\xff\xe0" + bytes(100)
        host.default = streamed(jpeg)
        with pytest.raises(DownloadError, match="cut short"):
            await client.download_image(presigned())
        host.default = streamed(jpeg + b"\xff\xd9")
        assert await client.download_image(presigned()) == jpeg + b"\xff\xd9"
        host.default = streamed(b"unknown format")  # nothing to check: taken as it is
        assert await client.download_image(presigned()) == b"unknown format"


async def test_non_ascii_prefixes_do_not_overwrite_each_other(tmp_path: Path) -> None:
    """Regression: 猫 and 犬 were both sanitized to task-0.png, the second overwrote the first."""
    host = ImageHost(lambda request: httpx.Response(200, content=request.url.path.encode()))
    async with client_for(host) as client:
        cat = await client.save_images(
            result_with(Image(image_url=presigned("/cat.png"))), tmp_path, prefix="猫"
        )
        dog = await client.save_images(
            result_with(Image(image_url=presigned("/dog.png"))), tmp_path, prefix="犬"
        )
    assert cat[0] != dog[0]
    assert cat[0].read_bytes() == b"/cat.png"
    assert dog[0].read_bytes() == b"/dog.png"
    assert cat[0].name == f"task-{sha8('猫')}-0.png"  # the suffix from the URL
    assert image_filename("t", 0, Image(image_url="u"), prefix="run-1") == "run-1-0.bin"  # safe


async def test_stale_part_files_are_cleaned_on_the_next_save(tmp_path: Path) -> None:
    """Regression: ``.part`` files left by a kill -9 stayed in the folder for ever."""
    old = time.time() - 3600
    stale = tmp_path / ".image-0.png.0123abcd.part"
    fresh = tmp_path / ".image-1.png.89abcdef.part"  # maybe another live process's
    foreign = tmp_path / ".notes.part"  # not our naming pattern
    for path in (stale, fresh, foreign):
        path.write_bytes(b"partial")
    os.utime(stale, (old, old))
    os.utime(foreign, (old, old))
    host = ImageHost()
    async with client_for(host) as client:
        await client.save_image(presigned(), tmp_path / "new.png")
    assert names_in(tmp_path) == [".image-1.png.89abcdef.part", ".notes.part", "new.png"]


async def _saves_beside_a_slow_download(slow: Path, folder: Path, others: list[Path]) -> bytes:
    """Save ``slow`` from a body that stalls after its first chunk; meanwhile, with that
    part file's mtime an hour old and the folder's last cleanup long past, save each of
    ``others``. Returns the slow body (the slow save must still complete)."""
    release = anyio.Event()
    body = PNG * 200  # over one 256 KiB chunk: one write, then the stream stalls

    async def slow_body() -> AsyncIterator[bytes]:
        yield body[: len(body) // 2]
        await release.wait()
        yield body[len(body) // 2 :]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("slow.png"):
            return httpx.Response(200, content=slow_body())
        return httpx.Response(200, content=PNG)

    saved: list[Path] = []

    async def slow_save(client: AsyncNovita) -> None:
        saved.append(await client.save_image(presigned("/slow.png"), slow))

    with anyio.fail_after(10):
        async with client_for(ImageHost(handler)) as client, anyio.create_task_group() as tg:
            tg.start_soon(slow_save, client)
            parts: list[anyio.Path] = []
            while not parts or (await parts[0].stat()).st_size == 0:  # one chunk written
                await anyio.sleep(0.01)
                parts = [p async for p in anyio.Path(folder).iterdir() if p.suffix == ".part"]
            (part,) = parts
            for other in others:
                old = time.time() - 3600  # no write for an hour, as far as its mtime says
                os.utime(part, (old, old))
                _download._cleaned.clear()  # the folder's last cleanup is long past
                await client.save_image(presigned(), other)
            release.set()
    assert saved == [slow]
    return body


async def test_a_slow_live_download_is_not_cleaned_away_by_a_save_beside_it(
    tmp_path: Path,
) -> None:
    """A body arriving slower than one chunk per ``STALE_PART_AGE`` leaves its part file
    untouched that long: a save into the same folder must not take it for a dead
    process's and delete it (the slow save then failed at its rename)."""
    slow = tmp_path / "slow.png"
    body = await _saves_beside_a_slow_download(slow, tmp_path, [tmp_path / "other.png"])
    assert slow.read_bytes() == body
    assert names_in(tmp_path) == ["other.png", "slow.png"]


async def test_a_live_download_is_not_cleaned_away_through_another_spelling_of_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a live part file was known by the path spelled by its own save
    (``out/slow.png``, relative); a save into the same folder spelled otherwise
    (absolute, or through a symlink) took it for a dead process's and deleted it, and
    the slow save failed at its rename."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "link").symlink_to(out)
    others = [out / "a.png", tmp_path / "link" / "b.png"]
    body = await _saves_beside_a_slow_download(Path("out/slow.png"), out, others)
    assert (out / "slow.png").read_bytes() == body
    assert names_in(out) == ["a.png", "b.png", "slow.png"]


async def test_user_client_cookies_are_not_sent_on_redirects() -> None:
    """Regression: httpx re-added the user's cookie jar on every redirect hop."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "redirector.test":
            return httpx.Response(302, headers={"location": presigned()})
        return httpx.Response(200, content=PNG)

    http = httpx.AsyncClient(
        transport=httpx.MockTransport(handler),
        cookies={"session": "user-secret"},
        headers={"Authorization": "Bearer secret-key"},
    )
    async with http, AsyncNovita("secret-key", http_client=http) as client:
        assert await client.download_image("https://redirector.test/img.png") == PNG
    assert [r.url.host for r in seen] == ["redirector.test", httpx.URL(IMAGES).host]
    for request in seen:
        assert "cookie" not in request.headers
        assert "authorization" not in request.headers
        assert "user-secret" not in str(request.headers)
        assert request.headers["user-agent"].startswith("novita-async/")
