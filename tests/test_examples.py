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

    def __init__(self, emu: NovitaEmulator) -> None:
        self.emu = emu
        self.clients: list[AsyncNovita] = []

    def __call__(self) -> AsyncNovita:
        client = self.emu.client()
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
    factory = Factory(emu)
    app = module.create_app(client_factory=factory)
    async with app.router.lifespan_context(app):
        assert len(factory.clients) == 1  # ONE client for the whole app
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            response = await http.post("/generate", json={"prompts": PROMPTS})
            assert response.status_code == 200, response.text
            items = response.json()["items"]
            check_items(items)

            response = await http.post("/generate", json={"prompts": ["b"], "width": 5000})
            assert response.status_code == 422
            assert "width" in response.text
            response = await http.post("/generate", json={"prompts": []})
            assert response.status_code == 422

            task_id = items[0]["task_id"]
            event = json.dumps(emu.webhook_event(task_id))
            first = await http.post("/webhooks/novita", content=event)
            again = await http.post("/webhooks/novita", content=event)
            garbage = await http.post("/webhooks/novita", content=b"{nope")
            forged = emu.webhook_event(task_id)
            forged["payload"]["task"]["task_id"] = "00000000-0000-4000-8000-000000000000"
            rejected = await http.post("/webhooks/novita", json=forged)
            other = await http.post("/webhooks/novita", json={"event_type": "PING"})
        assert first.json() == {"status": "accepted", "task_id": task_id}
        assert again.json() == {"status": "ignored"}
        assert garbage.status_code == 400
        assert rejected.status_code == 400
        assert other.json() == {"status": "ignored"}
        assert app.state.received == {task_id: "SUCCEED"}
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


@pytest.mark.asyncio
async def test_aiohttp_app_fans_out_and_receives_webhooks() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    module = load("aiohttp_app")
    emu = NovitaEmulator(durations=(0.01, 0.05))
    factory = Factory(emu)
    app = module.create_app(client_factory=factory)
    async with TestClient(TestServer(app, host="127.0.0.1")) as http:
        assert len(factory.clients) == 1
        response = await http.post("/generate", json={"prompts": PROMPTS})
        assert response.status == 200, await response.text()
        items = (await response.json())["items"]
        check_items(items)

        bad = await http.post("/generate", json={"prompts": "not a list"})
        assert bad.status == 400
        bad = await http.post("/generate", data=b"{nope")
        assert bad.status == 400

        task_id = items[2]["task_id"]
        event = json.dumps(emu.webhook_event(task_id))
        first = await http.post("/webhooks/novita", data=event)
        again = await http.post("/webhooks/novita", data=event)
        garbage = await http.post("/webhooks/novita", data=b"[]")
        assert await first.json() == {"status": "accepted", "task_id": task_id}
        assert await again.json() == {"status": "ignored"}
        assert garbage.status == 400
        assert app[module.RECEIVED] == {task_id: "SUCCEED"}
    assert factory.clients[0].is_closed
    assert emu.image_auth_headers == 0
