"""AsyncNovita core: submit / get_task_result, error mapping, retry rules, secrecy, lifecycle.

HTTP is mocked with respx; a few tests use a real loopback server (127.0.0.1) to
prove the ambiguous-failure rules with real sockets. Retry sleeps are recorded,
never slept.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import random
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import pytest
import respx
from _support import (
    API,
    KEY,
    RESULT,
    SPEC_REQUEST_BODY,
    SPEC_RESULT_BODY,
    SUBMIT,
    error,
    ok_result,
    ok_submit,
)
from _support import SPEC_EXTRA as EXTRA
from _support import SPEC_REQUEST as REQUEST
from _support import SPEC_TASK_ID as TASK_ID

from novita_async import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncNovita,
    AuthenticationError,
    BadRequestError,
    Extra,
    InsufficientBalanceError,
    InvalidRequestError,
    Lora,
    MalformedResponseError,
    NotFoundError,
    NovitaError,
    PermissionDeniedError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    SubmissionUncertainError,
    TaskResult,
    TaskStatus,
    Txt2ImgRequest,
    WeightedRateLimiter,
)
from novita_async._transport import RATE_LIMIT_ATTEMPTS
from novita_async._version import __version__

pytestmark = pytest.mark.anyio


def make_client(max_retries: int = 3, **kwargs: Any) -> tuple[AsyncNovita, list[float]]:
    """A client whose retry sleeps are recorded instead of slept."""
    kwargs.setdefault("api_key", KEY)
    if "http_client" not in kwargs:  # respx mocks httpx's own transport
        kwargs.setdefault("transport", httpx.AsyncHTTPTransport())
    kwargs.setdefault(
        "retry_policy", RetryPolicy(max_retries=max_retries, initial_backoff=0.01, max_backoff=0.05)
    )
    client = AsyncNovita(**kwargs)
    sleeps: list[float] = []

    async def record(delay: float) -> None:
        sleeps.append(delay)

    client._transport.sleep = record
    return client, sleeps


def assert_no_key(*texts: object) -> None:
    for text in texts:
        assert KEY not in str(text)
        assert KEY not in repr(text)


def error_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        cause = getattr(current, "cause", None)
        current = current.__cause__ or current.__context__ or cause
    return chain


# --------------------------------------------------------------------------- happy paths


async def test_submit_sends_exact_body_and_signed_headers(api: respx.MockRouter) -> None:
    route = api.post(SUBMIT).mock(return_value=ok_submit())
    client, _ = make_client()
    async with client:
        assert await client.submit_txt2img(REQUEST, EXTRA) == TASK_ID
    assert route.call_count == 1
    sent = route.calls.last.request
    assert sent.method == "POST"
    assert sent.url == httpx.URL(API + SUBMIT)
    assert json.loads(sent.content) == SPEC_REQUEST_BODY
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.headers["Content-Type"] == "application/json"
    assert f"novita-async/{__version__}" in sent.headers["User-Agent"]


async def test_submit_without_extra_sends_no_extra_key(api: respx.MockRouter) -> None:
    route = api.post(SUBMIT).mock(return_value=ok_submit())
    client, _ = make_client()
    async with client:
        await client.submit_txt2img(REQUEST)
    assert set(json.loads(route.calls.last.request.content)) == {"request"}


@pytest.mark.parametrize(
    "body",
    [
        {"task_id": "0fe0f291-05c9-41a4-83bb-3365d4b54f8b"},
        {"code": 0, "msg": "", "data": {"task_id": "0fe0f291-05c9-41a4-83bb-3365d4b54f8b"}},
        {"code": 200, "data": {"task_id": "0fe0f291-05c9-41a4-83bb-3365d4b54f8b"}},
    ],
)
async def test_submit_accepts_the_plain_and_v2_envelope_shapes(
    api: respx.MockRouter, body: dict[str, Any]
) -> None:
    api.post(SUBMIT).mock(return_value=httpx.Response(200, json=body))
    client, _ = make_client()
    async with client:
        assert await client.submit_txt2img(REQUEST) == "0fe0f291-05c9-41a4-83bb-3365d4b54f8b"


async def test_get_task_result_parses_the_spec_body(api: respx.MockRouter) -> None:
    route = api.get(RESULT).mock(return_value=ok_result())
    client, _ = make_client()
    async with client:
        result = await client.get_task_result(TASK_ID)
    assert isinstance(result, TaskResult)
    assert result.status is TaskStatus.SUCCEED
    assert result.extra.seed == 392212448
    assert [image.image_url_ttl for image in result.images] == [3600, 3600]
    sent = route.calls.last.request
    assert sent.url.params["task_id"] == TASK_ID
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.headers["Content-Type"] == "application/json"  # "required" even on GET
    assert f"novita-async/{__version__}" in sent.headers["User-Agent"]


async def test_custom_base_url_is_used(api: respx.MockRouter) -> None:
    with respx.mock(base_url="http://127.0.0.1:9999/proxy") as local:
        route = local.post(SUBMIT).mock(return_value=ok_submit())
        client, _ = make_client(base_url="http://127.0.0.1:9999/proxy/")
        async with client:
            assert await client.submit_txt2img(REQUEST) == TASK_ID
        assert route.calls.last.request.url.path == "/proxy/v3/async/txt2img"
        assert route.calls.last.request.headers["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("base_url", ["api.novita.ai", "ftp://api.novita.ai", "/v3"])
def test_base_url_must_be_absolute_http(base_url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        AsyncNovita(api_key=KEY, base_url=base_url)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("request_", "extra"),
    [
        ("not a request", None),
        ({"model_name": "m", "prompt": "p"}, None),
        (REQUEST, {"response_image_type": "png"}),
        (Txt2ImgRequest(model_name="m", prompt="p", enable_transparent_background=True), None),
        (
            Txt2ImgRequest(model_name="m", prompt="p", enable_transparent_background=True),
            Extra(response_image_type="jpeg"),
        ),
    ],
)
async def test_invalid_submissions_raise_before_any_network_call(
    api: respx.MockRouter, request_: Any, extra: Any
) -> None:
    route = api.post(SUBMIT).mock(return_value=ok_submit())
    client, _ = make_client()
    async with client:
        with pytest.raises(InvalidRequestError):
            await client.submit_txt2img(request_, extra)
    assert route.call_count == 0


@pytest.mark.parametrize("timeout", [-1.0, float("nan"), "5"])
async def test_txt2img_rejects_a_bad_timeout_before_paying_for_a_task(
    api: respx.MockRouter, timeout: Any
) -> None:
    """A timeout that cannot be waited with is refused before the POST: after it, the
    task was paid for and its id, in no error, was lost."""
    route = api.post(SUBMIT).mock(return_value=ok_submit())
    client, _ = make_client()
    with anyio.fail_after(10):
        async with client:
            with pytest.raises((InvalidRequestError, TypeError)):
                await client.txt2img(REQUEST, timeout=timeout)
    assert route.call_count == 0


async def test_model_validation_happens_before_the_client_is_involved(
    api: respx.MockRouter,
) -> None:
    route = api.post(SUBMIT).mock(return_value=ok_submit())
    client, _ = make_client()
    async with client:
        with pytest.raises(InvalidRequestError):
            await client.submit_txt2img(REQUEST.__class__(model_name="m", prompt="p", steps=0))
        with pytest.raises(InvalidRequestError):
            await client.submit_txt2img(
                Txt2ImgRequest(
                    model_name="m",
                    prompt="p",
                    loras=[Lora(model_name=f"l{i}", strength=0.5) for i in range(6)],
                )
            )
    assert route.call_count == 0


async def test_transparent_background_with_png_is_sent(api: respx.MockRouter) -> None:
    route = api.post(SUBMIT).mock(return_value=ok_submit())
    client, _ = make_client()
    async with client:
        await client.submit_txt2img(
            Txt2ImgRequest(model_name="m", prompt="p", enable_transparent_background=True),
            Extra(response_image_type="png"),
        )
    body = json.loads(route.calls.last.request.content)
    assert body["request"]["enable_transparent_background"] is True


@pytest.mark.parametrize("task_id", ["", None, 42])
async def test_bad_task_id_raises_before_any_network_call(
    api: respx.MockRouter, task_id: Any
) -> None:
    route = api.get(RESULT).mock(return_value=ok_result())
    client, _ = make_client()
    async with client:
        with pytest.raises(InvalidRequestError):
            await client.get_task_result(task_id)
    assert route.call_count == 0


# --------------------------------------------------------------------------- error mapping

NON_RETRIED = [
    (400, "INVALID_REQUEST_BODY", BadRequestError),
    (400, "ILLEGAL_PROMPT", BadRequestError),
    (400, "MISSING_API_KEY", AuthenticationError),
    (400, "BILLING_BALANCE_NOT_ENOUGH", InsufficientBalanceError),
    (401, "FAILED_TO_AUTH", AuthenticationError),
    (403, "INVALID_API_KEY", AuthenticationError),
    (403, "FEATURE_NOT_ALLOWED", PermissionDeniedError),
    (403, "NEED_REAL_NAME_VERIFY", PermissionDeniedError),
    (404, "TASK_NOT_FOUND", NotFoundError),
    (404, "API_NOT_FOUND", NotFoundError),
]


@pytest.mark.parametrize(("status", "reason", "cls"), NON_RETRIED)
async def test_submit_error_mapping_is_not_retried(
    api: respx.MockRouter, status: int, reason: str, cls: type[APIStatusError]
) -> None:
    route = api.post(SUBMIT).mock(
        return_value=httpx.Response(
            status,
            json={"code": status, "reason": reason, "message": "nope", "metadata": {"f": "x"}},
        )
    )
    client, sleeps = make_client()
    async with client:
        with pytest.raises(APIStatusError) as caught:
            await client.submit_txt2img(REQUEST)
    err = caught.value
    assert type(err) is cls
    assert (err.status_code, err.reason, err.message, err.metadata) == (
        status,
        reason,
        "nope",
        {"f": "x"},
    )
    assert json.loads(err.body)["reason"] == reason
    assert route.call_count == 1
    assert sleeps == []


@pytest.mark.parametrize(
    ("status", "reason", "cls"),
    [
        *NON_RETRIED,
        (401, "", AuthenticationError),
        (403, "NOT_ENOUGH_BALANCE", InsufficientBalanceError),
        (403, "API_NOT_ALLOWED", PermissionDeniedError),
        (403, "BILLING_AUTH_FAILED", PermissionDeniedError),
        (409, "CONFLICT", APIStatusError),  # undocumented: the base class
        (429, "RATE_LIMIT_EXCEEDED", RateLimitError),
        (500, "GET_RESULT_FAILED", ServerError),
        (500, "TASK_FAILED", ServerError),
        (502, "", ServerError),
        (503, "SERVICE_NOT_AVAILABLE", ServerError),
        (504, "", ServerError),
    ],
)
async def test_get_error_mapping(
    api: respx.MockRouter, status: int, reason: str, cls: type[APIStatusError]
) -> None:
    body = {"code": status, "reason": reason, "message": "details", "metadata": {"k": "v"}}
    route = api.get(RESULT).mock(return_value=httpx.Response(status, json=body))
    client, _ = make_client(max_retries=0)
    async with client:
        with pytest.raises(APIStatusError) as caught:
            await client.get_task_result(TASK_ID)
    err = caught.value
    assert type(err) is cls
    assert isinstance(err, NovitaError)
    assert (err.status_code, err.reason, err.message, err.metadata) == (
        status,
        reason,
        "details",
        {"k": "v"},
    )
    assert json.loads(err.body) == body
    assert err.code == status
    assert (err.method, err.path) == ("GET", RESULT)
    assert err.envelope is False
    assert f"HTTP {status}" in str(err)
    assert "details" in str(err)
    assert route.call_count == 1


async def test_envelope_error_on_2xx_submit_is_raised_not_retried(api: respx.MockRouter) -> None:
    route = api.post(SUBMIT).mock(
        return_value=httpx.Response(200, json={"code": 6, "msg": "steps out of range"})
    )
    client, sleeps = make_client()
    async with client:
        with pytest.raises(BadRequestError) as caught:
            await client.submit_txt2img(REQUEST)
    assert caught.value.envelope is True
    assert caught.value.message == "steps out of range"
    assert route.call_count == 1
    assert sleeps == []


async def test_envelope_server_error_on_submit_is_uncertain(api: respx.MockRouter) -> None:
    route = api.post(SUBMIT).mock(
        return_value=httpx.Response(200, json={"code": -1, "msg": "internal"})
    )
    client, _ = make_client()
    async with client:
        with pytest.raises(SubmissionUncertainError) as caught:
            await client.submit_txt2img(REQUEST)
    assert isinstance(caught.value.cause, ServerError)
    assert route.call_count == 1


@pytest.mark.parametrize(
    ("body", "cls", "status", "reason"),
    [
        ({"code": 6, "msg": "steps out of range"}, BadRequestError, 400, "PARAM_RANGE_ERROR"),
        ({"code": 4, "msg": "bad key"}, AuthenticationError, 401, "INVALID_AUTH"),
        ({"code": 7, "msg": "no money"}, InsufficientBalanceError, 400, "COST_BALANCE_ERROR"),
        ({"code": 3, "msg": "no such task"}, NotFoundError, 404, "TASK_ID_NOT_EXISTS"),
        ({"code": -1, "msg": "internal"}, ServerError, 500, "INTERNAL_ERROR"),
        ({"code": 5}, ServerError, 503, "HOST_UNAVAILABLE"),
        ({"code": 9}, ServerError, 504, "TIMEOUT"),
        (
            {"code": 429, "reason": "RATE_LIMIT_EXCEEDED"},
            RateLimitError,
            429,
            "RATE_LIMIT_EXCEEDED",
        ),
        (
            {"code": 403, "reason": "INVALID_API_KEY", "message": "x"},
            AuthenticationError,
            403,
            "INVALID_API_KEY",
        ),
        ({"code": 12345}, ServerError, 500, "ENVELOPE_CODE_12345"),
    ],
)
async def test_envelope_error_on_a_2xx_get_is_mapped(
    api: respx.MockRouter,
    body: dict[str, Any],
    cls: type[APIStatusError],
    status: int,
    reason: str,
) -> None:
    route = api.get(RESULT).mock(return_value=httpx.Response(200, json=body))
    client, _ = make_client(max_retries=0)
    async with client:
        with pytest.raises(APIStatusError) as caught:
            await client.get_task_result(TASK_ID)
    err = caught.value
    assert type(err) is cls
    assert (err.status_code, err.reason, err.code) == (status, reason, body["code"])
    assert err.envelope is True
    assert "envelope" in str(err)
    assert route.call_count == 1


@pytest.mark.parametrize(
    "content", [b"", b"<html>", b"{'single': 'quotes'}", b"\xff\xfe", b"{", b"[1, 2]"]
)
async def test_a_2xx_get_answer_that_is_no_task_result_is_malformed(
    api: respx.MockRouter, content: bytes
) -> None:
    api.get(RESULT).mock(return_value=httpx.Response(200, content=content))
    client, _ = make_client(max_retries=0)
    async with client:
        with pytest.raises(MalformedResponseError):
            await client.get_task_result(TASK_ID)


# --------------------------------------------------------------------------- GET retries

GET_TRANSIENT: list[Any] = [
    error(429, "RATE_LIMIT_EXCEEDED"),
    error(500, "GET_RESULT_FAILED"),
    error(502),
    error(503),
    error(504),
    error(408),
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.ReadError,
    httpx.RemoteProtocolError,
    httpx.PoolTimeout,
    httpx.Response(200, text="<html>gateway</html>"),  # malformed JSON
    httpx.Response(200, json=[1, 2]),  # JSON, not an object
    httpx.Response(200, json={"task": None}),  # an object, not a task result
    httpx.Response(200, json={"code": 5, "msg": "host unavailable"}),  # envelope 503
]


@pytest.mark.parametrize("failure", GET_TRANSIENT)
async def test_get_is_retried_on_transient_failures(api: respx.MockRouter, failure: Any) -> None:
    route = api.get(RESULT).mock(side_effect=[failure, ok_result()])
    client, sleeps = make_client()
    async with client:
        result = await client.get_task_result(TASK_ID)
    assert result.task_id == TASK_ID
    assert route.call_count == 2
    assert len(sleeps) == 1


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (error(429, "RATE_LIMIT_EXCEEDED"), RateLimitError),
        (error(500), ServerError),
        (error(503), ServerError),
        (httpx.ConnectError, APIConnectionError),
        (httpx.ReadTimeout, APITimeoutError),
        (httpx.Response(200, text="not json"), MalformedResponseError),
    ],
)
async def test_get_gives_up_after_max_retries(
    api: respx.MockRouter, failure: Any, expected: type[Exception]
) -> None:
    route = api.get(RESULT).mock(side_effect=[failure] * 10)
    client, sleeps = make_client(max_retries=2)
    async with client:
        with pytest.raises(expected) as caught:
            await client.get_task_result(TASK_ID)
    assert type(caught.value) is expected
    assert route.call_count == 3
    assert len(sleeps) == 2


async def test_connect_error_is_not_a_timeout(api: respx.MockRouter) -> None:
    api.get(RESULT).mock(side_effect=httpx.ConnectError)
    client, _ = make_client(max_retries=0)
    async with client:
        with pytest.raises(APIConnectionError) as caught:
            await client.get_task_result(TASK_ID)
    assert not isinstance(caught.value, APITimeoutError)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize(
    "failure",
    [
        error(400, "INVALID_REQUEST_BODY"),
        error(401),
        error(403, "INVALID_API_KEY"),
        error(404, "TASK_NOT_FOUND"),
        error(500, "TASK_FAILED"),  # terminal, not transient
    ],
)
async def test_get_is_not_retried_on_definite_errors(api: respx.MockRouter, failure: Any) -> None:
    route = api.get(RESULT).mock(side_effect=[failure, ok_result()])
    client, sleeps = make_client()
    async with client:
        with pytest.raises(APIStatusError):
            await client.get_task_result(TASK_ID)
    assert route.call_count == 1
    assert sleeps == []


async def test_get_honours_retry_after(api: respx.MockRouter) -> None:
    api.get(RESULT).mock(
        side_effect=[error(429, "RATE_LIMIT_EXCEEDED", **{"Retry-After": "2"}), ok_result()]
    )
    client, sleeps = make_client(
        retry_policy=RetryPolicy(initial_backoff=100, max_backoff=100, max_retry_after=10)
    )
    async with client:
        await client.get_task_result(TASK_ID)
    assert sleeps == [2.0]


async def test_get_retry_after_is_capped(api: respx.MockRouter) -> None:
    api.get(RESULT).mock(
        side_effect=[error(429, "RATE_LIMIT_EXCEEDED", **{"Retry-After": "3600"}), ok_result()]
    )
    client, sleeps = make_client(retry_policy=RetryPolicy(max_retry_after=1.5))
    async with client:
        await client.get_task_result(TASK_ID)
    assert sleeps == [1.5]


async def test_get_retry_after_as_http_date_on_503(api: respx.MockRouter) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    api.get(RESULT).mock(side_effect=[error(503, **{"Retry-After": when}), ok_result()])
    client, sleeps = make_client(retry_policy=RetryPolicy(max_retry_after=120))
    async with client:
        await client.get_task_result(TASK_ID)
    assert len(sleeps) == 1
    assert 25.0 <= sleeps[0] <= 31.0


async def test_get_backoff_grows_exponentially(
    api: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    api.get(RESULT).mock(side_effect=[error(502)] * 4 + [ok_result()])
    client, sleeps = make_client(
        retry_policy=RetryPolicy(max_retries=4, initial_backoff=0.25, max_backoff=1.0)
    )
    async with client:
        await client.get_task_result(TASK_ID)
    assert sleeps == [0.25, 0.5, 1.0, 1.0]


async def test_max_retries_zero_means_one_attempt(api: respx.MockRouter) -> None:
    route = api.get(RESULT).mock(side_effect=[error(503), ok_result()])
    client, sleeps = make_client(max_retries=0)
    async with client:
        with pytest.raises(ServerError):
            await client.get_task_result(TASK_ID)
    assert route.call_count == 1
    assert sleeps == []


async def test_max_retries_argument_builds_the_policy(api: respx.MockRouter) -> None:
    route = api.get(RESULT).mock(side_effect=[error(503)] * 5)
    client = AsyncNovita(api_key=KEY, max_retries=1, transport=httpx.AsyncHTTPTransport())
    client._transport.sleep = lambda _delay: anyio.lowlevel.checkpoint()
    async with client:
        with pytest.raises(ServerError):
            await client.get_task_result(TASK_ID)
    assert route.call_count == 2


# --------------------------------------------------------------------------- POST retries


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError,
        httpx.ConnectTimeout,
        httpx.PoolTimeout,
        error(429, "RATE_LIMIT_EXCEEDED"),
        error(503),
        httpx.Response(200, json={"code": 5, "msg": "host unavailable"}),  # envelope 503
    ],
)
async def test_post_is_retried_where_no_task_was_created(
    api: respx.MockRouter, failure: Any
) -> None:
    route = api.post(SUBMIT).mock(side_effect=[failure, ok_submit()])
    client, sleeps = make_client()
    async with client:
        assert await client.submit_txt2img(REQUEST, EXTRA) == TASK_ID
    assert route.call_count == 2
    assert len(sleeps) == 1
    first, second = (call.request for call in route.calls)
    assert first.content == second.content  # the same body, sent again


async def test_post_honours_retry_after(api: respx.MockRouter) -> None:
    api.post(SUBMIT).mock(
        side_effect=[error(429, "RATE_LIMIT_EXCEEDED", **{"Retry-After": "4"}), ok_submit()]
    )
    client, sleeps = make_client()
    async with client:
        await client.submit_txt2img(REQUEST)
    assert sleeps == [4.0]


@pytest.mark.parametrize(
    ("failure", "expected", "sent"),
    [
        (error(503), ServerError, 3),
        # 429s have their own budget (RATE_LIMIT_ATTEMPTS answers): each slows the pacing down.
        (error(429, "RATE_LIMIT_EXCEEDED"), RateLimitError, RATE_LIMIT_ATTEMPTS),
        (httpx.ConnectError, APIConnectionError, 3),
        (httpx.ConnectTimeout, APITimeoutError, 3),
    ],
)
async def test_post_gives_up_with_the_last_definite_error(
    api: respx.MockRouter, failure: Any, expected: type[Exception], sent: int
) -> None:
    route = api.post(SUBMIT).mock(side_effect=[failure] * 20)
    client, sleeps = make_client(max_retries=2)
    async with client:
        with pytest.raises(expected) as caught:
            await client.submit_txt2img(REQUEST)
    assert not isinstance(caught.value, SubmissionUncertainError)
    assert route.call_count == sent
    assert len(sleeps) == sent - 1


async def test_post_429_with_a_client_rate_limiter_is_paced_by_it(
    api: respx.MockRouter,
) -> None:
    route = api.post(SUBMIT).mock(
        side_effect=[error(429, "RATE_LIMIT_EXCEEDED", **{"Retry-After": "1"}), ok_submit()]
    )
    limiter = WeightedRateLimiter(None, max_pause=0.05)
    client, sleeps = make_client(rate_limiter=limiter)
    async with client:
        assert await client.submit_txt2img(REQUEST) == TASK_ID
    assert route.call_count == 2
    assert sleeps == [0.0]  # no backoff of its own: the limiter paused (Retry-After, capped)
    assert limiter.rate_limited == 1
    assert limiter.per_minute is not None  # it slowed down from unpaced


UNCERTAIN: list[tuple[Any, type[Exception]]] = [
    (httpx.ReadTimeout, APITimeoutError),
    (httpx.WriteTimeout, APITimeoutError),
    (httpx.ReadError, APIConnectionError),  # connection reset while waiting
    (httpx.WriteError, APIConnectionError),
    (httpx.RemoteProtocolError, APIConnectionError),  # server hung up
    (error(500, "CREATE_TASK_FAILED"), ServerError),
    (error(502), ServerError),
    (error(504), ServerError),
    (httpx.Response(200, text="<html>oops</html>"), MalformedResponseError),
    (httpx.Response(200, content=b"\xff\xfe\x00"), MalformedResponseError),
    (httpx.Response(200, json=[]), MalformedResponseError),
    (httpx.Response(200, json={}), MalformedResponseError),
    (httpx.Response(200, json={"task_id": ""}), MalformedResponseError),
    (httpx.Response(200, json={"code": 0, "msg": "", "data": {}}), MalformedResponseError),
    (httpx.Response(201, json={"taskId": "camelCase"}), MalformedResponseError),
]


@pytest.mark.parametrize(("failure", "cause_type"), UNCERTAIN)
async def test_post_is_not_retried_after_an_ambiguous_failure(
    api: respx.MockRouter, failure: Any, cause_type: type[Exception]
) -> None:
    route = api.post(SUBMIT).mock(side_effect=[failure, ok_submit()])
    client, sleeps = make_client(max_retries=5)
    async with client:
        with pytest.raises(SubmissionUncertainError) as caught:
            await client.submit_txt2img(REQUEST, EXTRA)
    err = caught.value
    assert route.call_count == 1  # never a silent second charge
    assert sleeps == []
    assert err.request is REQUEST
    assert err.extra is EXTRA
    assert type(err.cause) is cause_type
    assert err.__cause__ is err.cause
    assert isinstance(err, NovitaError)
    assert "not retried" in str(err)


async def test_post_uncertain_after_earlier_safe_retries(api: respx.MockRouter) -> None:
    route = api.post(SUBMIT).mock(side_effect=[httpx.ConnectError, error(503), httpx.ReadTimeout])
    client, sleeps = make_client(max_retries=5)
    async with client:
        with pytest.raises(SubmissionUncertainError):
            await client.submit_txt2img(REQUEST)
    assert route.call_count == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_post_4xx_is_not_retried(api: respx.MockRouter, status: int) -> None:
    route = api.post(SUBMIT).mock(side_effect=[error(status), ok_submit()])
    client, sleeps = make_client()
    async with client:
        with pytest.raises(APIStatusError) as caught:
            await client.submit_txt2img(REQUEST)
    assert not isinstance(caught.value, SubmissionUncertainError)
    assert caught.value.status_code == status
    assert route.call_count == 1
    assert sleeps == []


# --------------------------------------------------------------------------- key secrecy

ECHO = f"invalid key {KEY}"


async def test_key_never_in_repr_errors_or_logs(
    api: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api.route(host="img.test").mock(return_value=httpx.Response(200, content=b"img"))
    submit = api.post(SUBMIT)
    result = api.get(RESULT)
    client, _ = make_client(max_retries=2)
    raised: list[BaseException] = []
    async with client:
        assert_no_key(client, vars(client), client._transport)
        scenarios: list[tuple[Any, Any, str]] = [
            (submit, error(401, "INVALID_API_KEY", ECHO), "submit"),
            (submit, error(403, "INVALID_API_KEY", ECHO), "submit"),
            (
                submit,
                httpx.Response(400, json={"reason": "X", "message": "m", "metadata": {"k": KEY}}),
                "submit",
            ),
            (submit, error(500, "CREATE_TASK_FAILED", ECHO), "submit"),
            (submit, httpx.Response(200, text=f"<html>{KEY}</html>"), "submit"),
            (submit, httpx.Response(200, json={"code": 4, "msg": ECHO}), "submit"),
            (submit, httpx.ReadTimeout, "submit"),
            (submit, [error(503, "", ECHO)] * 3, "submit"),
            (result, [error(502, "", ECHO)] * 3, "result"),
            (result, [httpx.Response(200, text=ECHO)] * 3, "result"),
            (result, httpx.Response(200, json={"task": {"task_id": {"k": KEY}}}), "result"),
            (result, [httpx.ConnectError] * 3, "result"),
        ]
        for route, effect, kind in scenarios:
            route.mock(side_effect=effect if isinstance(effect, list) else [effect] * 3)
            call = (
                client.submit_txt2img(REQUEST, EXTRA)
                if kind == "submit"
                else client.get_task_result(TASK_ID)
            )
            with pytest.raises(NovitaError) as caught:
                await call
            raised.append(caught.value)
        image = await client._transport.http.send(
            client._transport.build("GET", "https://img.test/a")
        )
        assert image.status_code == 200
    assert len(raised) == len(scenarios)
    for exc in raised:
        for link in error_chain(exc):
            assert_no_key(link, *getattr(link, "args", ()))
            for name in ("message", "body", "metadata"):
                assert KEY not in json.dumps(getattr(link, name, ""), default=str)
    assert "[REDACTED]" in str(raised[0])
    assert caplog.records  # logging really was captured (retries, httpx)
    assert KEY not in caplog.text
    for record in caplog.records:
        assert KEY not in record.getMessage()


async def test_api_key_from_environment(
    api: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    route = api.get(RESULT).mock(return_value=ok_result())
    monkeypatch.setenv("NOVITA_API_KEY", "env_key_abcdef")
    async with AsyncNovita(transport=httpx.AsyncHTTPTransport()) as client:
        await client.get_task_result(TASK_ID)
    assert route.calls.last.request.headers["Authorization"] == "Bearer env_key_abcdef"
    async with AsyncNovita(api_key=KEY, transport=httpx.AsyncHTTPTransport()) as explicit:
        await explicit.get_task_result(TASK_ID)
    assert route.calls.last.request.headers["Authorization"] == f"Bearer {KEY}"


def test_missing_api_key_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOVITA_API_KEY", raising=False)
    with pytest.raises(NovitaError, match="NOVITA_API_KEY"):
        AsyncNovita()
    with pytest.raises(NovitaError):
        AsyncNovita(api_key="")
    monkeypatch.setenv("NOVITA_API_KEY", "   ")
    with pytest.raises(NovitaError):
        AsyncNovita()


@pytest.mark.parametrize("bad", ["key with space", "kéy", "key\nnewline", 42])
def test_unusable_api_keys_are_rejected_without_echoing_them(bad: Any) -> None:
    with pytest.raises(NovitaError) as caught:
        AsyncNovita(api_key=bad)
    assert str(bad) not in str(caught.value)


async def test_api_key_is_stripped(api: respx.MockRouter) -> None:
    route = api.get(RESULT).mock(return_value=ok_result())
    async with AsyncNovita(api_key=f"  {KEY}\n", transport=httpx.AsyncHTTPTransport()) as client:
        await client.get_task_result(TASK_ID)
    assert route.calls.last.request.headers["Authorization"] == f"Bearer {KEY}"


# --------------------------------------------------------------------------- lifecycle


async def test_async_with_closes_an_owned_client(api: respx.MockRouter) -> None:
    route = api.get(RESULT).mock(return_value=ok_result())
    client, _ = make_client()
    async with client as entered:
        assert entered is client
        await client.get_task_result(TASK_ID)
    assert client._transport.http.is_closed
    assert client.is_closed
    await client.aclose()  # idempotent
    with pytest.raises(RuntimeError):
        await client.get_task_result(TASK_ID)
    with pytest.raises(RuntimeError):
        await client.submit_txt2img(REQUEST)
    assert route.call_count == 1


async def test_aclose_without_context_manager(api: respx.MockRouter) -> None:
    client, _ = make_client()
    await client.aclose()
    assert client._transport.http.is_closed


async def test_no_cookie_an_answer_sets_is_ever_sent(anyio_backend: str) -> None:
    """API calls (sent straight to the owned client's transport, past httpx's cookie
    jar) and image downloads (through the owned httpx client) never send a cookie."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        cookie = {"Set-Cookie": "session=tracked; Path=/"}
        if request.url.path == RESULT:
            return httpx.Response(200, json=SPEC_RESULT_BODY, headers=cookie)
        return httpx.Response(200, content=b"\x89PNG....", headers=cookie)

    async with AsyncNovita(api_key=KEY, transport=httpx.MockTransport(handler)) as client:
        for _ in range(2):
            await client.get_task_result(TASK_ID)
        for _ in range(2):
            await client.download_image(f"{API}/files/image.png")
            await client.download_image("https://images.example/out.png")
    assert len(seen) == 6
    assert all("cookie" not in request.headers for request in seen)


