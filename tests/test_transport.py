"""Below the public API: RetryPolicy's backoff, Retry-After parsing, building status errors,
origin-only signing and the key's secrecy. What the client does with them (retries, error
mapping, headers, timeouts) is tested through AsyncNovita in test_client_core.py."""

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
from _support import API, KEY

from novita_async import (
    BadRequestError,
    InsufficientBalanceError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    _transport,
)
from novita_async._retry import parse_retry_after, status_error
from novita_async._transport import NOT_GIVEN, Transport, _Secret


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


@pytest.fixture
async def transport(anyio_backend: str) -> AsyncIterator[Transport]:
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


# --------------------------------------------------------------------------- signing


@pytest.mark.anyio
async def test_only_api_origin_is_signed(transport: Transport) -> None:
    """Defence in depth below the public API (downloads never sign at all): the key goes
    only to the API's exact origin, never to a lookalike host, port or scheme."""
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


ODD_TASK_IDS = ["t", "3f2a0c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b", "a b", "a/b?c=d&e#f", "%41+é", ""]


@pytest.mark.anyio
@pytest.mark.parametrize("replaceable", [True, False])
async def test_a_poll_url_is_what_httpx_would_build(
    transport: Transport, replaceable: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task-result URL takes its query without a new parse of the whole URL (where
    httpx allows it): the request is the one httpx builds itself, for any task id."""
    monkeypatch.setattr(_transport, "_QUERY_REPLACEABLE", replaceable)
    for task_id in ODD_TASK_IDS:
        built = transport.build("GET", "/v3/async/task-result", params={"task_id": task_id})
        expected = httpx.Request("GET", API + "/v3/async/task-result", params={"task_id": task_id})
        assert str(built.url) == str(expected.url), task_id
        assert built.url.params["task_id"] == task_id
        assert (built.url.raw_path, built.url.host) == (expected.url.raw_path, expected.url.host)
        assert built.headers["Authorization"] == f"Bearer {KEY}"
    # an absolute URL that has a query keeps it
    merged = transport.build("GET", API + "/v3/model?a=1", params={"b": "2"})
    assert merged.url.params.multi_items() == [("a", "1"), ("b", "2")]
    assert httpx.URL(API).host == merged.url.host


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
