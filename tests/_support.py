"""Shared test data and helpers, imported as ``from _support import ...``.

The Novita spec's example 1 (its request and its task-result body, verbatim), API
constants, mocked HTTP answers, and helpers to talk to the emulator over raw httpx.
Fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import httpx
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from novita_async import Extra, Txt2ImgRequest
from novita_async.testing import API_BASE_URL, DEFAULT_API_KEY, NovitaEmulator

# --------------------------------------------------------------------------- the API

API = "https://api.novita.ai"
SUBMIT = "/v3/async/txt2img"
RESULT = "/v3/async/task-result"
#: A made-up key in the shape of a real one: tests assert it never leaks.
KEY = "sk_live_9f8e7d6c5b4a3210fedcba98"
MODEL = "sd_xl_base_1.0.safetensors"


def req(prompt: str = "a cat", **fields: Any) -> Txt2ImgRequest:
    """A request for ``prompt``; other fields as given, else the models' defaults."""
    return Txt2ImgRequest(model_name=MODEL, prompt=prompt, **fields)


# --------------------------------------------------------------------------- spec example 1
# novita-txt2img-v3.txt, example 1: the request, its JSON body and the task-result body.

SPEC_TASK_ID = "f10333f2-2dd7-4f56-a177-e3c02a774d9a"
SPEC_REQUEST = Txt2ImgRequest(
    prompt="a cute dog",
    model_name=MODEL,
    negative_prompt="nsfw, bottle,bad face",
    width=1024,
    height=1024,
    image_num=2,
    steps=20,
    seed=-1,
    clip_skip=1,
    sampler_name="Euler a",
    guidance_scale=7.5,
)
SPEC_EXTRA = Extra(response_image_type="jpeg")
SPEC_REQUEST_BODY: dict[str, Any] = {
    "extra": {"response_image_type": "jpeg"},
    "request": {
        "prompt": "a cute dog",
        "model_name": MODEL,
        "negative_prompt": "nsfw, bottle,bad face",
        "width": 1024,
        "height": 1024,
        "image_num": 2,
        "steps": 20,
        "seed": -1,
        "clip_skip": 1,
        "sampler_name": "Euler a",
        "guidance_scale": 7.5,
    },
}

SPEC_RESULT_JSON = r"""
{
	"extra": {
		"seed": "392212448",
		"enable_nsfw_detection": false,
		"debug_info": {
			"request_info": "{\"model\":\"sd_xl_base_1.0.safetensors\",\"prompts\":[\"a cute dog\"],\"negative_prompts\":[\"nsfw, bottle,bad face\"],\"seeds\":[392212448],\"height\":384,\"width\":512,\"guidance_scale\":7.5,\"num_images_per_prompt\":2,\"num_inference_steps\":20,\"sampler_name\":\"Euler a\",\"clip_skip\":1}",
			"submit_time_ms": "1715052533293",
			"execute_time_ms": "1715052533362",
			"complete_time_ms": "1715052537148"
		}
	},
	"task": {
		"task_id": "f10333f2-2dd7-4f56-a177-e3c02a774d9a",
		"task_type": "TXT_TO_IMG",
		"status": "TASK_STATUS_SUCCEED",
		"reason": "",
		"eta": 0,
		"progress_percent": 0
	},
	"images": [{
		"image_url": "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/prod/f10333f2-2dd7-4f56-a177-e3c02a774d9a/80443e6739584fcb82bc2cf4f3b557fb.jpeg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASVPYCN6LRCW3SOUV%2F20240507%2Fap-southeast-1%2Fs3%2Faws4_request&X-Amz-Date=20240507T032908Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&x-id=GetObject&X-Amz-Signature=b375b64e0886d0253d5463af241a30bd4a1e4718287f37f73b0e80d5dce4d214",
		"image_url_ttl": "3600",
		"image_type": "jpeg",
		"nsfw_detection_result": null
	}, {
		"image_url": "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/prod/f10333f2-2dd7-4f56-a177-e3c02a774d9a/9b16e333242244e58a4d03c4bfb1bca5.jpeg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASVPYCN6LRCW3SOUV%2F20240507%2Fap-southeast-1%2Fs3%2Faws4_request&X-Amz-Date=20240507T032908Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&x-id=GetObject&X-Amz-Signature=fff0623985c741661497532eb682a7ae23094bcf2e55c4eee61e256e97c81e3c",
		"image_url_ttl": "3600",
		"image_type": "jpeg",
		"nsfw_detection_result": null
	}],
	"videos": [],
	"audios": []
}
"""  # noqa: E501
SPEC_RESULT_BODY: dict[str, Any] = json.loads(SPEC_RESULT_JSON)

