"""Webhooks: parsing Novita's deliveries, confirming them via task-result, deduplication."""

from __future__ import annotations

import copy
import json
from typing import Any

import anyio
import httpx
import pytest
from _support import MODEL

from novita_async import (
    AsyncNovita,
    Extra,
    MalformedResponseError,
    NotFoundError,
    RetryPolicy,
    ServerError,
    TaskStatus,
    Txt2ImgRequest,
    Webhook,
    WebhookEvent,
    WebhookVerificationError,
    WebhookVerifier,
    parse_webhook,
)
from novita_async.testing import NovitaEmulator

pytestmark = pytest.mark.anyio

DOC_URL = (
    "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/test_data/image_01.jpeg"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASVPYCN6LRCW3SOUV%2F20240602%2F"
    "ap-southeast-1%2Fs3%2Faws4_request&X-Amz-Date=20240602T150041Z&X-Amz-Expires=3600"
    "&X-Amz-SignedHeaders=host&x-id=GetObject&X-Amz-Signature=f22b3a2f93587e8f7e80ba88842ddf7d"
)
# The documented delivery (D-WH), verbatim apart from layout.
DOC_EVENT: dict[str, Any] = {
    "event_type": "ASYNC_TASK_RESULT",
    "payload": {
        "task": {
            "eta": 0,
            "progress_percent": 0,
            "reason": "",
            "status": "TASK_STATUS_SUCCEED",
            "task_id": "f6aec953-2e81-4e8b-938e-2ceab54d6df9",
            "task_type": "TXT_TO_IMG",
        },
        "extra": {
            "enable_nsfw_detection": False,
            "webhook": {"url": "https://your-webhook-endpoint-url"},
        },
        "images": [
            {
                "image_type": "jpeg",
                "image_url": DOC_URL,
                "image_url_ttl": "3600",
                "nsfw_detection_result": None,
            }
        ],
        "videos": [],
        "audios": [],
    },
}
TASK_ID = "f6aec953-2e81-4e8b-938e-2ceab54d6df9"


def event_for(task_id: str, status: str = "TASK_STATUS_SUCCEED") -> dict[str, Any]:
    event = copy.deepcopy(DOC_EVENT)
    event["payload"]["task"]["task_id"] = task_id
    event["payload"]["task"]["status"] = status
    return event


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("form", ["bytes", "str", "mapping", "bytearray"])
def test_parse_the_documented_delivery(form: str) -> None:
    text = json.dumps(DOC_EVENT)
    body: Any = {
        "bytes": text.encode(),
        "str": text,
        "mapping": DOC_EVENT,
        "bytearray": bytearray(text.encode()),
    }[form]
    event = parse_webhook(body)
    assert isinstance(event, WebhookEvent)
    assert event.event_type == "ASYNC_TASK_RESULT"
    result = event.payload
    assert result is not None
    assert result.task_id == TASK_ID
    assert result.status is TaskStatus.SUCCEED
    assert result.task.task_type == "TXT_TO_IMG"
    (image,) = result.images
    assert image.image_url == DOC_URL
    assert image.image_url_ttl == 3600  # sent as the string "3600"
    assert image.image_type == "jpeg"
    assert image.nsfw_detection_result is None


def test_parse_a_failed_task_delivery() -> None:
    event = event_for("t-1", "TASK_STATUS_FAILED")
    event["payload"]["task"]["reason"] = "NSFW content detected"
    event["payload"]["images"] = []
    result = parse_webhook(event).payload
    assert result is not None
    assert result.status is TaskStatus.FAILED
    assert result.task.reason == "NSFW content detected"
    assert result.images == ()


def test_other_event_types_parse_without_a_payload() -> None:
    event = parse_webhook(b'{"event_type": "SOMETHING_NEW", "payload": {"anything": [1, 2]}}')
    assert event.event_type == "SOMETHING_NEW"
    assert event.payload is None


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe\x00",
        b"[]",
        b'"a string"',
        b'{"event_type": "ASYNC_TASK_RESULT"}',
        b'{"event_type": "ASYNC_TASK_RESULT", "payload": "x"}',
        b'{"event_type": "ASYNC_TASK_RESULT", "payload": {"images": []}}',
    ],
)
def test_garbage_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedResponseError):
        parse_webhook(body)


# --------------------------------------------------------------------------- confirming


