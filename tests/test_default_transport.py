"""The default transport: httpx-aiohttp on asyncio, httpx's pool on trio, over real
loopback sockets; and the money rule on it (a server that hangs up after reading a POST
is an uncertain submission, never a retry, whatever httpx-aiohttp maps the error to)."""

from __future__ import annotations

import anyio
import pytest

from novita_async import RetryPolicy, SubmissionUncertainError, TaskStatus, Txt2ImgRequest
from novita_async.testing import NovitaEmulator

pytestmark = pytest.mark.anyio

REQUEST = Txt2ImgRequest(model_name="emulated.safetensors", prompt="a loopback cat")


async def test_default_transport_per_backend(anyio_backend: str) -> None:
    emu = NovitaEmulator(durations=0.02)
    async with emu.serve() as server, emu.client(base_url=server.base_url, transport=None) as c:
        result = await c.txt2img(REQUEST, timeout=10)
        name = c.transport_name
    assert result.status is TaskStatus.SUCCEED
    assert name == ("httpx-aiohttp" if anyio_backend == "asyncio" else "httpx")


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


async def test_httpx_pool_default_keeps_few_requests_in_flight(anyio_backend: str) -> None:
    """httpx's own pool costs more CPU per request the more it holds: on trio (where it is
    the default) the client lets at most 24 requests into it, however many calls wait."""
    emu = NovitaEmulator(durations=0.02, latency=0.05)
    most = 0

    async with emu.serve() as server, emu.client(base_url=server.base_url, transport=None) as c:

        async def submit() -> None:
            nonlocal most
            await c.submit_txt2img(REQUEST)
            slots = c._transport._in_flight
            assert slots is not None
            most = max(most, int(slots.total_tokens))

        async with anyio.create_task_group() as tg:
            for _ in range(60):
                tg.start_soon(submit)
    assert emu.submissions == 60
    assert most == (64 if anyio_backend == "asyncio" else 24)


async def test_proxies_set_in_the_environment_are_used(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``HTTP_PROXY`` set (here to a closed loopback port) every request goes to
    the proxy, on both backends; without it, straight to the API (httpx-aiohttp on
    asyncio, httpx's pool on trio)."""
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
