"""Image downloads: no credentials to the image host, status/expiry handling, atomic saves."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

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
)
from novita_async._download import image_filename, safe_name
from novita_async.testing import ManualClock, NovitaEmulator

pytestmark = pytest.mark.anyio

API = "https://api.novita.ai"
IMAGES = "https://faas-output-image.s3.ap-southeast-1.amazonaws.com"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
FAST_RETRY = RetryPolicy(max_retries=2, initial_backoff=0.0, max_backoff=0.0)

Handler = Callable[[httpx.Request], Any]


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
    assert names == [
        "evil_task_id-0.png",
        "evil_task_id-1.jpg",
        "evil_task_id-2.webp",
        "evil_task_id-3.webp",  # whitelisted suffix from the URL
        "evil_task_id-4.bin",  # never the URL's path itself
        "evil_task_id-5.png",
        "evil_task_id-6.png",
        "evil_task_id-7.png",
        "evil_task_id-8.png",
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
    assert paths[0].name == "fox_._run_1-00.png"
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

MODEL = "sd_xl_base_1.0.safetensors"


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
