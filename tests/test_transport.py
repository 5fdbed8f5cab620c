"""Transport internals: backoff, Retry-After, status mapping, signing, timeouts, the secret."""

from __future__ import annotations

import email.utils
import json
import pickle
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from novita_async import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    InsufficientBalanceError,
    MalformedResponseError,
    NotFoundError,
    NovitaError,
    PermissionDeniedError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    _transport,
)
from novita_async._transport import (
    DEFAULT_TIMEOUT,
    NOT_GIVEN,
    Transport,
    _Secret,
    parse_retry_after,
    status_error,
)
from novita_async._version import __version__

KEY = "sk_test_0123456789abcdef"
API = "https://api.novita.ai"


def read(response: httpx.Response) -> Any:
    """What the request loop makes of an answer it has read whole."""
    return _transport._read(response, response.content)


def make_transport(**overrides: Any) -> Transport:
    options: dict[str, Any] = {
        "api_key": KEY,
        "base_url": API,
        "timeout": NOT_GIVEN,
        "retry": RetryPolicy(),
        "http_client": None,
        "transport": None,
        "max_connections": 4,
    }
    options.update(overrides)
    return Transport(**options)


@pytest_asyncio.fixture
async def transport() -> AsyncIterator[Transport]:
    t = make_transport()
    yield t
    await t.aclose()


def response(
    status: int,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    path: str = "/v3/async/txt2img",
) -> httpx.Response:
    content = (
        body if isinstance(body, (str, bytes)) else json.dumps(body) if body is not None else ""
    )
    return httpx.Response(
        status,
        content=content,
        headers=headers,
        request=httpx.Request(method, API + path),
    )


# --------------------------------------------------------------------------- RetryPolicy


def test_backoff_is_exponential_capped_and_fully_jittered(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=3.0)
    bounds: list[tuple[float, float]] = []

    def fake_uniform(low: float, high: float) -> float:
        bounds.append((low, high))
        return high

    monkeypatch.setattr(random, "uniform", fake_uniform)
    assert [policy.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert all(low == 0 for low, _ in bounds)  # full jitter: anywhere from zero
    assert policy.delay(10_000) == 3.0  # no overflow for huge attempt numbers


def test_backoff_jitter_stays_within_bounds() -> None:
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=4.0)
    samples = [policy.delay(2) for _ in range(200)]
    assert all(0 <= s <= 4.0 for s in samples)
    assert len(set(samples)) > 1  # actually random


def test_retry_after_wins_but_is_capped() -> None:
    policy = RetryPolicy(initial_backoff=100.0, max_backoff=100.0, max_retry_after=5.0)
    assert policy.delay(0, retry_after=2.0) == 2.0
    assert policy.delay(0, retry_after=0.0) == 0.0
    assert policy.delay(0, retry_after=3600.0) == 5.0
    assert policy.delay(0, retry_after=-4.0) == 0.0


def test_non_finite_retry_after_falls_back_to_backoff() -> None:
    policy = RetryPolicy(initial_backoff=0.0, max_backoff=0.0)
    assert policy.delay(0, retry_after=float("nan")) == 0.0
    assert policy.delay(0, retry_after=float("inf")) == 0.0


@pytest.mark.parametrize(
    "field", ["max_retries", "initial_backoff", "max_backoff", "max_retry_after"]
)
def test_retry_policy_rejects_negative_values(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**{field: -1})


# --------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("2", 2.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        ("-3", 0.0),
        ("nan", None),
        ("inf", None),
        ("", None),
        (None, None),
        ("soon", None),
    ],
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


@pytest.fixture
def non_utc_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Naive datetimes must not be read as local time: make local time differ from UTC."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    "header",
    [
        "Wed, 21 Oct 2015 07:28:30 GMT",
        "Wed, 21 Oct 2015 07:28:30 -0000",  # parsed as a naive datetime
        "Wed, 21 Oct 2015 07:28:30",  # no zone at all
        "Wed, 21 Oct 2015 09:28:30 +0200",
    ],
)
def test_retry_after_http_date(header: str, non_utc_local_time: None) -> None:
    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    assert parse_retry_after(header, now=now) == pytest.approx(30.0)
    assert parse_retry_after(header, now=now + 3600) == 0.0  # in the past


def test_retry_after_http_date_against_the_real_clock() -> None:
    soon = email.utils.formatdate(timeval=None, usegmt=True)
    delay = parse_retry_after(soon)
    assert delay is not None
    assert 0.0 <= delay <= 1.0


# --------------------------------------------------------------------------- status mapping


