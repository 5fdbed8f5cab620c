"""``novita_async.testing``: the local v3 API emulator, driven through raw httpx.

Time is stepped by hand (:class:`ManualClock`) so nothing here sleeps for task
durations; the loopback tests use real sockets on 127.0.0.1 and are bounded.
"""

from __future__ import annotations

import base64
import json
import math
import selectors
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import anyio
import httpx
import pytest
from _support import API, MODEL, emulator_http, post_task, request_json
from _support import EMULATOR_AUTH as AUTH

from novita_async import HiresFix, InvalidRequestError, PollPolicy, TaskStatus, Txt2ImgRequest
from novita_async._convert import model as parse_model
from novita_async._convert import task_result
from novita_async.testing import (
    API_BASE_URL,
    DEFAULT_API_KEY,
    FAILURE_REASON,
    IMAGE_BASE_URL,
    EmulatedReset,
    ManualClock,
    NovitaEmulator,
    default_models,
    request_cost,
)

pytestmark = pytest.mark.anyio

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def body(extra: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"request": request_json(**fields)}
    if extra is not None:
        out["extra"] = extra
    return out


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def emu(clock: ManualClock) -> NovitaEmulator:
    return NovitaEmulator(clock=clock, durations=2.0)


async def submit(client: httpx.AsyncClient, **fields: Any) -> str:
    extra = fields.pop("extra", None)
    return await post_task(client, body(extra, **fields))