# --------------------------------------------------------------------------- mocked answers


def ok_submit(task_id: str = SPEC_TASK_ID) -> httpx.Response:
    return httpx.Response(200, json={"task_id": task_id})


def ok_result() -> httpx.Response:
    return httpx.Response(200, json=SPEC_RESULT_BODY)


def error(status: int, reason: str = "", message: str = "", **headers: str) -> httpx.Response:
    """An error answer in Novita's documented shape."""
    body = {"code": status, "reason": reason, "message": message, "metadata": {}}
    return httpx.Response(status, json=body, headers=headers)


# --------------------------------------------------------------------------- the emulator, raw

EMULATOR_AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}


def request_json(**fields: Any) -> dict[str, Any]:
    """A txt2img ``request`` object as a client sends it: the models' defaults, overridden
    by ``fields``; a field given as None is left out."""
    request: dict[str, Any] = {
        "model_name": MODEL,
        "prompt": "a lighthouse at dusk",
        "width": 512,
        "height": 512,
        "image_num": 1,
        "steps": 20,
        "guidance_scale": 7.5,
        "sampler_name": "Euler a",
    }
    request.update(fields)
    return {k: v for k, v in request.items() if v is not None}


@asynccontextmanager
async def emulator_http(
    emulator: NovitaEmulator, base_url: str = API_BASE_URL, **kwargs: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A raw httpx client for ``emulator``, signed with its key: in-process for its own
    base URL, over the network for any other (a loopback server's)."""
    kwargs.setdefault("headers", EMULATOR_AUTH)
    if "transport" not in kwargs and base_url == API_BASE_URL:
        kwargs["transport"] = emulator.transport()
    async with httpx.AsyncClient(base_url=base_url, **kwargs) as client:
        yield client


async def post_task(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    """POST a txt2img body, expect success, return the task id."""
    response = await client.post(SUBMIT, json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["task_id"])


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


class JsonLinesChild:
    """A child process of a test that prints one JSON object a line: its lines as they
    arrive (read by ``_read_stdout``/``_read_stderr`` in the caller's task group)."""

    step_timeout = 20.0  # seconds for any single wait

    def __init__(self, process: Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self.stderr = ""

    async def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        buffer = ""
        async for chunk in TextReceiveStream(self.process.stdout):
            buffer += chunk
            *complete, buffer = buffer.split("\n")
            self.lines.extend(json.loads(line) for line in complete if line.strip())

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for chunk in TextReceiveStream(self.process.stderr):
            self.stderr += chunk

    async def wait(self) -> int:
        with anyio.fail_after(self.step_timeout):
            return await self.process.wait()


ChildT = TypeVar("ChildT", bound=JsonLinesChild)


@asynccontextmanager
async def run_child(command: list[str], kind: type[ChildT]) -> AsyncIterator[ChildT]:
    """Run ``command`` as a :class:`JsonLinesChild` subclass for the block; it is killed if
    still running at the end, and its stderr is printed if the block fails."""
    process = await anyio.open_process(command)
    running = kind(process)
    try:
        async with process, anyio.create_task_group() as readers:
            readers.start_soon(running._read_stdout)
            readers.start_soon(running._read_stderr)
            try:
                yield running
            finally:
                if process.returncode is None:
                    process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()
    except BaseException:
        print(f"child stderr:\n{running.stderr}", file=sys.stderr)
        raise
