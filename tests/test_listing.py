"""``client.list_models``: filter names, cursor pagination, limits and loop protection."""

from __future__ import annotations

import json
from typing import Any

import attrs
import httpx
import pytest

from novita_async import AsyncNovita, InvalidRequestError, Model, RetryPolicy
from novita_async.testing import NovitaEmulator, default_models

pytestmark = pytest.mark.anyio

# The documented example response (D-MODEL), verbatim apart from layout.
DOC_PAGE = {
    "models": [
        {
            "id": 114600,
            "name": "V4.0-inpainting (VAE)",
            "hash_sha256": "1A805277C8",
            "sd_name": "realisticVisionV40_v40VAE-inpainting_81543.safetensors",
            "type": {"name": "checkpoint", "display_name": "Checkpoint"},
            "categories": [],
            "status": 1,
            "tags": ["photorealistic", "anatomical", "base model", "cgi"],
            "cover_url": "https://next-app-static.s3.amazonaws.com/images-prod/x/1495044.jpeg",
            "base_model": "SD 1.5",
            "base_model_type": "Inpainting",
            "download_url_ttl": 2592000,
            "sd_name_in_api": "realisticVisionV40_v40VAE-inpainting_81543.safetensors",
            "is_sdxl": False,
        },
        {
            "id": 55199,
            "name": "beta2",
            "hash_sha256": "BA43B0EFEE",
            "sd_name": "GoodHands-beta2_39807.safetensors",
            "type": {"name": "locon", "display_name": "locon"},
            "categories": [],
            "status": 1,
            "tags": ["photorealistic", "concept", "hands"],
            "cover_url": "https://next-app-static.s3.amazonaws.com/images-prod/x/599083.jpeg",
            "base_model": "SD 1.5",
            "base_model_type": "Standard",
            "download_url_ttl": 2592000,
            "sd_name_in_api": "GoodHands-beta2_39807",
            "is_sdxl": False,
        },
    ],
    "pagination": {"next_cursor": "c_WzgwNDY2NiwiNTUxOTkiXQ=="},
}


def model_json(i: int) -> dict[str, Any]:
    return {"id": i, "name": f"model {i}", "sd_name": f"m{i}.safetensors", "status": 1}