async def poll(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    response = await client.get("/v3/async/task-result", params={"task_id": task_id})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def error_of(response: httpx.Response) -> tuple[int, str]:
    data = response.json()
    assert set(data) == {"code", "reason", "message", "metadata"}
    assert data["code"] == response.status_code
    return response.status_code, data["reason"]


# --------------------------------------------------------------------------- task lifecycle


async def test_statuses_follow_the_clock_and_eta_counts_down(clock: ManualClock) -> None:
    emu = NovitaEmulator(clock=clock, durations=2.0, queue_delay=0.5)
    async with emulator_http(emu) as client:
        task_id = await submit(client, image_num=2)
        seen = []
        for step in (0.0, 0.5, 1.0, 1.0):
            clock.advance(step)
            task = (await poll(client, task_id))["task"]
            seen.append((task["status"], task["eta"], task["progress_percent"]))
        later = await poll(client, task_id)
    assert seen == [
        ("TASK_STATUS_QUEUED", 2.5, 0),
        ("TASK_STATUS_PROCESSING", 2.0, 0),
        ("TASK_STATUS_PROCESSING", 1.0, 50),
        ("TASK_STATUS_SUCCEED", 0.0, 0),  # like Novita: progress 0 once finished
    ]
    assert len(later["images"]) == 2
    record = emu.tasks[task_id]
    assert (record.created_at, record.started_at, record.completed_at) == (0.0, 0.5, 2.5)
    assert record.first_terminal_poll_at == 2.5  # first terminal answer, not the later one
    assert record.request["prompt"] == "a lighthouse at dusk"
    assert record.status.value == "TASK_STATUS_SUCCEED"
    assert (emu.tasks_created, emu.submissions, emu.polls[task_id], emu.polls_total) == (1, 1, 5, 5)


async def test_without_stamps_debug_info_times_are_empty(clock: ManualClock) -> None:
    emu = NovitaEmulator(clock=clock, durations=2.0, queue_delay=0.5, stamps=False)
    async with emulator_http(emu) as client:
        task_id = await submit(client)
        clock.advance(1.0)
        running = await poll(client, task_id)
        clock.advance(2.0)
        done = await poll(client, task_id)
    assert running["task"]["status"] == "TASK_STATUS_PROCESSING"
    assert done["task"]["status"] == "TASK_STATUS_SUCCEED"
    for body in (running, done):
        debug = body["extra"]["debug_info"]
        assert (debug["submit_time_ms"], debug["execute_time_ms"], debug["complete_time_ms"]) == (
            "",
            "",
            "",
        )
        assert json.loads(debug["request_info"])["model"] == MODEL  # the rest is there


async def test_result_body_matches_novitas_shape(emu: NovitaEmulator, clock: ManualClock) -> None:
    extra = {"response_image_type": "jpeg", "enable_nsfw_detection": True}
    async with emulator_http(emu) as client:
        task_id = await submit(client, image_num=2, seed=1234, extra=extra)
        running = await poll(client, task_id)
        clock.advance(2)
        done = await poll(client, task_id)
    debug = running["extra"]["debug_info"]
    assert debug["submit_time_ms"].isdigit()
    assert debug["complete_time_ms"] == ""
    assert done["extra"]["seed"] == "1234"  # a string, as Novita sends it
    info = json.loads(done["extra"]["debug_info"]["request_info"])  # a JSON string
    assert info["model"] == MODEL
    assert info["num_images_per_prompt"] == 2
    times = done["extra"]["debug_info"]
    assert int(times["complete_time_ms"]) - int(times["submit_time_ms"]) == 2000
    assert done["task"]["task_type"] == "TXT_TO_IMG"
    assert done["task"]["reason"] == ""
    for image in done["images"]:
        assert image["image_url"].startswith(f"{IMAGE_BASE_URL}/{task_id}/")
        assert image["image_url_ttl"] == "3600"
        assert image["image_type"] == "jpeg"
        assert image["nsfw_detection_result"]["valid"] is True
        assert 0 <= image["nsfw_detection_result"]["confidence"] <= 100
    assert done["videos"] == []
    assert done["audios"] == []
    parsed = task_result(done)  # the client's own parser reads it
    assert parsed.extra.seed == 1234
    assert parsed.images[0].image_url_ttl == 3600


async def test_prompt_marker_and_failure_rate_end_failed(clock: ManualClock) -> None:
    emu = NovitaEmulator(clock=clock, durations=1.0)
    always = NovitaEmulator(clock=clock, durations=1.0, failure_rate=1.0)
    async with emulator_http(emu) as client, emulator_http(always) as other:
        doomed = await submit(client, prompt="a cat [fail]")
        fine = await submit(client)
        random_failure = await submit(other)
        clock.advance(1)
        failed = await poll(client, doomed)
        ok = await poll(client, fine)
        also_failed = await poll(other, random_failure)
    assert failed["task"]["status"] == "TASK_STATUS_FAILED"
    assert failed["task"]["reason"] == FAILURE_REASON == "emulated failure"
    assert failed["images"] == []
    assert ok["task"]["status"] == "TASK_STATUS_SUCCEED"
    assert also_failed["task"]["status"] == "TASK_STATUS_FAILED"
    assert emu.tasks[doomed].first_terminal_poll_at == 1.0


async def test_workers_queue_fifo_and_eta_includes_the_wait(clock: ManualClock) -> None:
    emu = NovitaEmulator(clock=clock, durations=2.0, workers=2)
    async with emulator_http(emu) as client:
        ids = [await submit(client) for _ in range(5)]
        first = [(await poll(client, t))["task"] for t in ids]
        clock.advance(2)
        second = [(await poll(client, t))["task"]["status"][12:] for t in ids]
        clock.advance(3)
        late = await submit(client)  # t=5: the worker freed at t=4 takes it at once
    assert [t["status"][12:] for t in first] == [
        "PROCESSING",
        "PROCESSING",
        "QUEUED",
        "QUEUED",
        "QUEUED",
    ]
    assert [t["eta"] for t in first] == [2.0, 2.0, 4.0, 4.0, 6.0]
    assert second == ["SUCCEED", "SUCCEED", "PROCESSING", "PROCESSING", "QUEUED"]
    assert [emu.tasks[t].started_at for t in ids] == [0.0, 0.0, 2.0, 2.0, 4.0]
    assert emu.tasks[late].started_at == 5.0
    assert emu.tasks[late].queue_wait == 0.0


def test_durations_are_seeded_uniform() -> None:
    def draws(seed: int) -> list[float]:
        emu = NovitaEmulator(durations=(1.0, 3.0), seed=seed)
        return [emu._duration(body()) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert all(1.0 <= d <= 3.0 for d in draws(7))


async def test_callable_and_proportional_durations(clock: ManualClock) -> None:
    seen: list[dict[str, Any]] = []

    def duration(post_body: Mapping[str, Any]) -> float:
        seen.append(dict(post_body))
        return 4.0

    emu = NovitaEmulator(clock=clock, durations=duration)
    prop = NovitaEmulator(clock=clock, durations=NovitaEmulator.proportional(0.1, jitter=0.05))
    async with emulator_http(emu) as client, emulator_http(prop) as other:
        task_id = await submit(client, steps=30)
        small = await submit(other, steps=20, width=1000, height=1000)  # cost 20
        big = await submit(other, steps=40, width=1000, height=1000, image_num=2)  # cost 80
    assert seen[0]["request"]["steps"] == 30  # the callable gets the whole POST body
    assert emu.tasks[task_id].duration == 4.0
    assert 2.0 * 0.95 <= prop.tasks[small].duration <= 2.0 * 1.05
    assert 8.0 * 0.95 <= prop.tasks[big].duration <= 8.0 * 1.05
    assert request_cost(body(steps=20, width=1024, height=1024)) == pytest.approx(20.97152)
    hires = body(hires_fix={"target_width": 1000, "target_height": 1000, "strength": 0.5})
    assert request_cost(hires) == pytest.approx(20 * (0.262144 + 1.0))


def test_constructor_rejects_nonsense() -> None:
    for kwargs in (
        {"durations": (3.0, 1.0)},
        {"durations": -1.0},
        {"workers": 0},
        {"failure_rate": 2.0},
        {"image_url_ttl": 0},
        {"api_key": ""},
    ):
        with pytest.raises(ValueError):
            NovitaEmulator(**kwargs)
    with pytest.raises(TypeError):
        NovitaEmulator(durations="fast")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("POST", "/v3/async/txt2img", None),
        ("GET", "/v3/async/task-result", {"task_id": "x"}),
        ("GET", "/v3/model", None),
    ],
)
async def test_auth_errors(emu: NovitaEmulator, method: str, path: str, params: Any) -> None:
    async with emulator_http(emu, headers={}) as client:
        missing = await client.request(method, path, params=params, json=body())
        wrong = await client.request(
            method, path, params=params, json=body(), headers={"Authorization": "Bearer nope"}
        )
        raw = await client.request(
            method, path, params=params, json=body(), headers={"Authorization": DEFAULT_API_KEY}
        )
    assert error_of(missing) == (400, "MISSING_API_KEY")
    assert error_of(wrong) == (403, "INVALID_API_KEY")
    assert error_of(raw) == (403, "INVALID_API_KEY")  # the scheme is required
    assert emu.tasks_created == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"extra": {}},
        {"request": "a cat"},
        body(prompt=None),
        body(model_name=""),
        body(prompt="x" * 1025),
        body(width=127),
        body(height=2049),
        body(width=512.5),
        body(image_num=9),
        body(steps=0),
        body(steps=True),
        body(width=10**400),  # beyond float range: 400, not a crash of the validation
        body(guidance_scale=31),
        body(sampler_name="Euler z"),
        body(seed=-2),
        body(negative_prompt=""),
        body(loras=[{"model_name": "l", "strength": 1.5}]),
        body(loras=[{"model_name": f"l{i}", "strength": 0.5} for i in range(6)]),
        body(embeddings=[{"strength": 1}]),
        body(hires_fix={"target_width": 100, "target_height": 1024, "strength": 0.5}),
        body(hires_fix={"target_width": 1024, "target_height": 1024}),
        body(refiner={"switch_at": 2}),
        body({"response_image_type": "gif"}),
        body({"nsfw_detection_level": 3}),
        body({"response_image_type": "jpeg"}, enable_transparent_background=True),
    ],
)
async def test_invalid_bodies_get_400(emu: NovitaEmulator, bad: dict[str, Any]) -> None:
    async with emulator_http(emu) as client:
        response = await client.post("/v3/async/txt2img", json=bad)
    assert error_of(response) == (400, "INVALID_REQUEST_BODY")
    assert response.json()["message"]
    assert (emu.submissions, emu.tasks_created) == (1, 0)