async def test_user_http_client_is_used_and_left_open(api: respx.MockRouter) -> None:
    route = api.post(SUBMIT).mock(return_value=ok_submit())
    async with httpx.AsyncClient(timeout=httpx.Timeout(9.0)) as user_client:
        client, _ = make_client(http_client=user_client)
        async with client:
            await client.submit_txt2img(REQUEST)
        assert client._transport.http is user_client
        assert not user_client.is_closed
        assert route.calls.last.request.extensions["timeout"] == httpx.Timeout(9.0).as_dict()
        assert route.calls.last.request.headers["Authorization"] == f"Bearer {KEY}"
        # still usable by its owner
        assert (await user_client.post(API + SUBMIT, json={})).status_code == 200


@pytest.mark.parametrize("timeout", [2.0, None])
async def test_user_http_client_honours_an_explicit_timeout(
    api: respx.MockRouter, timeout: float | None
) -> None:
    route = api.get(RESULT).mock(return_value=ok_result())
    async with httpx.AsyncClient(timeout=httpx.Timeout(9.0)) as user_client:
        client, _ = make_client(http_client=user_client, timeout=timeout)
        async with client:
            await client.get_task_result(TASK_ID)
        assert not user_client.is_closed  # borrowed, never closed by us
    assert route.calls.last.request.extensions["timeout"] == httpx.Timeout(timeout).as_dict()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, httpx.Timeout(60.0, connect=10.0)),  # the documented default
        ({"timeout": 3.0}, httpx.Timeout(3.0)),
        ({"timeout": httpx.Timeout(3.0, connect=1.0)}, httpx.Timeout(3.0, connect=1.0)),
        ({"timeout": None}, httpx.Timeout(None)),  # none at all, as in httpx
    ],
)
async def test_owned_client_timeout(
    api: respx.MockRouter, given: dict[str, Any], expected: httpx.Timeout
) -> None:
    route = api.get(RESULT).mock(return_value=ok_result())
    client, _ = make_client(**given)
    async with client:
        await client.get_task_result(TASK_ID)
    assert route.calls.last.request.extensions["timeout"] == expected.as_dict()


