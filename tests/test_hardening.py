"""Hostile answers on the engine's paths (issue #10): unparseable POST answers are
uncertain (never paid again), oversized answers are malformed, answers about another
task are malformed, and 429s on polls do not throttle submissions."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import respx
from _support import MODEL, RESULT, SUBMIT

from novita_async import (
    AsyncNovita,
    Journal,
    MalformedResponseError,
    RetryPolicy,
    SubmissionUncertainError,
    Txt2ImgRequest,
    WeightedRateLimiter,
)
from novita_async.testing import NovitaEmulator

pytestmark = pytest.mark.anyio

REQUEST = Txt2ImgRequest(model_name=MODEL, prompt="a hostile cat")
NESTED = ("[" * 100_000 + "]" * 100_000).encode()


def client(**kwargs: object) -> AsyncNovita:
    policy = RetryPolicy(max_retries=2, initial_backoff=0.0, max_backoff=0.0)
    return AsyncNovita(  # respx mocks httpx's own transport
        "sk_test_hardening",
        retry_policy=policy,
        transport=httpx.AsyncHTTPTransport(),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("status", [200, 500])
@pytest.mark.parametrize("content", [NESTED, b"<html>gateway</html>", b'{"task_id": '])
async def test_a_post_answer_that_cannot_be_read_is_uncertain_never_resent(
    api: respx.MockRouter, status: int, content: bytes
) -> None:
    route = api.post(SUBMIT).mock(return_value=httpx.Response(status, content=content))
    async with client() as novita:
        with pytest.raises(SubmissionUncertainError):
            await novita.submit_txt2img(REQUEST)
    assert route.call_count == 1


async def test_deeply_nested_200_is_journaled_uncertain_not_rejected(
    api: respx.MockRouter, tmp_path: Path
) -> None:
    db = tmp_path / "batch.db"
    api.post(SUBMIT).mock(return_value=httpx.Response(200, content=NESTED))
    async with client() as novita:
        [item] = await novita.txt2img_all([REQUEST], journal=db)
    assert isinstance(item.error, SubmissionUncertainError)
    with Journal(db, read_only=True) as journal:
        [record] = journal.records()
    assert record.state == "uncertain"  # a rerun reports it instead of paying again


@pytest.mark.parametrize("declared", [True, False])
async def test_an_oversized_answer_is_malformed(api: respx.MockRouter, declared: bool) -> None:
    big = b'{"task": {"task_id": "t", "reason": "' + b"x" * (9 * 1024 * 1024) + b'"}}'

    async def stream() -> object:
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    headers = {"content-length": str(len(big))} if declared else {}
    route = api.get(RESULT).mock(
        side_effect=lambda request: httpx.Response(
            200,
            headers=headers,
            content=big if declared else stream(),  # type: ignore[arg-type]
        )
    )
    async with client() as novita:
        with pytest.raises(MalformedResponseError, match="larger than"):
            await novita.get_task_result("t")
    assert route.call_count == 3  # retried like any malformed answer


async def test_an_answer_about_another_task_is_malformed(api: respx.MockRouter) -> None:
    other = {"task": {"task_id": "OTHER", "status": "TASK_STATUS_SUCCEED"}}
    mine = {"task": {"task_id": "T1", "status": "TASK_STATUS_SUCCEED"}}
    route = api.get(RESULT).mock(
        side_effect=[httpx.Response(200, json=other), httpx.Response(200, json=mine)]
    )
    async with client() as novita:
        result = await novita.get_task_result("T1")
    assert result.task_id == "T1"
    assert route.call_count == 2


async def test_429s_on_polls_do_not_throttle_submissions() -> None:
    emu = NovitaEmulator(durations=0.05)
    emu.fail_next("task-result", status=429, retry_after=0.05, times=20)
    limiter = WeightedRateLimiter(None)
    async with emu.client(rate_limiter=limiter) as novita:
        items = await novita.txt2img_all([REQUEST] * 20)
    assert all(item.ok for item in items)
    assert limiter.rate_limited == 0
    assert limiter.per_minute is None  # still unpaced
    assert emu.pending_faults("task-result") == 0
    assert emu.polls_total == 40  # the 20 refused polls were retried; POSTs never waited