@pytest.mark.parametrize(
    ("status", "reason", "cls"),
    [
        (400, "INVALID_REQUEST_BODY", BadRequestError),
        (400, "ILLEGAL_PROMPT", BadRequestError),
        (400, "MISSING_API_KEY", AuthenticationError),
        (400, "BILLING_BALANCE_NOT_ENOUGH", InsufficientBalanceError),
        (403, "NOT_ENOUGH_BALANCE", InsufficientBalanceError),
        (401, "", AuthenticationError),
        (401, "FAILED_TO_AUTH", AuthenticationError),
        (403, "INVALID_API_KEY", AuthenticationError),
        (403, "FEATURE_NOT_ALLOWED", PermissionDeniedError),
        (403, "API_NOT_ALLOWED", PermissionDeniedError),
        (403, "NEED_REAL_NAME_VERIFY", PermissionDeniedError),
        (403, "BILLING_AUTH_FAILED", PermissionDeniedError),
        (404, "TASK_NOT_FOUND", NotFoundError),
        (404, "API_NOT_FOUND", NotFoundError),
        (429, "RATE_LIMIT_EXCEEDED", RateLimitError),
        (500, "CREATE_TASK_FAILED", ServerError),
        (500, "TASK_FAILED", ServerError),
        (502, "", ServerError),
        (503, "SERVICE_NOT_AVAILABLE", ServerError),
        (504, "", ServerError),
        (409, "CONFLICT", APIStatusError),
    ],
)
def test_status_error_mapping(status: int, reason: str, cls: type[APIStatusError]) -> None:
    body = {"code": status, "reason": reason, "message": "human text", "metadata": {"k": "v"}}
    error = status_error(response(status, body))
    assert type(error) is cls
    assert isinstance(error, APIStatusError)
    assert isinstance(error, NovitaError)
    assert error.status_code == status
    assert error.reason == reason
    assert error.message == "human text"
    assert error.metadata == {"k": "v"}
    assert json.loads(error.body) == body
    assert error.code == status
    assert error.method == "POST"
    assert error.path == "/v3/async/txt2img"
    assert error.envelope is False
    assert f"HTTP {status}" in str(error)
    assert "human text" in str(error)


def test_insufficient_balance_is_a_bad_request() -> None:
    assert issubclass(InsufficientBalanceError, BadRequestError)


def test_status_error_without_json_body_uses_text_or_reason_phrase() -> None:
    html = status_error(response(502, "<html>Bad Gateway</html>"))
    assert type(html) is ServerError
    assert html.message == "<html>Bad Gateway</html>"
    assert html.reason == ""
    assert html.code is None
    empty = status_error(response(503, ""))
    assert empty.message == "Service Unavailable"


def test_rate_limit_error_carries_retry_after() -> None:
    error = status_error(
        response(429, {"reason": "RATE_LIMIT_EXCEEDED"}, headers={"Retry-After": "7"})
    )
    assert isinstance(error, RateLimitError)
    assert error.retry_after == 7.0
    assert status_error(response(429, {})).retry_after is None


def test_status_error_is_robust_to_odd_responses() -> None:
    bare = status_error(httpx.Response(500, content=b"x"))  # no request attached
    assert bare.method == ""
    assert bare.path == ""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"never read"

    streamed = httpx.Response(500, content=chunks(), request=httpx.Request("GET", API))
    assert status_error(streamed).body == ""


def test_api_status_errors_pickle() -> None:
    error = status_error(
        response(429, {"reason": "RATE_LIMIT_EXCEEDED"}, headers={"Retry-After": "3"})
    )
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is RateLimitError
    assert clone.retry_after == 3.0
    assert str(clone) == str(error)


# --------------------------------------------------------------------------- 2xx bodies


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
def test_2xx_envelope_with_nonzero_code_is_an_error(
    body: dict[str, Any], cls: type[APIStatusError], status: int, reason: str
) -> None:
    with pytest.raises(APIStatusError) as caught:
        read(response(200, body))
    error = caught.value
    assert type(error) is cls
    assert error.status_code == status
    assert error.reason == reason
    assert error.envelope is True
    assert error.code == body["code"]
    assert "envelope" in str(error)


@pytest.mark.parametrize(
    "body",
    [
        {"task_id": "t"},
        {"code": 0, "msg": "", "data": {"task_id": "t"}},
        {"code": 200, "data": {"task_id": "t"}},
        [],
        "text",
        None,
    ],
)
def test_2xx_json_without_error_code_is_returned(body: Any) -> None:
    assert read(response(200, json.dumps(body))) == body


@pytest.mark.parametrize("content", [b"", b"<html>", b"{'single': 'quotes'}", b"\xff\xfe", b"{"])
def test_2xx_non_json_is_malformed(content: bytes) -> None:
    with pytest.raises(MalformedResponseError):
        read(response(200, content))


# --------------------------------------------------------------------------- signing