@pytest.mark.parametrize(
    ("fields", "model"),
    [
        ({"width": 99999}, lambda: Txt2ImgRequest(model_name=MODEL, prompt="p", width=99999)),
        ({"seed": -2}, lambda: Txt2ImgRequest(model_name=MODEL, prompt="p", seed=-2)),
        (
            {"hires_fix": {"target_width": 5000, "target_height": 1024, "strength": 0.5}},
            lambda: HiresFix(target_width=5000, target_height=1024, strength=0.5),
        ),
    ],
)
async def test_validation_says_what_the_models_say(
    emu: NovitaEmulator, fields: dict[str, Any], model: Any
) -> None:
    """One source of truth: the emulator builds the request models, whose ranges decide."""
    with pytest.raises(InvalidRequestError) as caught:
        model()
    why = str(caught.value)  # "width must be 128-2048, got 99999", as the model words it
    async with emulator_http(emu) as client:
        response = await client.post("/v3/async/txt2img", json=body(**fields))
    assert error_of(response) == (400, "INVALID_REQUEST_BODY")
    assert response.json()["message"].endswith(why)


async def test_valid_optional_fields_and_non_json_body(emu: NovitaEmulator) -> None:
    full = body(
        {"response_image_type": "webp", "nsfw_detection_level": 2, "webhook": {"url": "https://x"}},
        negative_prompt="blurry",
        seed=-1,
        clip_skip=2,
        loras=[{"model_name": "add_detail_62833", "strength": 0.7}],
        embeddings=[{"model_name": "badhandv4_16755"}],
        hires_fix={"target_width": 1024, "target_height": 1024, "strength": 0.5},
        refiner={"switch_at": 0.8},
        restore_faces=True,
        sd_vae=None,
    )
    async with emulator_http(emu) as client:
        ok = await client.post("/v3/async/txt2img", json=full)
        garbage = await client.post("/v3/async/txt2img", content=b"{not json")
    assert ok.status_code == 200
    assert error_of(garbage) == (400, "INVALID_REQUEST_BODY")


async def test_strict_models_checks_the_catalogue(clock: ManualClock) -> None:
    emu = NovitaEmulator(clock=clock, strict_models=True)
    async with emulator_http(emu) as client:
        known = await client.post("/v3/async/txt2img", json=body())
        unknown = await client.post("/v3/async/txt2img", json=body(model_name="nope.safetensors"))
    assert known.status_code == 200
    assert error_of(unknown) == (400, "INVALID_REQUEST_BODY")


async def test_not_found_paths_methods_and_tasks(clock: ManualClock) -> None:
    emu = NovitaEmulator(clock=clock, durations=1.0, not_found_for=0.5)
    async with emulator_http(emu) as client:
        unknown = await client.get("/v3/async/task-result", params={"task_id": "nope"})
        no_id = await client.get("/v3/async/task-result")
        path = await client.get("/v3/async/img2img")
        method = await client.get("/v3/async/txt2img")
        task_id = await submit(client)
        early = await client.get("/v3/async/task-result", params={"task_id": task_id})
        clock.advance(0.5)
        visible = await client.get("/v3/async/task-result", params={"task_id": task_id})
    assert error_of(unknown) == (404, "TASK_NOT_FOUND")
    assert error_of(no_id) == (400, "INVALID_REQUEST_BODY")
    assert error_of(path) == (404, "API_NOT_FOUND")
    assert method.status_code == 405
    assert error_of(early) == (404, "TASK_NOT_FOUND")  # not_found_for: eventual consistency
    assert visible.status_code == 200
    assert emu.polls["nope"] == 1
    assert emu.polls[task_id] == 2


# --------------------------------------------------------------------------- fault injection


async def test_status_faults_with_retry_after_then_recovery(emu: NovitaEmulator) -> None:
    async with emulator_http(emu) as client:
        task_id = await submit(client)
        emu.fail_next("task-result", status=429, times=2, retry_after=3)
        assert emu.pending_faults("task-result") == 2
        answers = [
            await client.get("/v3/async/task-result", params={"task_id": task_id}) for _ in range(3)
        ]
    assert [r.status_code for r in answers] == [429, 429, 200]
    assert answers[0].headers["retry-after"] == "3"
    assert error_of(answers[1]) == (429, "RATE_LIMIT_EXCEEDED")
    assert emu.pending_faults("task-result") == 0
    assert emu.polls[task_id] == 3  # faulted polls count too


