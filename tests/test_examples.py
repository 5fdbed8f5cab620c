"""examples/: the FastAPI and aiohttp apps, run against the emulator."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from novita_async import AsyncNovita
from novita_async.testing import IMAGE_BASE_URL, NovitaEmulator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROMPTS = ["a red fox", "a haunted house [fail]", "a green field"]
HOOK = "https://my.app/webhooks/novita"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


class Factory:
    """A client factory that remembers what it made (to check the app closes it)."""

    def __init__(self, emu: NovitaEmulator, **options: Any) -> None:
        self.emu = emu
        self.options = options
        self.clients: list[AsyncNovita] = []

    def __call__(self) -> AsyncNovita:
        client = self.emu.client(**self.options)
        self.clients.append(client)
        return client


def check_items(items: list[dict[str, Any]]) -> None:
    assert [item["index"] for item in items] == [0, 1, 2]
    assert [item["prompt"] for item in items] == PROMPTS
    assert [item["ok"] for item in items] == [True, False, True]
    assert "emulated failure" in items[1]["error"]
    assert items[1]["image_urls"] == []
    for item in (items[0], items[2]):
        assert item["error"] is None
        (url,) = item["image_urls"]
        assert url.startswith(IMAGE_BASE_URL)
        assert item["task_id"] in url


# --------------------------------------------------------------------------- FastAPI


@pytest.mark.anyio
async def test_fastapi_app_fans_out_and_receives_webhooks() -> None:
    module = load("fastapi_app")
    emu = NovitaEmulator(durations=(0.01, 0.05))
    factory = Factory(emu, webhook_url=HOOK)
    app = module.create_app(client_factory=factory)
    async with app.router.lifespan_context(app):
        assert len(factory.clients) == 1  # ONE client for the whole app
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:

            async def deliver(url: str, body: bytes) -> int:
                assert url == HOOK
                return (await http.post("/webhooks/novita", content=body)).status_code

            async with emu.webhooks(deliver=deliver, delay=(0.01, 0.02), duplicate_rate=0.5):
                response = await http.post("/generate", json={"prompts": PROMPTS})
                assert response.status_code == 200, response.text
                items = response.json()["items"]
                check_items(items)
                polls = emu.polls_total

                response = await http.post("/generate", json={"prompts": ["b"], "width": 5000})
                assert response.status_code == 422
                assert "width" in response.text
                response = await http.post("/generate", json={"prompts": []})
                assert response.status_code == 422

                forged = emu.webhook_event(items[0]["task_id"])
                forged["payload"]["task"]["task_id"] = "00000000-0000-4000-8000-000000000000"
                stranger = await http.post("/webhooks/novita", json=forged)
                garbage = await http.post("/webhooks/novita", content=b"{nope")
                other = await http.post("/webhooks/novita", json={"event_type": "PING"})
        assert polls == len(PROMPTS)  # one confirming GET per task, no polling
        assert emu.polls_total == polls  # strangers, garbage and duplicates cost nothing
        for answer in (stranger, garbage, other):
            assert answer.json() == {"status": "ignored"}
        assert app.state.received == {
            item["task_id"]: "SUCCEED" if item["ok"] else "FAILED" for item in items
        }
        assert len(factory.clients) == 1
    assert factory.clients[0].is_closed
    assert emu.image_auth_headers == 0


def test_fastapi_default_client_uses_the_emulator_on_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = load("fastapi_app")
    monkeypatch.setenv("NOVITA_EMULATOR", "1")
    client = module.default_client()
    assert isinstance(client, AsyncNovita)
    assert "emulator" in repr(client)
    monkeypatch.delenv("NOVITA_EMULATOR")
    monkeypatch.delenv("NOVITA_API_KEY", raising=False)
    with pytest.raises(Exception, match="API key"):
        module.default_client()


# --------------------------------------------------------------------------- aiohttp


@pytest.mark.asyncio  # asyncio only: aiohttp runs on asyncio alone
async def test_aiohttp_app_fans_out_and_receives_webhooks() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    module = load("aiohttp_app")
    emu = NovitaEmulator(durations=(0.01, 0.05))
    factory = Factory(emu, webhook_url=HOOK)
    app = module.create_app(client_factory=factory)
    async with TestClient(TestServer(app, host="127.0.0.1")) as http:
        assert len(factory.clients) == 1

        async def deliver(url: str, body: bytes) -> int:
            return (await http.post("/webhooks/novita", data=body)).status

        async with emu.webhooks(deliver=deliver, delay=(0.01, 0.02)):
            response = await http.post("/generate", json={"prompts": PROMPTS})
            assert response.status == 200, await response.text()
            items = (await response.json())["items"]
            check_items(items)
        assert emu.polls_total == len(PROMPTS)  # one confirming GET per task

        bad = await http.post("/generate", json={"prompts": "not a list"})
        assert bad.status == 400
        bad = await http.post("/generate", data=b"{nope")
        assert bad.status == 400

        late = await http.post(
            "/webhooks/novita", data=json.dumps(emu.webhook_event(items[2]["task_id"]))
        )
        garbage = await http.post("/webhooks/novita", data=b"[]")
        assert await late.json() == {"status": "ignored"}  # nobody waits on it any more
        assert await garbage.json() == {"status": "ignored"}
        assert emu.polls_total == len(PROMPTS)
        assert app[module.RECEIVED] == {
            item["task_id"]: "SUCCEED" if item["ok"] else "FAILED" for item in items
        }
    assert factory.clients[0].is_closed
    assert emu.image_auth_headers == 0


# --------------------------------------------------------------------------- Redis: two workers


@pytest.mark.asyncio  # asyncio only: the Redis extra (redis-py's client) is asyncio-only
async def test_redis_fastapi_app_two_workers_share_a_quota_and_relay_webhooks(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two "workers" of examples/redis_fastapi_app.py on one Redis: a delivery reaching
    the worker that does not wait for its task wakes the one that does, with one GET."""
    import anyio

    emu = NovitaEmulator(durations=0.3)
    async with emu.serve() as server:
        monkeypatch.setenv("REDIS_URL", redis_url)
        monkeypatch.setenv("NOVITA_API_KEY", emu.api_key)
        monkeypatch.setenv("NOVITA_BASE_URL", server.base_url)
        monkeypatch.setenv("PUBLIC_URL", "https://my.app")
        module = load("redis_fastapi_app")
        apps = [module.FastAPI(lifespan=module.lifespan, routes=module.app.routes) for _ in "ab"]
        async with (
            apps[0].router.lifespan_context(apps[0]),
            apps[1].router.lifespan_context(apps[1]),
        ):
            a, b = (
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w")
                for app in apps
            )
            async with a, b, anyio.create_task_group() as tg:
                answers: list[Any] = []

                async def generate() -> None:
                    answers.append((await a.post("/generate", json={"prompts": ["x"]})).json())

                tg.start_soon(generate)
                with anyio.fail_after(10):
                    while not emu.tasks:
                        await anyio.sleep(0.01)
                    [task_id] = list(emu.tasks)
                    while emu.result_json(task_id)["task"]["status"] != "TASK_STATUS_SUCCEED":
                        await anyio.sleep(0.01)
                delivered = await b.post(
                    module.WEBHOOK_PATH, content=json.dumps(emu.webhook_event(task_id))
                )
                assert delivered.status_code == 204
    [[item]] = answers
    assert item["task_id"] == task_id
    assert item["error"] is None
    assert emu.polls[task_id] == 1  # confirmed once, by the worker that waited
    assert emu.tasks[task_id].extra["webhook"] == {"url": "https://my.app/webhooks/novita"}