class TaskAPI:
    """Fake ``GET /v3/async/task-result`` with per-task answers and request counting."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        self.gate: anyio.Event | None = None
        self.arrived = anyio.Event()
        self.failures = 0

    def finish(self, task_id: str, status: str = "TASK_STATUS_SUCCEED") -> None:
        payload = copy.deepcopy(DOC_EVENT["payload"])
        payload["task"].update(task_id=task_id, status=status)
        payload["images"][0]["image_url"] = f"https://images.example/{task_id}.jpeg"
        del payload["extra"]["webhook"]
        self.tasks[task_id] = payload

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v3/async/task-result"
        task_id = request.url.params["task_id"]
        self.requests.append(task_id)
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            self.failures -= 1
            return httpx.Response(500, json={"code": 500, "reason": "GET_RESULT_FAILED"})
        if task_id not in self.tasks:
            body = {"code": 404, "reason": "TASK_NOT_FOUND", "message": "task not found"}
            return httpx.Response(404, json=body)
        return httpx.Response(200, json=self.tasks[task_id])


def client_for(api: TaskAPI, *, retries: int = 0) -> AsyncNovita:
    return AsyncNovita(
        "key",
        transport=httpx.MockTransport(api),
        retry_policy=RetryPolicy(max_retries=retries, initial_backoff=0.0, max_backoff=0.0),
    )


async def test_confirm_returns_what_the_api_says_not_the_body() -> None:
    api = TaskAPI()
    api.finish(TASK_ID)
    async with client_for(api) as client:
        verifier = WebhookVerifier(client)
        result = await verifier.confirm(json.dumps(DOC_EVENT).encode())
    assert result is not None
    assert result.task_id == TASK_ID
    # the body said DOC_URL; the API's URL wins
    assert result.images[0].image_url == f"https://images.example/{TASK_ID}.jpeg"
    assert api.requests == [TASK_ID]
    assert verifier.confirmations == 1


async def test_a_failed_task_is_confirmed_with_its_status() -> None:
    api = TaskAPI()
    api.finish("t-failed", "TASK_STATUS_FAILED")
    async with client_for(api) as client:
        result = await WebhookVerifier(client).confirm(event_for("t-failed"))
    assert result is not None
    assert result.status is TaskStatus.FAILED


async def test_redeliveries_are_duplicates() -> None:
    api = TaskAPI()
    api.finish("t-1")
    async with client_for(api) as client:
        verifier = WebhookVerifier(client)
        assert await verifier.confirm(event_for("t-1")) is not None
        for _ in range(5):  # Novita retries up to 5 times
            assert await verifier.confirm(event_for("t-1")) is None
    assert api.requests == ["t-1"]
    assert verifier.duplicates == 5


async def test_concurrent_duplicates_confirm_once() -> None:
    api = TaskAPI()
    api.finish("t-1")
    api.gate = anyio.Event()
    results: list[Any] = []
    async with client_for(api) as client:
        verifier = WebhookVerifier(client)

        async def deliver() -> None:
            results.append(await verifier.confirm(event_for("t-1")))

        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(deliver)
            await api.arrived.wait()
            await anyio.wait_all_tasks_blocked()  # the other four are waiting in confirm()
            api.gate.set()
    assert len([r for r in results if r is not None]) == 1
    assert results.count(None) == 4
    assert api.requests == ["t-1"]


async def test_a_failed_confirmation_lets_the_waiting_duplicate_try_again() -> None:
    api = TaskAPI()
    api.finish("t-1")
    api.failures = 1
    api.gate = anyio.Event()
    outcomes: list[Any] = []
    async with client_for(api) as client:
        verifier = WebhookVerifier(client)

        async def deliver() -> None:
            try:
                outcomes.append(await verifier.confirm(event_for("t-1")))
            except ServerError as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as group:
            group.start_soon(deliver)
            await api.arrived.wait()
            group.start_soon(deliver)
            await anyio.wait_all_tasks_blocked()
            api.gate.set()
    assert isinstance(outcomes[0], ServerError)  # the first one got the 500 (answer 5xx)
    assert outcomes[1] is not None  # the waiting duplicate confirmed it itself
    assert outcomes[1].task_id == "t-1"
    assert api.requests == ["t-1", "t-1"]


async def test_forged_delivery_for_an_unknown_task_is_rejected() -> None:
    api = TaskAPI()
    async with client_for(api) as client:
        verifier = WebhookVerifier(client)
        with pytest.raises(WebhookVerificationError) as info:
            await verifier.confirm(event_for("forged-task"))
        assert info.value.task_id == "forged-task"
        assert isinstance(info.value.__cause__, NotFoundError)
        # not remembered: the next delivery asks the API again
        with pytest.raises(WebhookVerificationError):
            await verifier.confirm(event_for("forged-task"))
    assert api.requests == ["forged-task", "forged-task"]


async def test_delivery_for_an_unfinished_task_is_rejected_until_it_finishes() -> None:
    api = TaskAPI()
    api.finish("t-1", "TASK_STATUS_PROCESSING")
    async with client_for(api) as client:
        verifier = WebhookVerifier(client)
        with pytest.raises(WebhookVerificationError, match="PROCESSING"):
            await verifier.confirm(event_for("t-1"))
        api.finish("t-1")
        result = await verifier.confirm(event_for("t-1"))
    assert result is not None
    assert result.status is TaskStatus.SUCCEED


async def test_other_event_types_are_ignored_without_a_request() -> None:
    api = TaskAPI()
    async with client_for(api) as client:
        verifier = WebhookVerifier(client)
        assert await verifier.confirm({"event_type": "PING", "payload": {}}) is None
        parsed = parse_webhook({"event_type": "SOMETHING_ELSE"})
        assert await verifier.confirm(parsed) is None
    assert api.requests == []
    assert verifier.ignored == 2


async def test_malformed_bodies_raise() -> None:
    api = TaskAPI()
    async with client_for(api) as client:
        verifier = WebhookVerifier(client)
        with pytest.raises(MalformedResponseError):
            await verifier.confirm(b"{not json")
        with pytest.raises(MalformedResponseError):
            await verifier.confirm(event_for(""))  # no task id
    assert api.requests == []


async def test_forget_allows_reprocessing() -> None:
    api = TaskAPI()
    api.finish("t-1")
    async with client_for(api) as client:
        verifier = WebhookVerifier(client)
        assert await verifier.confirm(event_for("t-1")) is not None
        verifier.forget("t-1")  # e.g. storing the result failed
        assert await verifier.confirm(event_for("t-1")) is not None
    assert api.requests == ["t-1", "t-1"]


async def test_memory_is_bounded_by_max_entries() -> None:
    api = TaskAPI()
    for i in range(3):
        api.finish(f"t-{i}")
    async with client_for(api) as client:
        verifier = WebhookVerifier(client, max_entries=2)
        for i in range(3):
            assert await verifier.confirm(event_for(f"t-{i}")) is not None
        # t-0 was evicted (oldest); t-2 is still remembered
        assert await verifier.confirm(event_for("t-2")) is None
        assert await verifier.confirm(event_for("t-0")) is not None


async def test_entries_expire_after_ttl() -> None:
    api = TaskAPI()
    api.finish("t-1")
    async with client_for(api) as client:
        verifier = WebhookVerifier(client, ttl=0.05)
        assert await verifier.confirm(event_for("t-1")) is not None
        assert await verifier.confirm(event_for("t-1")) is None
        await anyio.sleep(0.06)
        assert await verifier.confirm(event_for("t-1")) is not None


def test_bad_settings_are_refused() -> None:
    client = AsyncNovita("key", transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    with pytest.raises(ValueError, match="ttl"):
        WebhookVerifier(client, ttl=0)
    with pytest.raises(ValueError, match="max_entries"):
        WebhookVerifier(client, max_entries=0)


# --------------------------------------------------------------------------- against the emulator


async def test_emulator_delivery_is_confirmed_once_with_the_apis_answer() -> None:
    emu = NovitaEmulator(durations=0.0)
    extra = Extra(webhook=Webhook(url="https://example.com/webhooks/novita"))
    async with emu.client() as client:
        result = await client.txt2img(Txt2ImgRequest(model_name=MODEL, prompt="a fox"), extra)
        event = emu.webhook_event(result.task_id)
        assert event["payload"]["extra"]["webhook"]["url"] == "https://example.com/webhooks/novita"
        event["payload"]["images"][0]["image_url"] = "https://evil.example/x.png"  # tampered
        verifier = WebhookVerifier(client)
        polls = emu.polls[result.task_id]
        confirmed = await verifier.confirm(json.dumps(event).encode())
        assert emu.polls[result.task_id] == polls + 1  # one task-result GET
        assert await verifier.confirm(json.dumps(event).encode()) is None
        assert emu.polls[result.task_id] == polls + 1  # duplicates cost nothing
    assert confirmed is not None
    assert confirmed.status is TaskStatus.SUCCEED
    assert confirmed.images == result.images  # the API's URLs, not the body's


async def test_emulator_failed_task_and_forged_task() -> None:
    emu = NovitaEmulator(durations=0.0)
    async with emu.client() as client:
        task_id = await client.submit_txt2img(Txt2ImgRequest(model_name=MODEL, prompt="x [fail]"))
        verifier = WebhookVerifier(client)
        confirmed = await verifier.confirm(emu.webhook_event(task_id))
        assert confirmed is not None
        assert confirmed.status is TaskStatus.FAILED
        assert confirmed.task.reason == "emulated failure"

        forged = emu.webhook_event(task_id)
        forged["payload"]["task"]["task_id"] = "00000000-0000-4000-8000-000000000000"
        with pytest.raises(WebhookVerificationError, match="unknown task"):
            await verifier.confirm(forged)