async def test_fault_reasons_bodies_and_order(emu: NovitaEmulator) -> None:
    emu.fail_next("txt2img", status=500)
    emu.fail_next("txt2img", status=503, reason="SERVICE_NOT_AVAILABLE", message="busy")
    emu.fail_next("txt2img", status=502)
    emu.fail_next("task-result", status=500)
    async with emulator_http(emu) as client:
        first = await client.post("/v3/async/txt2img", json=body())
        second = await client.post("/v3/async/txt2img", json=body())
        third = await client.post("/v3/async/txt2img", json=body())
        fourth = await client.get("/v3/async/task-result", params={"task_id": "x"})
        fifth = await client.post("/v3/async/txt2img", json=body())
    assert error_of(first) == (500, "CREATE_TASK_FAILED")
    assert error_of(second) == (503, "SERVICE_NOT_AVAILABLE")
    assert second.json()["message"] == "busy"
    assert third.status_code == 502
    assert third.headers["content-type"] == "text/html"
    assert error_of(fourth) == (500, "GET_RESULT_FAILED")
    assert fifth.status_code == 200
    assert (emu.submissions, emu.tasks_created) == (4, 1)  # faults before creation create nothing


async def test_reset_and_after_create_faults(emu: NovitaEmulator) -> None:
    emu.fail_next("txt2img", reset=True)
    emu.fail_next("txt2img", reset=True, after_create=True)
    emu.fail_next("txt2img", status=500, after_create=True)
    async with emulator_http(emu) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/v3/async/txt2img", json=body())
        assert emu.tasks_created == 0
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/v3/async/txt2img", json=body())
        assert emu.tasks_created == 1  # created, but the client never heard of it
        lost = await client.post("/v3/async/txt2img", json=body())
        assert error_of(lost) == (500, "CREATE_TASK_FAILED")
        assert emu.tasks_created == 2
        # the task the client never saw is real and pollable
        hidden = next(iter(emu.tasks))
        assert (await poll(client, hidden))["task"]["task_id"] == hidden


async def test_after_create_waits_behind_a_bad_request(emu: NovitaEmulator) -> None:
    emu.fail_next("txt2img", status=500, after_create=True)
    async with emulator_http(emu) as client:
        invalid = await client.post("/v3/async/txt2img", json=body(steps=0))
        assert emu.pending_faults("txt2img") == 1  # not consumed: no task was created
        faulted = await client.post("/v3/async/txt2img", json=body())
    assert invalid.status_code == 400
    assert faulted.status_code == 500
    assert emu.tasks_created == 1


async def test_malformed_and_delay_faults(emu: NovitaEmulator) -> None:
    async with emulator_http(emu) as client:
        task_id = await submit(client)
        emu.fail_next("task-result", malformed=True)
        emu.fail_next("txt2img", status=None, delay=5.0, after_create=True)
        emu.fail_next("model", status=None, delay=0.01)
        malformed = await client.get("/v3/async/task-result", params={"task_id": task_id})
        with pytest.raises(ValueError):
            malformed.json()
        assert malformed.status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v3/async/txt2img", json=body(), timeout=0.05)
        slow = await client.get("/v3/model")
    assert emu.tasks_created == 2  # the timed-out submission did create its task
    assert slow.status_code == 200


async def test_envelope_flag_and_envelope_faults(clock: ManualClock) -> None:
    emu = NovitaEmulator(clock=clock, envelope=True)
    plain = NovitaEmulator(clock=clock)
    plain.fail_next("txt2img", envelope=True)
    plain.fail_next("txt2img", envelope=True, envelope_code=7, message="balance")
    async with emulator_http(emu) as client, emulator_http(plain) as other:
        enveloped = (await client.post("/v3/async/txt2img", json=body())).json()
        once = (await other.post("/v3/async/txt2img", json=body())).json()
        failing = await other.post("/v3/async/txt2img", json=body())
        normal = (await other.post("/v3/async/txt2img", json=body())).json()
    assert enveloped["code"] == 0
    assert enveloped["msg"] == ""
    assert enveloped["data"]["task_id"] in emu.tasks
    assert once["data"]["task_id"] in plain.tasks
    assert failing.status_code == 200
    assert failing.json() == {
        "code": 7,
        "msg": "balance",
        "data": {},
    }
    assert set(normal) == {"task_id"}
    assert plain.tasks_created == 2


async def test_model_and_image_faults(emu: NovitaEmulator, clock: ManualClock) -> None:
    emu.fail_next("model", status=503, retry_after=1.5)
    async with emulator_http(emu) as client:
        models = await client.get("/v3/model")
        task_id = await submit(client)
        clock.advance(2)
        url = (await poll(client, task_id))["images"][0]["image_url"]
    emu.fail_next("image", status=500)
    emu.fail_next("image", reset=True)
    emu.fail_next("image", malformed=True)
    async with httpx.AsyncClient(transport=emu.transport()) as plain:
        broken = await plain.get(url)
        with pytest.raises(httpx.RemoteProtocolError):
            await plain.get(url)
        truncated = await plain.get(url)
        good = await plain.get(url)
    assert error_of(models) == (503, "SERVICE_NOT_AVAILABLE")
    assert models.headers["retry-after"] == "1.5"
    assert broken.status_code == 500
    assert b"<Code>InternalError</Code>" in broken.content
    assert truncated.status_code == 200
    assert len(truncated.content) < len(good.content)
    assert good.content.startswith(PNG_MAGIC)