def test_http_client_and_transport_are_exclusive() -> None:
    with pytest.raises(ValueError, match="http_client"):
        AsyncNovita(
            api_key=KEY,
            http_client=httpx.AsyncClient(),
            transport=httpx.MockTransport(lambda r: httpx.Response(200)),
        )


# --------------------------------------------------------------------------- real sockets


class _Loopback:
    """A tiny HTTP/1.1 server: one request per connection, scripted behaviours."""

    def __init__(self, behaviours: list[Any]) -> None:
        self.behaviours = behaviours
        self.requests: list[bytes] = []

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
                head, _, body = data.partition(b"\r\n\r\n")
                match = re.search(rb"content-length:\s*(\d+)", head, re.IGNORECASE)
                length = int(match.group(1)) if match else 0
                while len(body) < length:
                    body += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            self.requests.append(head)
            behaviour = self.behaviours.pop(0) if self.behaviours else "close"
            if behaviour == "hang":
                await anyio.sleep_forever()
            elif isinstance(behaviour, bytes):
                await stream.send(behaviour)
            # "close": hang up without answering


def _http(status: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload


@contextlib.asynccontextmanager
async def loopback(behaviours: list[Any]) -> AsyncIterator[tuple[str, _Loopback]]:
    server = _Loopback(behaviours)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.start_soon(listener.serve, server.handle)
        try:
            yield f"http://127.0.0.1:{port}", server
        finally:
            tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("behaviour", "cause_type"),
    [("hang", APITimeoutError), ("close", APIConnectionError)],
)
async def test_real_socket_post_not_retried_after_read_timeout_or_hangup(
    behaviour: str, cause_type: type[Exception]
) -> None:
    async with loopback([behaviour] * 5) as (url, server):
        client, sleeps = make_client(max_retries=3, base_url=url, timeout=httpx.Timeout(0.5))
        async with client:
            with pytest.raises(SubmissionUncertainError) as caught:
                await client.submit_txt2img(REQUEST)
    assert type(caught.value.cause) is cause_type
    assert len(server.requests) == 1  # the server saw exactly one POST
    assert sleeps == []


async def test_real_socket_get_retried_and_logs_keep_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    behaviours: list[Any] = [
        _http("503 Service Unavailable", {"reason": "SERVICE_NOT_AVAILABLE", "message": ECHO}),
        "close",
        _http("200 OK", SPEC_RESULT_BODY),
    ]
    async with loopback(behaviours) as (url, server):
        client, sleeps = make_client(max_retries=3, base_url=url, timeout=httpx.Timeout(2.0))
        async with client:
            result = await client.get_task_result(TASK_ID)
    assert result.extra.seed == 392212448
    assert len(server.requests) == 3
    assert len(sleeps) == 2
    assert f"authorization: bearer {KEY}".encode() in server.requests[0].lower()
    assert any(record.name.startswith("httpcore") for record in caplog.records)
    assert KEY not in caplog.text


async def test_real_socket_connect_refused_post_is_retried() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client, sleeps = make_client(max_retries=2, base_url=f"http://127.0.0.1:{port}")
    async with client:
        with pytest.raises(APIConnectionError) as caught:
            await client.submit_txt2img(REQUEST)
    assert not isinstance(caught.value, SubmissionUncertainError)
    assert len(sleeps) == 2  # nothing was sent, so retrying was safe