@pytest.mark.asyncio
async def test_only_api_origin_is_signed(transport: Transport) -> None:
    signed = transport.build("GET", "/v3/async/task-result", params={"task_id": "t"})
    assert signed.headers["Authorization"] == f"Bearer {KEY}"
    assert signed.url == httpx.URL(API + "/v3/async/task-result?task_id=t")
    for url in [
        "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/prod/x.jpeg",
        "http://api.novita.ai/v3/async/task-result",  # other scheme
        "https://api.novita.ai:8443/v3/async/task-result",  # other port
        "https://api.novita.ai.evil.test/v3/async/task-result",  # lookalike host
        "https://evil.test/?next=https://api.novita.ai/",
    ]:
        request = transport.build("GET", url)
        assert "Authorization" not in request.headers, url
        assert request.url == httpx.URL(url)


@pytest.mark.asyncio
async def test_headers_name_the_library(transport: Transport) -> None:
    request = transport.build("POST", "/v3/async/txt2img", json_body={"a": 1})
    assert f"novita-async/{__version__}" in request.headers["User-Agent"]
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {"a": 1}
    get = transport.build("GET", "/v3/async/task-result")
    assert get.headers["Content-Type"] == "application/json"  # "required" even on GET


@pytest.mark.asyncio
async def test_base_url_with_path_prefix() -> None:
    t = make_transport(base_url="http://127.0.0.1:8080/proxy/")
    try:
        request = t.build("POST", "/v3/async/txt2img")
        assert request.url == httpx.URL("http://127.0.0.1:8080/proxy/v3/async/txt2img")
        assert "Authorization" in request.headers
    finally:
        await t.aclose()


@pytest.mark.parametrize("base_url", ["api.novita.ai", "ftp://api.novita.ai", "/v3"])
def test_base_url_must_be_absolute_http(base_url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        make_transport(base_url=base_url)


# --------------------------------------------------------------------------- timeouts


@pytest.mark.asyncio
async def test_owned_client_timeouts() -> None:
    for given, expected in [
        (DEFAULT_TIMEOUT, DEFAULT_TIMEOUT),
        (5.0, httpx.Timeout(5.0)),
        (httpx.Timeout(3.0, connect=1.0), httpx.Timeout(3.0, connect=1.0)),
        (None, httpx.Timeout(None)),
    ]:
        t = make_transport(timeout=given)
        try:
            assert t.http.timeout == expected
            request = t.build("GET", "/x")
            assert request.extensions["timeout"] == expected.as_dict()
        finally:
            await t.aclose()


@pytest.mark.asyncio
async def test_user_http_client_keeps_its_timeout_unless_one_is_given() -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(11.0)) as user_client:
        kept = make_transport(http_client=user_client)
        assert kept.build("GET", "/x").extensions["timeout"] == httpx.Timeout(11.0).as_dict()
        given = make_transport(http_client=user_client, timeout=2.5)
        assert given.build("GET", "/x").extensions["timeout"] == httpx.Timeout(2.5).as_dict()
        unlimited = make_transport(http_client=user_client, timeout=None)
        assert unlimited.build("GET", "/x").extensions["timeout"] == httpx.Timeout(None).as_dict()
        await given.aclose()
        assert not user_client.is_closed  # borrowed, never closed by us


@pytest.mark.asyncio
async def test_owned_client_is_closed() -> None:
    t = make_transport()
    http = t.http
    await t.aclose()
    assert http.is_closed


# --------------------------------------------------------------------------- the secret


def test_secret_never_shows_itself() -> None:
    secret = _Secret(KEY)
    assert KEY not in repr(secret)
    assert KEY not in str(secret)
    assert KEY not in f"{secret}"
    assert secret.reveal() == KEY
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_secret_redacts_nested_values_and_errors() -> None:
    secret = _Secret(KEY)
    assert secret.redact({"a": [f"x{KEY}y", (KEY,)], KEY: 1}) == {
        "a": ["x[REDACTED]y", ("[REDACTED]",)],
        "[REDACTED]": 1,
    }
    error = status_error(
        response(
            401,
            {"reason": "INVALID_API_KEY", "message": f"bad key {KEY}", "metadata": {"key": KEY}},
        )
    )
    assert KEY in str(error)
    secret.scrub(error)
    for text in (str(error), repr(error), error.message, error.body, json.dumps(error.metadata)):
        assert KEY not in text
    assert "[REDACTED]" in error.message


@pytest.mark.asyncio
async def test_transport_repr_and_vars_hide_the_key(transport: Transport) -> None:
    assert KEY not in repr(transport)
    assert KEY not in repr(vars(transport))


@pytest.mark.parametrize(
    "bad",
    ["", "   ", "key with space", "kéy", "key\nnewline", 42, None],
)
def test_unusable_api_keys_are_rejected_without_echoing_them(bad: Any) -> None:
    with pytest.raises(NovitaError) as caught:
        make_transport(api_key=bad)
    if isinstance(bad, str) and bad.strip():
        assert bad not in str(caught.value)


@pytest.mark.asyncio
async def test_api_key_is_stripped() -> None:
    t = make_transport(api_key=f"  {KEY}\n")
    try:
        assert t.build("GET", "/x").headers["Authorization"] == f"Bearer {KEY}"
    finally:
        await t.aclose()