def test_fail_next_rejects_bad_arguments(emu: NovitaEmulator) -> None:
    with pytest.raises(ValueError):
        emu.fail_next("img2img")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        emu.fail_next("task-result", after_create=True)
    with pytest.raises(ValueError):
        emu.fail_next("model", envelope=True)
    with pytest.raises(ValueError):
        emu.fail_next("txt2img", times=0)
    with pytest.raises(ValueError):
        emu.fail_next("txt2img", status=99)


async def test_images_per_minute_quota(clock: ManualClock) -> None:
    emu = NovitaEmulator(clock=clock, images_per_minute=10)
    async with emulator_http(emu) as client:
        ok = [await client.post("/v3/async/txt2img", json=body(image_num=4)) for _ in range(2)]
        clock.advance(20)
        over = await client.post("/v3/async/txt2img", json=body(image_num=4))
        small = await client.post("/v3/async/txt2img", json=body(image_num=2))
        clock.advance(40)  # the first two leave the 60 s window
        after = await client.post("/v3/async/txt2img", json=body(image_num=4))
    assert [r.status_code for r in ok] == [200, 200]
    assert error_of(over) == (429, "RATE_LIMIT_EXCEEDED")
    assert over.headers["retry-after"] == "40"
    assert small.status_code == 200  # weight is image_num: 2 more still fit
    assert after.status_code == 200
    assert (emu.tasks_created, emu.rate_limited) == (4, 1)
    emu.rate_limit(None)
    with pytest.raises(ValueError):
        emu.rate_limit(0)


async def test_a_request_heavier_than_the_quota_waits_for_an_empty_window(
    clock: ManualClock,
) -> None:
    emu = NovitaEmulator(clock=clock, images_per_minute=4)
    async with emulator_http(emu) as client:
        first = await client.post("/v3/async/txt2img", json=body(image_num=2))
        clock.advance(10)
        heavy = await client.post("/v3/async/txt2img", json=body(image_num=8))
        clock.advance(50)  # the window is empty now
        again = await client.post("/v3/async/txt2img", json=body(image_num=8))
    assert first.status_code == 200
    assert heavy.status_code == 429
    assert heavy.headers["retry-after"] == "50"
    assert again.status_code == 200


# --------------------------------------------------------------------------- model listing


