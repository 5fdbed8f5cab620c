"""The default transport: httpx-aiohttp on asyncio, httpx's pool in shards on trio, over real
loopback sockets; and the money rule on it (a server that hangs up after reading a POST
is an uncertain submission, never a retry, whatever httpx-aiohttp maps the error to)."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import httpx
import pytest

from novita_async import (
    AsyncNovita,
    RetryPolicy,
    SubmissionUncertainError,
    TaskStatus,
    Txt2ImgRequest,
)
from novita_async._pool import ShardedPool
from novita_async.testing import NovitaEmulator

pytestmark = pytest.mark.anyio

REQUEST = Txt2ImgRequest(model_name="emulated.safetensors", prompt="a loopback cat")


async def test_default_transport_per_backend(anyio_backend: str) -> None:
    emu = NovitaEmulator(durations=0.02)
    async with emu.serve() as server, emu.client(base_url=server.base_url, transport=None) as c:
        result = await c.txt2img(REQUEST, timeout=10)
        name = c.transport_name
    assert result.status is TaskStatus.SUCCEED
    assert name == ("httpx-aiohttp" if anyio_backend == "asyncio" else "httpx-shards")


async def test_entering_the_client_makes_its_pool_before_any_request(anyio_backend: str) -> None:
    """The first request does not wait for the pool (on asyncio, aiohttp's import): it is
    made on entering the client, and closed with it."""
    emu = NovitaEmulator(durations=0.02)
    client = emu.client(base_url="http://127.0.0.1:9", transport=None)
    assert client.transport_name == "not chosen yet"
    async with client:
        assert client.transport_name == (
            "httpx-aiohttp" if anyio_backend == "asyncio" else "httpx-shards"
        )
        assert not client._transport.http.is_closed
        assert emu.submissions == 0
    assert client._transport.http.is_closed


async def test_a_hang_up_after_the_post_is_uncertain_on_the_default_transport() -> None:
    emu = NovitaEmulator(durations=0.02)
    emu.fail_next("txt2img", reset=True, after_create=True)  # created, then hung up
    policy = RetryPolicy(max_retries=3, initial_backoff=0.0, max_backoff=0.0)
    async with (
        emu.serve() as server,
        emu.client(base_url=server.base_url, transport=None, retry_policy=policy) as client,
    ):
        with pytest.raises(SubmissionUncertainError):
            await client.submit_txt2img(REQUEST)
        await anyio.sleep(0.05)
    assert emu.submissions == 1  # sent once: no second paid task
    assert emu.tasks_created == 1


async def test_a_refused_connection_is_retried_on_the_default_transport() -> None:
    emu = NovitaEmulator(durations=0.02)
    policy = RetryPolicy(max_retries=1, initial_backoff=0.0, max_backoff=0.0)
    with anyio.fail_after(10):
        async with emu.client(
            base_url="http://127.0.0.1:9", transport=None, retry_policy=policy
        ) as client:
            from novita_async import APIConnectionError

            with pytest.raises(APIConnectionError) as caught:
                await client.submit_txt2img(REQUEST)
    assert not isinstance(caught.value, SubmissionUncertainError)


async def test_the_default_transport_keeps_max_connections_in_flight(anyio_backend: str) -> None:
    """Both backends' defaults take as many requests in flight as there are connections
    (64): httpx-aiohttp on asyncio, and on trio httpx's pool in shards of 8 connections,
    which costs what one pool of 24 did (httpcore's bookkeeping grows with what one pool
    holds). No request ever waits inside a shard: the busiest holds at most 8."""
    emu = NovitaEmulator(durations=0.02, latency=0.05)
    cap = busiest = 0

    async with emu.serve() as server, emu.client(base_url=server.base_url, transport=None) as c:

        async def submit() -> None:
            nonlocal cap, busiest
            pool = c._transport._direct  # made at the first request
            if isinstance(pool, ShardedPool):
                busiest = max(busiest, *pool.load)
            await c.submit_txt2img(REQUEST)
            slots = c._transport._in_flight
            assert slots is not None
            cap = max(cap, slots.max_value or 0)

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(submit)
                await anyio.lowlevel.checkpoint()  # each POST leaves before the next
    assert emu.submissions == 100
    assert cap == 64
    pool = c._transport._direct
    if anyio_backend == "trio":
        assert isinstance(pool, ShardedPool)
        assert 4 <= busiest <= 8  # loaded, never past a shard's connections
        assert pool.load == [0] * 8  # every request left its shard


async def test_a_shard_counts_a_request_until_its_answer_is_closed() -> None:
    """The load that picks a shard is right after failures, cancellations and answers
    read or closed unread; the next request goes to the least loaded shard."""
    emu = NovitaEmulator(durations=0.02, latency=0.2)
    pool = ShardedPool(max_connections=3, shard_connections=1)
    assert repr(pool) == "<ShardedPool shards=3 connections=1>"
    async with emu.serve() as server, httpx.AsyncClient(transport=pool) as http:
        url = f"{server.base_url}/v3/async/task-result?task_id=nope"
        answers: list[httpx.Response] = []

        async def get() -> None:
            answers.append(await http.send(http.build_request("GET", url), stream=True))

        async with anyio.create_task_group() as tg:
            tg.start_soon(get)
            tg.start_soon(get)
        assert sorted(pool.load) == [0, 1, 1]  # open answers keep their shard
        await answers[0].aread()  # read to the end: closed
        await answers[1].aclose()  # closed unread
        assert pool.load == [0, 0, 0]
        with anyio.move_on_after(0.05):  # cancelled while waiting for the answer
            await http.get(url)
        assert pool.load == [0, 0, 0]
        with pytest.raises(httpx.ConnectError):  # refused
            await http.get("http://127.0.0.1:9/")
        assert pool.load == [0, 0, 0]


async def test_proxies_set_in_the_environment_are_used(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``HTTP_PROXY`` set (here to a closed loopback port) every request goes to
    the proxy, on both backends; without it, straight to the API (httpx-aiohttp on
    asyncio, httpx's pool in shards on trio)."""
    from novita_async import APIConnectionError

    emu = NovitaEmulator(durations=0.02)
    policy = RetryPolicy(max_retries=0)
    async with emu.serve() as server:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
            for variable in (name, name.lower()):
                monkeypatch.delenv(variable, raising=False)
        async with emu.client(base_url=server.base_url, transport=None) as client:
            await client.submit_txt2img(REQUEST)
            assert client.transport_name != "not chosen yet"
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        with anyio.fail_after(10):
            async with emu.client(
                base_url=server.base_url, transport=None, retry_policy=policy
            ) as client:
                with pytest.raises(APIConnectionError):
                    await client.submit_txt2img(REQUEST)
                assert client.transport_name == "httpx"
    assert emu.submissions == 1


@pytest.mark.parametrize(
    "environment",
    [
        {"NO_PROXY": "localhost,127.0.0.1"},
        {"FTP_PROXY": "http://127.0.0.1:9"},
        {"HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "*"},  # httpx ignores every proxy
    ],
    ids=["NO_PROXY", "FTP_PROXY", "NO_PROXY=*"],
)
async def test_no_http_proxy_in_the_environment_keeps_the_default_transport(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]
) -> None:
    """Only HTTP_PROXY, HTTPS_PROXY or ALL_PROXY (what httpx uses), without ``NO_PROXY=*``,
    switch to httpx's pool. ``NO_PROXY`` alone (common in containers) or an ``FTP_PROXY``
    used to: the default transport was lost and at most 24 requests were in flight."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "FTP_PROXY"):
        for variable in (name, name.lower()):
            monkeypatch.delenv(variable, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    emu = NovitaEmulator(durations=0.02)
    with anyio.fail_after(10):
        async with (
            emu.serve() as server,
            emu.client(base_url=server.base_url, transport=None) as client,
        ):
            await client.submit_txt2img(REQUEST)
            name = client.transport_name
            cap = client._transport._in_flight_cap()
    assert name == ("httpx-aiohttp" if anyio_backend == "asyncio" else "httpx-shards")
    assert cap == client.max_connections
    assert emu.submissions == 1  # straight to the API


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_a_base_url_with_a_port_out_of_range_is_refused_at_once(port: str) -> None:
    """It used to be accepted; on asyncio every POST then failed before connecting, and
    was reported 'outcome unknown, a task may have been billed'."""
    from novita_async import AsyncNovita

    with pytest.raises(ValueError, match="base_url"):
        AsyncNovita("key", base_url=f"http://127.0.0.1:{port}")


async def test_a_url_aiohttp_refuses_before_connecting_is_never_sent() -> None:
    """httpx-aiohttp maps aiohttp's InvalidURL (raised before any connection) to
    UnsupportedProtocol: that POST certainly created no task (retried, then a plain
    APIConnectionError), not an uncertain one."""
    import aiohttp

    from novita_async import APIConnectionError

    sent = 0

    class Refusing(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            nonlocal sent
            sent += 1
            cause = aiohttp.InvalidURL(str(request.url))  # InvalidUrlClientError in 3.10+
            raise httpx.UnsupportedProtocol(str(cause)) from cause

    policy = RetryPolicy(max_retries=2, initial_backoff=0.0, max_backoff=0.0)
    emu = NovitaEmulator(durations=0.02)
    with anyio.fail_after(10):
        async with emu.client(transport=Refusing(), retry_policy=policy) as client:
            with pytest.raises(APIConnectionError) as caught:
                await client.submit_txt2img(REQUEST)
    assert not isinstance(caught.value, SubmissionUncertainError)
    assert sent == 3


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # httpx-aiohttp: asyncio's default
async def test_no_cookie_a_host_sets_is_ever_sent_back_on_the_default_transport() -> None:
    """The library keeps no cookies (its httpx client bypasses httpx's jar): aiohttp's own
    jar, below httpx, must not keep them either, or one host's cookie would go to every
    host of its domain (the API's to an image host of the same domain, too)."""
    from aiohttp import web

    seen: list[str | None] = []

    async def txt2img(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.json_response({"task_id": f"t{len(seen)}"})
        response.set_cookie("sticky", "lb-1", path="/")
        return response

    app = web.Application()
    app.router.add_post("/v3/async/txt2img", txt2img)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        with anyio.fail_after(10):
            # "localhost": aiohttp's jar refuses cookies of IP hosts, not of names
            async with AsyncNovita("key", base_url=f"http://localhost:{port}") as client:
                assert client.transport_name == "httpx-aiohttp"
                for _ in range(3):
                    await client.submit_txt2img(REQUEST)
    finally:
        await runner.cleanup()
    assert seen == [None, None, None]