class ModelAPI:
    """Keyset pagination over ``count`` models; cursors are opaque, URL-hostile strings."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.requests: list[httpx.QueryParams] = []
        self.cursor_override: str | None = None

    @staticmethod
    def cursor_for(offset: int) -> str:
        return f"c_{offset}+/=?&#"  # must round-trip verbatim

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v3/model"
        assert request.headers["authorization"] == "Bearer key"
        params = request.url.params
        self.requests.append(params)
        cursor = params.get("pagination.cursor", "")
        offset = 0
        if cursor:
            assert cursor.startswith("c_"), cursor
            assert cursor.endswith("+/=?&#"), cursor
            offset = int(cursor[2:-6])
        size = int(params.get("pagination.limit", "10"))
        assert 0 < size <= 100
        models = [model_json(i) for i in range(offset, min(offset + size, self.count))]
        following = offset + len(models)
        next_cursor = self.cursor_for(following) if following < self.count else ""
        if self.cursor_override is not None:
            next_cursor = self.cursor_override
        body = {"models": models, "pagination": {"next_cursor": next_cursor}}
        return httpx.Response(200, json=body)


def client_for(handler: Any) -> AsyncNovita:
    return AsyncNovita(
        "key",
        transport=httpx.MockTransport(handler),
        retry_policy=RetryPolicy(max_retries=2, initial_backoff=0.0, max_backoff=0.0),
    )


async def collect(client: AsyncNovita, **kwargs: Any) -> list[Model]:
    return [model async for model in client.list_models(**kwargs)]


async def test_follows_next_cursor_verbatim_across_pages() -> None:
    api = ModelAPI(count=7)
    async with client_for(api) as client:
        models = await collect(client, page_size=3)
    assert [m.id for m in models] == list(range(7))
    assert len(api.requests) == 3
    assert "pagination.cursor" not in api.requests[0]  # the first page starts empty
    assert api.requests[1]["pagination.cursor"] == ModelAPI.cursor_for(3)
    assert api.requests[2]["pagination.cursor"] == ModelAPI.cursor_for(6)
    assert all(r["pagination.limit"] == "3" for r in api.requests)


async def test_filters_use_the_documented_parameter_names() -> None:
    api = ModelAPI(count=1)
    async with client_for(api) as client:
        await collect(
            client,
            visibility="public",
            types="checkpoint",
            source="civitai",
            is_sdxl=True,
            is_inpainting=False,
            query="realistic vision",
        )
    (params,) = api.requests
    assert params["filter.visibility"] == "public"
    assert params.get_list("filter.types") == ["checkpoint"]
    assert "filter.type" not in params  # the official SDK's misspelling
    assert params["filter.source"] == "civitai"
    assert params["filter.is_sdxl"] == "true"
    assert params["filter.is_inpainting"] == "false"
    assert params["filter.query"] == "realistic vision"
    assert params["pagination.limit"] == "100"


async def test_unset_filters_are_omitted_and_several_types_repeat() -> None:
    api = ModelAPI(count=1)
    async with client_for(api) as client:
        await collect(client, types=["lora", "vae"])
        await collect(client)
    assert api.requests[0].get_list("filter.types") == ["lora", "vae"]
    assert sorted(api.requests[1].keys()) == ["pagination.limit"]


async def test_limit_caps_the_models_and_shrinks_the_last_page() -> None:
    api = ModelAPI(count=50)
    async with client_for(api) as client:
        models = await collect(client, limit=5, page_size=2)
    assert [m.id for m in models] == [0, 1, 2, 3, 4]
    assert [r["pagination.limit"] for r in api.requests] == ["2", "2", "1"]


async def test_limit_zero_sends_nothing() -> None:
    api = ModelAPI(count=5)
    async with client_for(api) as client:
        assert await collect(client, limit=0) == []
    assert api.requests == []


async def test_stops_on_a_repeated_cursor() -> None:
    api = ModelAPI(count=1000)
    api.cursor_override = "c_5+/=?&#"  # a buggy server: always the same next cursor
    async with client_for(api) as client:
        models = await collect(client, page_size=5)
    assert len(api.requests) == 2  # first page, then the cursor once; never again
    assert [m.id for m in models] == list(range(10))


async def test_stops_on_an_empty_page_even_with_a_cursor() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, json={"models": [], "pagination": {"next_cursor": "c_1"}})

    async with client_for(handler) as client:
        assert await collect(client) == []
    assert len(calls) == 1


async def test_missing_pagination_ends_the_listing() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"models": [model_json(1)]})

    async with client_for(handler) as client:
        assert [m.id for m in await collect(client)] == [1]


async def test_the_documented_example_parses_into_frozen_models() -> None:
    pages = [DOC_PAGE, {"models": [], "pagination": {"next_cursor": ""}}]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=json.dumps(pages.pop(0)))

    async with client_for(handler) as client:
        models = await collect(client)
    first, second = models
    assert first.id == 114600
    assert first.type.name == "checkpoint"
    assert first.base_model_type == "Inpainting"
    assert first.download_url_ttl == 2592000
    assert first.is_sdxl is False
    assert first.is_available
    assert second.type.name == "locon"  # outside the filter enum: kept as a str
    assert second.sd_name_in_api == "GoodHands-beta2_39807"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        first.name = "changed"  # type: ignore[misc]


async def test_a_5xx_page_is_retried() -> None:
    api = ModelAPI(count=3)
    answers = [httpx.Response(503)]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0) if answers else api(request)

    async with client_for(handler) as client:
        assert len(await collect(client)) == 3


async def test_breaking_out_early_is_safe() -> None:
    api = ModelAPI(count=100)
    async with client_for(api) as client:
        models = client.list_models(page_size=10)
        seen = []
        async for model in models:
            seen.append(model.id)
            if len(seen) == 3:
                break
        await models.aclose()  # type: ignore[attr-defined]
        assert [m async for m in models] == []
    assert seen == [0, 1, 2]
    assert len(api.requests) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"page_size": 0},
        {"page_size": 101},
        {"page_size": True},
        {"limit": -1},
        {"limit": 1.5},
        {"types": []},
        {"types": [""]},
        {"is_sdxl": "yes"},
        {"visibility": ""},
    ],
)
async def test_bad_arguments_raise_before_any_request(kwargs: dict[str, Any]) -> None:
    api = ModelAPI(count=1)
    async with client_for(api) as client:
        with pytest.raises(InvalidRequestError):
            client.list_models(**kwargs)  # raised eagerly, not on first iteration
    assert api.requests == []


async def test_breaking_without_aclose_is_safe_too() -> None:
    api = ModelAPI(count=100)
    async with client_for(api) as client:
        async for model in client.list_models(page_size=10):
            if model.id == 2:
                break
    assert len(api.requests) == 1


# --------------------------------------------------------------------------- against the emulator


def catalogue(**match: Any) -> set[int]:
    """Ids of the built-in catalogue's models that match ``match`` (default filters)."""
    ids = set()
    for model in default_models():
        if model["base_model_type"] == "Inpainting":  # excluded unless is_inpainting=True
            continue
        if all(model.get(key) == value for key, value in match.items()):
            ids.add(model["id"])
    return ids


async def test_emulator_every_model_across_pages() -> None:
    emu = NovitaEmulator()
    async with emu.client() as client:
        models = await collect(client, page_size=7)
    expected = catalogue()
    assert len(expected) > 14  # really several pages
    ids = [m.id for m in models]
    assert len(ids) == len(set(ids))  # no model twice
    assert set(ids) == expected
    assert emu.model_requests == -(-len(expected) // 7)
    assert all(isinstance(m, Model) for m in models)


async def test_emulator_filters_are_understood() -> None:
    emu = NovitaEmulator()
    async with emu.client() as client:
        sdxl_checkpoints = await collect(client, types="checkpoint", is_sdxl=True, page_size=3)
        private = await collect(client, visibility="private")
        loras_and_vaes = await collect(client, types=["lora", "vae"])
        inpainting = await collect(client, is_inpainting=True)
        anime = await collect(client, query="anime", limit=2)
    assert sdxl_checkpoints
    assert all(m.type.name == "checkpoint" and m.is_sdxl for m in sdxl_checkpoints)
    checkpoints = {m["id"] for m in default_models() if m["type"]["name"] == "checkpoint"}
    assert {m.id for m in sdxl_checkpoints} == catalogue(is_sdxl=True) & checkpoints
    assert {m.visibility for m in private} == {"private"}
    assert {m.type.name for m in loras_and_vaes} == {"lora", "vae"}
    assert inpainting
    assert {m.base_model_type for m in inpainting} == {"Inpainting"}
    assert len(anime) == 2