# --------------------------------------------------------------------------- Redis: arq jobs


class _Retry(Exception):
    def __init__(self, defer: float | None = None) -> None:
        super().__init__(defer)
        self.defer = defer


def load_arq_example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """examples/redis_arq_batch.py with a stand-in for arq (not installed here): its jobs are
    plain coroutines; what arq adds (running them again) is what the test does by hand."""
    arq = ModuleType("arq")
    connections = ModuleType("arq.connections")
    arq.Retry = _Retry  # type: ignore[attr-defined]
    arq.create_pool = None  # type: ignore[attr-defined]

    class RedisSettings:
        @classmethod
        def from_dsn(cls, dsn: str) -> RedisSettings:
            return cls()

    connections.RedisSettings = RedisSettings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "arq", arq)
    monkeypatch.setitem(sys.modules, "arq.connections", connections)
    return load("redis_arq_batch")


@pytest.mark.asyncio  # asyncio only: the Redis extra (redis-py's client) is asyncio-only
async def test_redis_arq_job_runs_again_without_paying_twice_and_retries_an_unsent_prompt(
    redis_url: str, redis_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job run twice pays once (the second run answers from its journal); a job whose POST
    could not reach the API (nothing sent) asks arq to retry, and the retry sends it (it
    used to leave the prompt 'submitting', reported uncertain by every later run)."""
    import anyio
    import redis.asyncio as aioredis

    module = load_arq_example(monkeypatch)
    emu = NovitaEmulator(durations=0.05)
    monkeypatch.setenv("NOVITA_API_KEY", emu.api_key)

    async def job(base_url: str, index: int, prompt: str) -> dict[str, Any]:
        monkeypatch.setenv("NOVITA_BASE_URL", base_url)
        ctx: dict[str, Any] = {"redis": aioredis.from_url(redis_url)}
        await module.startup(ctx)
        try:
            return await module.generate(ctx, redis_key, index, prompt)  # type: ignore[no-any-return]
        finally:
            await module.shutdown(ctx)
            await ctx["redis"].aclose()

    with anyio.fail_after(30):
        async with emu.serve() as server:
            first = await job(server.base_url, 0, "a red fox")
            again = await job(server.base_url, 0, "a red fox")
            assert first["state"] == again["state"] == "succeeded"
            assert first["task_id"] == again["task_id"]
            assert emu.tasks_created == 1
            with pytest.raises(_Retry) as retry:
                await job("http://127.0.0.1:9", 1, "a lighthouse")  # nothing listens there
            assert retry.value.defer == 10
            second = await job(server.base_url, 1, "a lighthouse")
    assert second["state"] == "succeeded"
    assert emu.tasks_created == 2
