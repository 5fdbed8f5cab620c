"""``generate --webhook-url URL --webhook-listen HOST:PORT``: waits driven by deliveries.

The loopback emulator POSTs each task's delivery (over real HTTP) to the CLI's
own receiver; the emulator counts the task-result GETs.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest

from novita_async import AsyncNovita, TaskResult, TaskStatus
from novita_async._cli import amain, main
from novita_async._cli_webhooks import MAX_BODY, WebhookReceiver
from novita_async.testing import NovitaEmulator


async def free_port() -> int:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
    await listener.aclose()
    return port


async def run_generate(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    code = await amain(["generate", "--no-progress", *argv], stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def images_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- the CLI


@pytest.mark.anyio
async def test_generate_waits_on_deliveries_with_one_get_per_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    confirmed: list[TaskResult | None] = []
    receive = AsyncNovita.receive_webhook

    async def counted(self: AsyncNovita, body: bytes) -> TaskResult | None:
        confirmed.append(await receive(self, body))
        return confirmed[-1]

    monkeypatch.setattr(AsyncNovita, "receive_webhook", counted)
    emu = NovitaEmulator(durations=(0.01, 0.05))
    port = await free_port()
    hook = f"http://127.0.0.1:{port}/novita/hook"
    prompts = [f"prompt {i}" for i in range(6)]
    with anyio.fail_after(60):
        async with emu.serve() as server, emu.webhooks(delay=(0.02, 0.05)):
            code, out, err = await run_generate(
                *prompts,
                "--base-url",
                server.base_url,
                "--api-key",
                emu.api_key,
                "--webhook-url",
                hook,
                "--webhook-listen",
                f"127.0.0.1:{port}",
                "--out",
                str(tmp_path),
            )
    assert code == 0, err
    assert "6 prompts: 6 succeeded, 0 failed; 6 images saved" in out
    assert len(images_in(tmp_path)) == 6
    (line,) = err.splitlines()
    assert line.startswith(f"novita-async generate: receiving webhooks on http://127.0.0.1:{port}")
    assert hook in line
    assert emu.tasks_created == 6
    assert all(task.extra["webhook"] == {"url": hook} for task in emu.tasks.values())
    # Every task was confirmed by its delivery: one GET each, no polling.
    assert sorted(r.task_id for r in confirmed if r is not None) == sorted(emu.tasks)
    assert all(r is not None and r.status is TaskStatus.SUCCEED for r in confirmed)
    assert {task_id: emu.polls[task_id] for task_id in emu.tasks} == dict.fromkeys(emu.tasks, 1)
    assert emu.webhook_stats.acknowledged == 6
    assert emu.webhook_stats.retries == 0


@pytest.mark.anyio
async def test_a_webhook_url_alone_goes_to_the_users_receiver_and_the_run_polls(
    tmp_path: Path,
) -> None:
    emu = NovitaEmulator(durations=0.01)
    hook = "https://my.app/novita-hook"
    with anyio.fail_after(60):
        async with emu.serve() as server:
            code, out, err = await run_generate(
                "a cat",
                "--base-url",
                server.base_url,
                "--api-key",
                emu.api_key,
                "--webhook-url",
                hook,
                "--image-type",
                "webp",
                "--out",
                str(tmp_path),
            )
    assert code == 0, err
    assert err == ""
    assert "1 prompt: 1 succeeded" in out
    (task,) = emu.tasks.values()
    assert task.extra == {"response_image_type": "webp", "webhook": {"url": hook}}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--webhook-listen", "127.0.0.1:8787"], "--webhook-listen needs --webhook-url"),
        (["--webhook-url", "http://h/x", "--webhook-listen", "127.0.0.1"], "HOST:PORT"),
        (["--webhook-url", "http://h/x", "--webhook-listen", ":8787"], "HOST:PORT"),
        (["--webhook-url", "http://h/x", "--webhook-listen", "::1:8787"], "HOST:PORT"),
        (["--webhook-url", "http://h/x", "--webhook-listen", "[::1]8787"], "HOST:PORT"),
        (["--webhook-url", "http://h/x", "--webhook-listen", "127.0.0.1:65536"], "0-65535"),
        (["--webhook-url", "http://h/x", "--webhook-listen", "127.0.0.1:http"], "0-65535"),
    ],
)
def test_webhook_usage_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "a cat", "--api-key", "k", "--out", str(tmp_path), *argv]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("novita-async generate: error:")
    assert message in line
    assert list(tmp_path.iterdir()) == []


def test_a_webhook_url_that_is_not_http_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["generate", "a cat", "--api-key", "k", "--webhook-url", "ftp://h/x"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--webhook-url: must be an http(s) URL" in last


@pytest.mark.anyio
async def test_a_listen_address_in_use_is_a_usage_error(tmp_path: Path) -> None:
    emu = NovitaEmulator(durations=0.01)
    taken = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = taken.extra(anyio.abc.SocketAttribute.local_port)
    with anyio.fail_after(60):
        async with taken, emu.serve() as server:
            code, out, err = await run_generate(
                "a cat",
                "--base-url",
                server.base_url,
                "--api-key",
                emu.api_key,
                "--webhook-url",
                "http://h/x",
                "--webhook-listen",
                f"127.0.0.1:{port}",
                "--out",
                str(tmp_path),
            )
    assert code == 2
    (line,) = err.splitlines()
    assert f"--webhook-listen 127.0.0.1:{port}: cannot listen there" in line
    assert emu.submissions == 0
    assert out == ""


# --------------------------------------------------------------------------- the receiver


@asynccontextmanager
async def receiver(
    timeout: float = 10.0, keepalive: float = 60.0
) -> AsyncIterator[tuple[WebhookReceiver, list[bytes]]]:
    """A receiver on a free port; ``keepalive`` outlasts the test, so none waits on it."""
    bodies: list[bytes] = []

    async def deliver(body: bytes) -> None:
        bodies.append(body)

    with anyio.fail_after(30):
        hooks = await WebhookReceiver.bind(
            "127.0.0.1", 0, deliver, timeout=timeout, keepalive=keepalive
        )
        async with anyio.create_task_group() as group:
            group.start_soon(hooks.serve)
            yield hooks, bodies
            group.cancel_scope.cancel()


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a raw connection; everything the receiver answers until it closes."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        answer = b""
        try:
            while True:
                answer += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return answer


def post(body: bytes, *headers: str) -> bytes:
    head = ["POST /hook HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def answers(stream: anyio.abc.SocketStream, count: int) -> list[bytes]:
    """Read ``count`` answers (heads only: the receiver's answers have no body)."""
    data = b""
    while data.count(b"\r\n\r\n") < count:
        data += await stream.receive()
    *heads, rest = data.split(b"\r\n\r\n")
    assert rest == b""
    return heads


async def is_open(stream: anyio.abc.SocketStream) -> bool:
    """True if the receiver neither closes nor sends anything for a moment."""
    with (
        anyio.move_on_after(0.1) as waited,
        suppress(anyio.EndOfStream, anyio.BrokenResourceError),
    ):
        await stream.receive()
    return waited.cancelled_caught


async def wait_for(bodies: list[bytes], count: int) -> None:
    while len(bodies) < count:  # delivered after the answer, in the connection's task
        await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_the_receiver_answers_204_then_hands_over_the_body_from_any_path() -> None:
    body = json.dumps({"event_type": "ASYNC_TASK_RESULT", "payload": {}}).encode()
    async with receiver() as (hooks, bodies), httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{hooks.port}"
        first = await http.post(f"{url}/novita/hook?x=1", content=body)
        second = await http.post(f"{url}/", content=b"", headers={"expect": "100-continue"})
        await wait_for(bodies, 2)
    assert (first.status_code, second.status_code) == (204, 204)
    assert bodies == [body, b""]
    assert hooks.delivered == 2


@pytest.mark.anyio
async def test_the_receiver_refuses_an_oversized_body_and_keeps_serving() -> None:
    async with receiver() as (hooks, bodies), httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{hooks.port}/hook"
        # Refused from the headers alone: the body is never read.
        head = f"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n"
        assert (await exchange(hooks.port, head.encode())).startswith(b"HTTP/1.1 413 ")
        # A sender already streaming the body still reads the answer (not a reset).
        too_big = await http.post(url, content=b"x" * (MAX_BODY + 1))
        just_fits = await http.post(url, content=b"y" * MAX_BODY)
        await wait_for(bodies, 1)
    assert too_big.status_code == 413
    assert just_fits.status_code == 204
    assert bodies == [b"y" * MAX_BODY]
    assert hooks.refused == 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /hook HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
        (b"POST /hook HTTP/1.1\r\nHost: x\r\n\r\n", b"411"),
        (b"POST /hook HTTP/1.1\r\nContent-Length: ten\r\n\r\n", b"400"),
        (b"POST /hook HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", b"400"),
        (b"POST /hook HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"501"),
        (b"nonsense\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
        (b"POST / HTTP/1.1\r\nX: " + b"a" * 20_000, b"431"),  # never ends: still bounded
    ],
)
async def test_the_receiver_refuses_what_is_not_a_delivery(
    request_bytes: bytes, status: bytes
) -> None:
    async with receiver() as (hooks, bodies):
        answer = await exchange(hooks.port, request_bytes)
        good = await exchange(hooks.port, post(b"{}", "Connection: close"))
        await wait_for(bodies, 1)
    assert answer.split(b" ")[1] == status
    assert answer.endswith(b"\r\n\r\n")  # no body, then the connection closes
    if status == b"405":
        assert b"\r\nAllow: POST\r\n" in answer
    assert good.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert bodies == [b"{}"]


@pytest.mark.anyio
async def test_the_receiver_times_out_a_slow_client() -> None:
    async with receiver(timeout=0.2) as (hooks, bodies):
        stalled = await exchange(hooks.port, b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
    assert stalled.startswith(b"HTTP/1.1 408 ")
    assert bodies == []
    assert hooks.refused == 1


@pytest.mark.anyio
async def test_a_failing_handler_is_logged_and_the_receiver_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[bytes] = []

    async def deliver(body: bytes) -> None:
        calls.append(body)
        raise RuntimeError("relay down")

    with anyio.fail_after(30):
        hooks = await WebhookReceiver.bind("127.0.0.1", 0, deliver)
        async with anyio.create_task_group() as group:
            group.start_soon(hooks.serve)
            for body in (b"1", b"2"):
                answer = await exchange(hooks.port, post(body, "Connection: close"))
                assert answer.startswith(b"HTTP/1.1 204 ")
            while len(calls) < 2:
                await anyio.sleep(0.01)
            group.cancel_scope.cancel()
    assert calls == [b"1", b"2"]
    assert "could not handle a webhook delivery: RuntimeError: relay down" in caplog.text


# --------------------------------------------------------------------------- keep-alive


@pytest.mark.anyio
async def test_the_receiver_serves_several_deliveries_on_one_connection() -> None:
    async with (
        receiver() as (hooks, bodies),
        await anyio.connect_tcp("127.0.0.1", hooks.port) as stream,
    ):
        for body in (b"1", b"22", b"333"):
            await stream.send(post(body))
            (answer,) = await answers(stream, 1)
            assert answer == b"HTTP/1.1 204 No Content"  # no Connection: close
            assert await is_open(stream)
        await wait_for(bodies, 3)
    assert bodies == [b"1", b"22", b"333"]
    assert (hooks.delivered, hooks.refused, hooks.connections) == (3, 0, 1)


@pytest.mark.anyio
async def test_pipelined_requests_are_all_answered_and_delivered_in_order() -> None:
    async with receiver() as (hooks, bodies):
        # Both requests in one send: the second's bytes follow the first's body.
        answer = await exchange(hooks.port, post(b'{"a": 1}') + post(b"[2]", "Connection: close"))
        await wait_for(bodies, 2)
    assert answer == (
        b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
    )
    assert bodies == [b'{"a": 1}', b"[2]"]
    assert (hooks.delivered, hooks.refused) == (2, 0)


@pytest.mark.anyio
async def test_a_refusal_after_a_delivery_still_closes_the_connection() -> None:
    async with receiver() as (hooks, bodies):
        answer = await exchange(hooks.port, post(b"ok") + b"GET / HTTP/1.1\r\n\r\n")
        await wait_for(bodies, 1)
    first, second = answer.split(b"\r\n\r\n", 1)
    assert first == b"HTTP/1.1 204 No Content"
    assert second.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nConnection: close\r\n" in second
    assert bodies == [b"ok"]
    assert (hooks.delivered, hooks.refused) == (1, 1)


@pytest.mark.anyio
async def test_an_idle_connection_is_closed_quietly_after_keepalive() -> None:
    async with receiver(keepalive=0.2) as (hooks, bodies):
        async with await anyio.connect_tcp("127.0.0.1", hooks.port) as stream:
            await stream.send(post(b"{}"))
            assert await answers(stream, 1) == [b"HTTP/1.1 204 No Content"]
            began = anyio.current_time()
            with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
                await stream.receive()
            assert anyio.current_time() - began >= 0.15
        # A client that closes between requests is not refused either.
        async with await anyio.connect_tcp("127.0.0.1", hooks.port) as stream:
            await stream.send(post(b"[]"))
            assert await answers(stream, 1) == [b"HTTP/1.1 204 No Content"]
        await wait_for(bodies, 2)
        await anyio.sleep(0.05)
    assert bodies == [b"{}", b"[]"]
    assert (hooks.delivered, hooks.refused, hooks.connections) == (2, 0, 2)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "request_bytes",
    [
        post(b"{}", "Connection: close"),
        post(b"{}", "Connection: Keep-Alive, CLOSE"),
        post(b"{}").replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n"),
    ],
)
async def test_connection_close_and_http_1_0_are_answered_and_closed(
    request_bytes: bytes,
) -> None:
    async with receiver() as (hooks, bodies):
        with anyio.fail_after(5):  # not the idle timeout (60 s here)
            answer = await exchange(hooks.port, request_bytes)
        await wait_for(bodies, 1)
    assert answer == b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
    assert bodies == [b"{}"]
    assert (hooks.delivered, hooks.refused) == (1, 0)


@pytest.mark.anyio
async def test_a_slow_handler_does_not_hold_up_the_connection() -> None:
    bodies: list[bytes] = []
    release = anyio.Event()

    async def deliver(body: bytes) -> None:
        bodies.append(body)
        await release.wait()

    with anyio.fail_after(10):
        hooks = await WebhookReceiver.bind("127.0.0.1", 0, deliver)
        async with anyio.create_task_group() as group:
            group.start_soon(hooks.serve)
            async with await anyio.connect_tcp("127.0.0.1", hooks.port) as stream:
                for body in (b"1", b"2"):
                    await stream.send(post(body))
                    assert await answers(stream, 1) == [b"HTTP/1.1 204 No Content"]
                await wait_for(bodies, 2)
                assert hooks.delivered == 2
                release.set()
            group.cancel_scope.cancel()
    assert bodies == [b"1", b"2"]


@pytest.mark.anyio
async def test_an_http_client_reuses_one_connection_for_many_deliveries() -> None:
    async with receiver() as (hooks, bodies), httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{hooks.port}/novita/hook"
        with anyio.fail_after(10):
            for i in range(20):
                response = await http.post(url, content=b"%d" % i)
                assert response.status_code == 204
            await wait_for(bodies, 20)
    assert bodies == [b"%d" % i for i in range(20)]
    assert 1 <= hooks.connections <= 2
    assert (hooks.delivered, hooks.refused) == (20, 0)