async def list_all(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = []
    cursor = ""
    for _ in range(100):
        query = {**params, "pagination.limit": "7", "pagination.cursor": cursor}
        response = await client.get("/v3/model", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["models"]) <= 7
        models += page["models"]
        cursor = page["pagination"]["next_cursor"]
        if not cursor:
            return models
        assert cursor.startswith("c_")
        json.loads(base64.b64decode(cursor[2:]))  # opaque, but Novita-shaped
    raise AssertionError("pagination never ended")


async def test_models_paginate_with_keyset_cursors(emu: NovitaEmulator) -> None:
    async with emulator_http(emu) as client:
        listed = await list_all(client)
        first = (await client.get("/v3/model", params={"pagination.cursor": "c_0"})).json()
    standard = [m for m in default_models() if m["base_model_type"] != "Inpainting"]
    ids = [m["id"] for m in listed]
    assert len(ids) == len(set(ids)) == len(standard) >= 30
    assert ids == sorted(ids, reverse=True)
    assert first["pagination"]["next_cursor"] == ""
    assert len(first["models"]) == len(standard)
    parsed = parse_model(listed[0])
    assert parsed.type.name
    assert parsed.sd_name
    assert parsed.id == listed[0]["id"]
    assert emu.model_requests == 7


@pytest.mark.parametrize(
    ("params", "check"),
    [
        ({"filter.types": "checkpoint"}, lambda m: m["type"]["name"] == "checkpoint"),
        ({"filter.types": "lora,vae"}, lambda m: m["type"]["name"] in ("lora", "vae")),
        ({"filter.types": "textualinversion"}, lambda m: m["type"]["display_name"] == "Embedding"),
        ({"filter.is_sdxl": "true"}, lambda m: m["is_sdxl"] is True),
        ({"filter.is_sdxl": "false"}, lambda m: m["is_sdxl"] is False),
        ({"filter.visibility": "private"}, lambda m: m["visibility"] == "private"),
        ({"filter.source": "training"}, lambda m: m["source"] == "training"),
        ({"filter.query": "ANIME"}, lambda m: "anime" in json.dumps(m).lower()),
        ({"filter.is_inpainting": "true"}, lambda m: m["base_model_type"] == "Inpainting"),
    ],
)
async def test_model_filters(emu: NovitaEmulator, params: dict[str, str], check: Any) -> None:
    async with emulator_http(emu) as client:
        listed = await list_all(client, **params)
    assert listed, params
    assert all(check(m) for m in listed)
    everything = default_models()
    expected = [m for m in everything if check(m)]
    if "filter.is_inpainting" not in params:
        expected = [m for m in expected if m["base_model_type"] != "Inpainting"]
    assert len(listed) == len(expected)


async def test_model_repeated_types_and_bad_parameters(emu: NovitaEmulator) -> None:
    async with emulator_http(emu) as client:
        repeated = await list_all(client, **{"filter.types": ["lora", "vae"]})
        bad = [
            await client.get("/v3/model", params=params)
            for params in (
                {"pagination.limit": "0"},
                {"pagination.limit": "101"},
                {"pagination.limit": "ten"},
                {"pagination.cursor": "garbage"},
                {"pagination.cursor": "c_!!!"},
                {"filter.is_sdxl": "maybe"},
            )
        ]
    assert {m["type"]["name"] for m in repeated} == {"lora", "vae"}
    assert all(error_of(r) == (400, "INVALID_REQUEST_BODY") for r in bad)


async def test_custom_catalogue(clock: ManualClock) -> None:
    models = [
        {"id": i, "name": f"m{i}", "sd_name": f"m{i}.safetensors", "type": {"name": "checkpoint"}}
        for i in range(1, 6)
    ]
    emu = NovitaEmulator(clock=clock, models=models, strict_models=True)
    async with emulator_http(emu) as client:
        listed = await list_all(client)
        ok = await client.post("/v3/async/txt2img", json=body(model_name="m3.safetensors"))
    assert [m["id"] for m in listed] == [5, 4, 3, 2, 1]
    assert ok.status_code == 200
    with pytest.raises(ValueError):
        NovitaEmulator(models=[{"id": 1}, {"id": 1}])


# --------------------------------------------------------------------------- image host


async def finished_urls(
    emu: NovitaEmulator, clock: ManualClock, **fields: Any
) -> tuple[str, list[str]]:
    async with emulator_http(emu) as client:
        task_id = await submit(client, **fields)
        clock.advance(emu.tasks[task_id].completed_at - clock())
        return task_id, [image["image_url"] for image in (await poll(client, task_id))["images"]]


@pytest.mark.parametrize(
    ("image_type", "magic"),
    [("png", PNG_MAGIC), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")],
)
async def test_image_download(
    emu: NovitaEmulator, clock: ManualClock, image_type: str, magic: bytes
) -> None:
    _, urls = await finished_urls(
        emu, clock, image_num=2, extra={"response_image_type": image_type}
    )
    async with httpx.AsyncClient(transport=emu.transport()) as plain:
        images = [await plain.get(url) for url in urls]
    assert all(url.split("?")[0].endswith(f".{image_type}") for url in urls)
    for image in images:
        assert image.status_code == 200
        assert image.headers["content-type"] == f"image/{image_type}"
        assert image.content.startswith(magic)
    if image_type != "webp":
        assert images[0].content != images[1].content  # each image is distinct
    assert (emu.image_requests, emu.image_auth_headers) == (2, 0)


async def test_image_urls_expire_on_the_emulator_clock(clock: ManualClock) -> None:
    emu = NovitaEmulator(clock=clock, durations=1.0, image_url_ttl=30)
    task_id, urls = await finished_urls(emu, clock)
    async with httpx.AsyncClient(transport=emu.transport()) as plain, emulator_http(emu) as client:
        fresh = await plain.get(urls[0])
        clock.advance(30)
        expired = await plain.get(urls[0])
        ttl = (await poll(client, task_id))["images"][0]["image_url_ttl"]
    assert fresh.status_code == 200
    assert expired.status_code == 403
    assert expired.headers["content-type"] == "application/xml"
    assert b"<Code>AccessDenied</Code>" in expired.content
    assert b"Request has expired" in expired.content
    assert ttl == "30"


async def test_image_host_counts_and_refuses_authorization(
    emu: NovitaEmulator, clock: ManualClock
) -> None:
    _, urls = await finished_urls(emu, clock)
    async with httpx.AsyncClient(transport=emu.transport()) as plain:
        leaked = await plain.get(urls[0], headers=AUTH)
        clean = await plain.get(urls[0])
    assert leaked.status_code == 400
    assert b"InvalidArgument" in leaked.content
    assert clean.status_code == 200
    assert emu.image_auth_headers == emu.image_auth_headers_seen == 1
    assert emu.image_requests == 2


async def test_image_urls_are_signed(emu: NovitaEmulator, clock: ManualClock) -> None:
    task_id, urls = await finished_urls(emu, clock)
    url = httpx.URL(urls[0])
    tampered = url.copy_set_param("expires", "99999999.000")
    unsigned = url.copy_with(query=None)
    missing_key = f"{task_id}/7.png"
    forged = httpx.URL(
        f"{IMAGE_BASE_URL}/{missing_key}",
        params={"expires": "9999.000", "signature": emu._images.sign(missing_key, "9999.000")},
    )
    async with httpx.AsyncClient(transport=emu.transport()) as plain:
        answers = [await plain.get(u) for u in (tampered, unsigned, forged)]
        post = await plain.post(url)
    assert [r.status_code for r in answers] == [403, 403, 404]
    assert b"SignatureDoesNotMatch" in answers[0].content
    assert b"NoSuchKey" in answers[2].content
    assert post.status_code == 405


# --------------------------------------------------------------------------- wiring


async def test_transport_attaches_the_request_and_serves_any_api_host(
    emu: NovitaEmulator,
) -> None:
    transport = emu.transport()
    request = httpx.Request("GET", f"{API_BASE_URL}/v3/model", headers=AUTH)
    response = await transport.handle_async_request(request)
    assert response.request is request
    assert response.status_code == 200
    async with emulator_http(emu, base_url=API, transport=emu.transport()) as client:
        assert (await client.get("/v3/model")).status_code == 200
    emu.fail_next("model", reset=True)
    with pytest.raises(EmulatedReset):
        await emu.handle(request)


async def test_report_eta_off_and_latency() -> None:
    clock = ManualClock()
    emu = NovitaEmulator(clock=clock, durations=5.0, report_eta=False, latency=0.01)
    async with emulator_http(emu) as client:
        task_id = await submit(client)
        task = (await poll(client, task_id))["task"]
    assert task["status"] == "TASK_STATUS_PROCESSING"
    assert task["eta"] == 0


def test_construction_needs_no_event_loop() -> None:
    emu = NovitaEmulator(clock=anyio.current_time)  # only called during requests
    assert "durations=(1.0, 3.0)" in repr(emu)


async def test_webhook_event_body(emu: NovitaEmulator, clock: ManualClock) -> None:
    task_id, _ = await finished_urls(emu, clock, extra={"webhook": {"url": "https://hook"}})
    event = emu.webhook_event(task_id)
    assert event["event_type"] == "ASYNC_TASK_RESULT"
    assert event["payload"]["extra"]["webhook"] == {"url": "https://hook"}
    assert event["payload"]["task"]["status"] == "TASK_STATUS_SUCCEED"
    assert emu.polls[task_id] == 1  # building it counted no poll


async def test_client_smoke_in_process() -> None:
    emu = NovitaEmulator(durations=(0.01, 0.05))
    with anyio.fail_after(20):
        async with emu.client() as client:
            result = await client.txt2img(Txt2ImgRequest(model_name=MODEL, prompt="a cat"))
            data = await client.download_image(result.images[0])
    assert result.task.status.value == "TASK_STATUS_SUCCEED"
    assert data.startswith(PNG_MAGIC)
    assert (emu.tasks_created, emu.image_auth_headers) == (1, 0)


@pytest.mark.timeout(30)  # in real time the hour-long task would take an hour: fail instead
def test_client_on_trio_virtual_time() -> None:
    """``clock=anyio.current_time`` + trio's MockClock: an hour-long task takes no wall time,
    and the client waits for it on the emulator's (virtual) clock."""
    trio = pytest.importorskip("trio")
    from trio.testing import MockClock

    async def main() -> tuple[float, float, float]:
        emu = NovitaEmulator(durations=3600.0, clock=anyio.current_time)
        start = anyio.current_time()
        async with emu.client() as client:
            result = await client.txt2img(Txt2ImgRequest(model_name=MODEL, prompt="a cat"))
        assert result.status is TaskStatus.SUCCEED
        (task,) = emu.tasks.values()
        assert task.first_terminal_poll_at is not None
        waited = task.first_terminal_poll_at - start
        return waited, task.first_terminal_poll_at - task.completed_at, task.completed_at - start

    waited, lag, duration = trio.run(main, clock=MockClock(autojump_threshold=0))
    assert duration == pytest.approx(3600.0, abs=1.0)
    assert waited >= 3600.0  # the result came from a poll after the task ended, not before
    assert 0 <= lag <= PollPolicy().max_interval  # and the client did not oversleep it


# --------------------------------------------------------------------------- loopback server


async def test_loopback_round_trip(emu: NovitaEmulator, clock: ManualClock) -> None:
    with anyio.fail_after(20):
        async with emu.serve() as server:
            assert server.base_url.startswith("http://127.0.0.1:")
            assert server.image_port != server.port
            async with emulator_http(emu, base_url=server.base_url) as client:
                task_id = await submit(client, image_num=2)
                assert (await poll(client, task_id))["task"]["status"] == "TASK_STATUS_PROCESSING"
                clock.advance(2)
                images = (await poll(client, task_id))["images"]
                models = await client.get("/v3/model", params={"filter.types": "vae"})
            async with httpx.AsyncClient() as plain:
                data = [await plain.get(image["image_url"]) for image in images]
            assert all(i["image_url"].startswith(server.image_base_url + "/") for i in images)
            assert [d.status_code for d in data] == [200, 200]
            assert data[0].content.startswith(PNG_MAGIC)
            assert len(models.json()["models"]) == 4
            assert server.connections == 2  # keep-alive: one per origin
    assert (emu.tasks_created, emu.polls[task_id], emu.image_auth_headers) == (1, 2, 0)


async def test_loopback_faults(emu: NovitaEmulator) -> None:
    with anyio.fail_after(20):
        async with emu.serve() as server, emulator_http(emu, base_url=server.base_url) as client:
            emu.fail_next("txt2img", reset=True, after_create=True)
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post("/v3/async/txt2img", json=body())
            emu.fail_next("task-result", status=429, retry_after=2)
            limited = await client.get("/v3/async/task-result", params={"task_id": "x"})
            emu.fail_next("model", malformed=True)
            malformed = await client.get("/v3/model")
            emu.fail_next("model", status=None, delay=5)
            with pytest.raises(httpx.ReadTimeout):
                await client.get("/v3/model", timeout=0.2)
            after = await client.get("/v3/model")
    assert emu.tasks_created == 1
    assert error_of(limited) == (429, "RATE_LIMIT_EXCEEDED")
    assert limited.headers["retry-after"] == "2"
    assert malformed.status_code == 200
    assert malformed.content.startswith(b'{"emulated"')
    assert after.status_code == 200


async def test_loopback_raw_http(emu: NovitaEmulator) -> None:
    """Pipelined keep-alive requests, Connection: close, and refused chunked bodies."""

    async def exchange(port: int, payload: bytes) -> bytes:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(payload)
            received = b""
            try:
                while True:
                    received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return received

    get = b"GET /v3/model?pagination.limit=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
    get %= DEFAULT_API_KEY.encode()
    with anyio.fail_after(20):
        async with emu.serve() as server:
            both = await exchange(server.port, get + b"\r\n" + get + b"Connection: close\r\n\r\n")
            chunked = await exchange(
                server.port,
                b"POST /v3/async/txt2img HTTP/1.1\r\nHost: x\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            )
            garbage = await exchange(server.port, b"HELLO\r\n\r\n")
            accented = await exchange(server.port, b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n")
    assert both.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert both.rstrip().endswith(b"}")
    assert b"connection: close" in both
    assert chunked.startswith(b"HTTP/1.1 501 ")
    assert garbage.startswith(b"HTTP/1.1 400 ")
    assert accented.startswith(b"HTTP/1.1 400 ")


async def test_loopback_server_stops_and_passes_errors_through(emu: NovitaEmulator) -> None:
    async def crash_inside() -> str:
        async with emu.serve() as server:
            raise KeyError(server.base_url)

    with anyio.fail_after(20):
        with pytest.raises(KeyError) as crashed:  # not wrapped in an exception group on trio
            await crash_inside()
        base_url = crashed.value.args[0]
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.ConnectError):
                await plain.get(f"{base_url}/v3/model")


async def test_loopback_client_smoke() -> None:
    emu = NovitaEmulator(durations=(0.01, 0.05))
    with anyio.fail_after(20):
        async with emu.serve() as server, server.client() as client:
            result = await client.txt2img(Txt2ImgRequest(model_name=MODEL, prompt="a cat"))
            data = await client.download_image(result.images[0])
    assert data.startswith(PNG_MAGIC)
    assert emu.image_auth_headers == 0


# --------------------------------------------------------------------------- python -m ...testing


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError("no output from the emulator process")
    return proc.stdout.readline()


@pytest.mark.parametrize(
    ("stop", "backend"), [(signal.SIGTERM, "asyncio"), (signal.SIGINT, "trio")]
)
def test_module_runs_standalone_and_stops_on_signal(stop: signal.Signals, backend: str) -> None:
    command = [
        sys.executable,
        "-m",
        "novita_async.testing",
        "--port",
        "0",
        "--durations",
        "0.5,1",
        "--workers",
        "2",
        "--backend",
        backend,
        "--api-key",
        "my-local-key",
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            urls = json.loads(read_line(proc, 30))
            assert set(urls) == {"base_url", "image_base_url", "api_key"}
            assert urls["base_url"] != urls["image_base_url"]
            assert urls["api_key"] == "my-local-key"  # the ready line says which key works
            auth = {"Authorization": f"Bearer {urls['api_key']}"}
            with httpx.Client(base_url=urls["base_url"], headers=auth, timeout=10) as client:
                response = client.post("/v3/async/txt2img", json=body())
                task_id = response.json()["task_id"]
                status = client.get("/v3/async/task-result", params={"task_id": task_id})
            assert status.json()["task"]["status"] == "TASK_STATUS_PROCESSING"
            proc.send_signal(stop)
            assert proc.wait(timeout=15) == 0
            assert proc.stdout is not None
            assert proc.stdout.read() == ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_module_help_documents_the_key_and_the_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    from novita_async.testing.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert f"accepts one API key: {DEFAULT_API_KEY!r}" in text
    assert f"NOVITA_API_KEY={DEFAULT_API_KEY} novita-async generate" in text
    assert "--base-url http://127.0.0.1:8765" in text


def test_module_rejects_bad_options() -> None:
    from novita_async.testing.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--durations", "3,1"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--durations", "nan"],
        ["--durations", "inf"],
        ["--durations", "0,inf"],
        ["--queue-delay", "nan"],
        ["--image-url-ttl", "nan"],
        ["--images-per-minute", "nan"],
        ["--webhooks", "--webhook-delay", "nan"],
        ["--port", "70000"],
    ],
)
def test_module_rejects_non_finite_options(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Non-finite numbers used to be accepted: every txt2img then failed inside
    # the server (a dropped connection), or quotas and TTLs silently never applied.
    from novita_async.testing import __main__ as module
    from novita_async.testing.__main__ import main

    def serve_instead(*args: object, **kwargs: object) -> None:
        raise AssertionError("the options were accepted: it would serve")

    monkeypatch.setattr(module.anyio, "run", serve_instead)

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("durations", [math.nan, math.inf, (0.0, math.inf)])
def test_non_finite_durations_are_refused_up_front(durations: Any) -> None:
    with pytest.raises(ValueError, match="finite"):
        NovitaEmulator(durations=durations)


@pytest.mark.parametrize("delay", [math.nan, -1.0, (0.0, math.inf), (2.0, 1.0)])
def test_bad_queue_delays_are_refused_up_front(delay: Any) -> None:
    with pytest.raises(ValueError, match="queue_delay"):
        NovitaEmulator(queue_delay=delay)


async def test_a_drawn_queue_delay_holds_each_task_queued_its_own_time(
    clock: ManualClock,
) -> None:
    emu = NovitaEmulator(clock=clock, durations=1.0, queue_delay=(0.2, 0.8), seed=3)
    async with emulator_http(emu) as client:
        task_ids = [await submit(client) for _ in range(20)]
        clock.advance(0.5)
        statuses = [(await poll(client, t))["task"]["status"] for t in task_ids]
    waits = [emu.tasks[t].started_at - emu.tasks[t].created_at for t in task_ids]
    assert all(0.2 <= w <= 0.8 for w in waits)
    assert len(set(waits)) == 20  # drawn per task
    expected = ["TASK_STATUS_QUEUED" if w > 0.5 else "TASK_STATUS_PROCESSING" for w in waits]
    assert statuses == expected
    assert 0 < expected.count("TASK_STATUS_QUEUED") < 20


def test_module_port_in_use_is_one_error_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "novita_async.testing", "--port", str(port)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()  # no traceback
    assert f"cannot listen on 127.0.0.1 (--port {port}" in line


@pytest.mark.anyio
async def test_whole_second_etas_are_rounded_up() -> None:
    emu = NovitaEmulator(durations=2.3, report_eta="whole")
    async with emu.client() as client:
        task_id = await client.submit_txt2img(
            Txt2ImgRequest(model_name="emulated.safetensors", prompt="eta")
        )
        result = await client.get_task_result(task_id)
    assert result.task.eta == 3.0  # 2.3 s left, said as whole seconds
