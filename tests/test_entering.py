"""Entering the client where frameworks let users: test fixtures (pytest-asyncio, whose
fixture setup and teardown may run in different tasks, and anyio's plugin), and what a
client that was never entered does. FastAPI's lifespan and aiohttp's cleanup_ctx are
exercised by tests/test_examples.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import pytest
import pytest_asyncio
from _support import until

from novita_async import AsyncNovita, NovitaError, TaskStatus, Txt2ImgRequest
from novita_async.testing import NovitaEmulator

REQUEST = Txt2ImgRequest(model_name="emulated.safetensors", prompt="a fixture cat")


@pytest_asyncio.fixture
async def asyncio_client() -> AsyncIterator[AsyncNovita]:
    emu = NovitaEmulator(durations=0.02)
    async with emu.client() as client:
        yield client


@pytest.mark.asyncio  # asyncio only: pytest-asyncio's fixture (trio users have anyio's, below)
async def test_pytest_asyncio_fixture_yields_an_entered_client(
    asyncio_client: AsyncNovita,
) -> None:
    client = asyncio_client
    result = await client.txt2img(REQUEST, timeout=10)
    assert result.status is TaskStatus.SUCCEED
    items = [item async for item in client.txt2img_many([REQUEST] * 3)]
    assert all(item.ok for item in items)


@pytest.fixture
async def anyio_client(anyio_backend: str) -> AsyncIterator[AsyncNovita]:
    emu = NovitaEmulator(durations=0.02)
    async with emu.client() as client:
        yield client


@pytest.mark.anyio
async def test_anyio_fixture_yields_an_entered_client(anyio_client: AsyncNovita) -> None:
    result = await anyio_client.txt2img(REQUEST, timeout=10)
    assert result.status is TaskStatus.SUCCEED
    assert not anyio_client.is_closed


@pytest.mark.asyncio  # asyncio only: asyncio.create_task, which a trio nursery forbids
async def test_setup_and_teardown_in_different_tasks() -> None:
    """What pytest-asyncio and aiohttp may do on asyncio: enter in one task, leave in
    another (trio frameworks enter and leave in one task, as a trio nursery needs)."""
    emu = NovitaEmulator(durations=0.02)
    client = emu.client()
    await asyncio.create_task(client.__aenter__())
    result = await asyncio.create_task(client.txt2img(REQUEST, timeout=10))
    assert result.status is TaskStatus.SUCCEED
    await asyncio.create_task(client.aclose())
    assert client.is_closed


@pytest.mark.anyio
async def test_a_client_never_entered_says_how_to_enter_it() -> None:
    emu = NovitaEmulator(durations=0.02)
    client = emu.client()
    for call in (client.wait("t"), client.txt2img(REQUEST)):
        with pytest.raises(RuntimeError, match=r"async with AsyncNovita\(\).*lifespan"):
            await call
    with pytest.raises(RuntimeError, match="lifespan"):
        client.txt2img_many([REQUEST])
    task_id = await client.submit_txt2img(REQUEST)  # no background work needed
    assert (await client.get_task_result(task_id)).task_id == task_id
    await client.aclose()


@pytest.mark.anyio
async def test_closing_ends_pending_waits_and_refuses_new_ones() -> None:
    emu = NovitaEmulator(durations=30.0)
    client = emu.client()
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        await client.__aenter__()

        async def waiter() -> None:
            try:
                await client.txt2img(REQUEST)
            except NovitaError as exc:
                errors.append(exc)

        tg.start_soon(waiter)
        await until(lambda: bool(emu.tasks), timeout=5)
        await client.aclose()
    assert len(errors) == 1
    assert "closed" in str(errors[0])
    with pytest.raises(RuntimeError, match="closed"):
        await client.submit_txt2img(REQUEST)
    with pytest.raises(RuntimeError, match=r"once|closed"):
        await client.__aenter__()


@pytest.mark.anyio
async def test_a_cancelled_enter_leaves_nothing_running() -> None:
    """A deadline or a shutdown that cancels ``async with AsyncNovita()`` while it enters:
    no scheduler left running in a host task (asyncio), no nursery left open in the
    caller's task (trio: "Cancel scope stack corrupted"); the client is closed."""
    emu = NovitaEmulator(durations=0.02)
    client = emu.client()
    with anyio.fail_after(5):
        with anyio.CancelScope() as scope:
            scope.cancel()
            async with client:
                pytest.fail("entered a cancelled scope")
        assert scope.cancelled_caught
        await anyio.sleep(0.05)
        assert not client.scheduler.running
        assert client.is_closed
        with pytest.raises(RuntimeError, match="closed"):
            await client.__aenter__()


@pytest.mark.anyio
async def test_a_run_made_in_the_block_and_iterated_after_it_says_the_client_closed() -> None:
    emu = NovitaEmulator(durations=0.02)
    async with emu.client() as client:
        run = client.txt2img_many([REQUEST])
    with pytest.raises(RuntimeError, match="this AsyncNovita client is closed"):
        async for _ in run:
            pass
    assert not emu.tasks


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_on_trio_closing_from_another_task_is_a_clear_error(anyio_backend: str) -> None:
    """On trio the client's nursery lives in the task that entered it: leaving it from
    another task corrupted trio's cancel scope stack (the whole run broke). It is refused
    with a message saying how to enter the client; the owner can still close it."""
    emu = NovitaEmulator(durations=0.02)
    client = emu.client()
    await client.__aenter__()
    errors: list[BaseException] = []

    async def close_elsewhere() -> None:
        try:
            await client.aclose()
        except RuntimeError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(close_elsewhere)
    assert len(errors) == 1
    assert "the task that entered it" in str(errors[0])
    assert not client.is_closed
    await client.aclose()
    assert client.is_closed
