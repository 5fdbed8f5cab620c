"""``AsyncNovita``: the public client."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from ._convert import request_body, submit_task_id, task_result
from ._download import DEFAULT_MAX_IMAGE_BYTES
from ._errors import (
    InvalidRequestError,
    NovitaError,
    SubmissionUncertainError,
)
from ._models import Extra, Image, Model, TaskResult, Txt2ImgRequest
from ._poller import PollHint, PollPolicy, PollScheduler
from ._transport import DEFAULT_TIMEOUT, RetryPolicy, Transport, Uncertain

if TYPE_CHECKING:
    from ._batch import BatchItem, BatchRun
    from ._journal import Journal
    from ._ratelimit import WeightedRateLimiter

__all__ = ["AsyncNovita"]

DEFAULT_BASE_URL = "https://api.novita.ai"
TXT2IMG_PATH = "/v3/async/txt2img"
TASK_RESULT_PATH = "/v3/async/task-result"


def check_submission(request: Txt2ImgRequest, extra: Extra | None) -> None:
    """Type and cross-field checks that no single model can make alone."""
    if not isinstance(request, Txt2ImgRequest):
        raise InvalidRequestError(f"request must be a Txt2ImgRequest, got {type(request).__name__}")
    if extra is not None and not isinstance(extra, Extra):
        raise InvalidRequestError(f"extra must be an Extra, got {type(extra).__name__}")
    if request.enable_transparent_background and (
        extra is None or extra.response_image_type != "png"
    ):
        raise InvalidRequestError(
            "enable_transparent_background needs Extra(response_image_type='png')"
        )


class AsyncNovita:
    """Async client for Novita's v3 async image API.

    One instance is meant to be shared (e.g. across FastAPI requests): it holds
    the connection pool and the ONE polling scheduler that serves every
    :meth:`wait`. Use it as ``async with AsyncNovita() as client`` or call
    :meth:`aclose` yourself.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 64,
        max_concurrent_polls: int = 16,
        retry_policy: RetryPolicy | None = None,
        poll_policy: PollPolicy | None = None,
    ) -> None:
        api_key = api_key if api_key is not None else os.environ.get("NOVITA_API_KEY")
        if not api_key:
            raise NovitaError("no API key: pass api_key=... or set NOVITA_API_KEY")
        if http_client is not None and transport is not None:
            raise ValueError("pass either http_client or transport, not both")
        if max_concurrent_polls < 1 or max_connections < 1:
            raise ValueError("max_concurrent_polls and max_connections must be >= 1")
        if max_concurrent_polls > max_connections:
            raise ValueError("max_concurrent_polls cannot exceed max_connections")
        retry = retry_policy if retry_policy is not None else RetryPolicy(max_retries=max_retries)
        self._transport = Transport(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            retry=retry,
            http_client=http_client,
            transport=transport,
            max_connections=max_connections,
        )
        self._scheduler = PollScheduler(
            self.get_task_result,
            max_concurrent_polls=max_concurrent_polls,
            policy=poll_policy if poll_policy is not None else PollPolicy(),
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncNovita(base_url={str(self._transport.base_url).rstrip('/')!r})"

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> AsyncNovita:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (if this client created it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._transport.aclose()

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def max_connections(self) -> int:
        return self._transport.max_connections

    @property
    def scheduler(self) -> PollScheduler:
        """The client's shared polling scheduler (its ``stats`` count polls)."""
        return self._scheduler

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this AsyncNovita client is closed")

    # ----------------------------------------------------------------- core API

    async def submit_txt2img(self, request: Txt2ImgRequest, extra: Extra | None = None) -> str:
        """Create a txt2img task and return its task_id.

        Never silently resubmits: if the POST may have created a task but gave
        no usable answer, :class:`SubmissionUncertainError` is raised.
        """
        return await self._submit(request, extra, retry_429=True)

    async def _submit(
        self,
        request: Txt2ImgRequest,
        extra: Extra | None,
        *,
        retry_429: bool,
        max_retries: int | None = None,
    ) -> str:
        check_submission(request, extra)
        self._check_open()
        body = request_body(request, extra)
        try:
            task_id: str = await self._transport.post_submission(
                TXT2IMG_PATH,
                body,
                retry_429=retry_429,
                parse=submit_task_id,
                max_retries=max_retries,
            )
            return task_id
        except Uncertain as exc:  # envelope errors arrive as APIStatusError subclasses
            cause: BaseException = exc.cause
        raise SubmissionUncertainError(
            f"txt2img submission outcome unknown ({cause}); a task may have been created "
            "and billed, so it was not retried",
            request=request,
            extra=extra,
            cause=cause,
        ) from cause

    async def get_task_result(self, task_id: str) -> TaskResult:
        """One ``GET /v3/async/task-result`` (retried on transient failures)."""
        if not isinstance(task_id, str) or not task_id:
            raise InvalidRequestError(f"task_id must be a non-empty str, got {task_id!r}")
        self._check_open()
        return await self._transport.get(
            TASK_RESULT_PATH, params={"task_id": task_id}, parse=task_result
        )

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult:
        """Wait until the task finishes, sharing polls with every other waiter.

        Raises :class:`TaskFailedError` on FAILED and :class:`TaskTimeoutError`
        after ``timeout`` seconds (polling of the task stops at once).
        """
        if not isinstance(task_id, str) or not task_id:
            raise InvalidRequestError(f"task_id must be a non-empty str, got {task_id!r}")
        self._check_open()
        return await self._scheduler.wait(task_id, timeout=timeout)

    async def txt2img(
        self,
        request: Txt2ImgRequest,
        extra: Extra | None = None,
        timeout: float | None = None,
    ) -> TaskResult:
        """Submit and wait; ``timeout`` bounds the wait for the result."""
        submitted_at = anyio.current_time()
        task_id = await self.submit_txt2img(request, extra)
        hint = PollHint(submitted_at=submitted_at, cost=request.cost)
        return await self._scheduler.wait(task_id, timeout=timeout, hint=hint)

    def txt2img_many(
        self,
        requests: Iterable[Txt2ImgRequest],
        extra: Extra | None = None,
        timeout: float | None = None,
        *,
        max_concurrent_submissions: int | None = None,
        images_per_minute: float | WeightedRateLimiter | None = None,
        journal: str | os.PathLike[str] | Journal | None = None,
        resubmit_uncertain: bool = False,
    ) -> BatchRun:
        """Fan out ``requests``; iterate the returned run for items as they finish.

        Each item has ``.index``, ``.request``, ``.task_id``, ``.result`` and
        ``.error``: one failed prompt is an item, not an exception. Submissions
        are paced by image weight (``images_per_minute``, or a shared
        :class:`WeightedRateLimiter`; Novita's default quota is 20; ``None``:
        unpaced until the first 429) and slow down on 429s. At most
        ``max_concurrent_submissions`` POSTs are in flight (default 8, lowered to
        fit ``max_connections - max_concurrent_polls``). Use it as
        ``async with client.txt2img_many(...) as run: async for item in run``
        (full concurrency) or iterate it bare; leaving the loop cancels pending
        work and no request is sent afterwards. ``timeout`` bounds each task's
        wait for its result. ``journal`` (a sqlite path) makes the batch
        resumable; ``resubmit_uncertain`` resends prompts whose earlier POST may
        have created a task.
        """
        from ._batch import BatchRun

        self._check_open()
        return BatchRun(
            self,
            requests,
            extra=extra,
            timeout=timeout,
            max_concurrent_submissions=max_concurrent_submissions,
            images_per_minute=images_per_minute,
            journal=journal,
            resubmit_uncertain=resubmit_uncertain,
        )

    async def txt2img_all(
        self,
        requests: Iterable[Txt2ImgRequest],
        extra: Extra | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> list[BatchItem]:
        """Like :meth:`txt2img_many`, but returns every item, in request order."""
        items: list[BatchItem] = []
        async with self.txt2img_many(requests, extra, timeout, **options) as run:
            async for item in run:
                items.append(item)
        items.sort(key=lambda item: item.index)
        return items

    # ----------------------------------------------------------------- images, models, webhooks

    async def download_image(
        self, image: Image | str, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    ) -> bytes:
        """Download one image; never sends the API key to the image host.

        Raises :class:`ImageExpiredError` for an expired URL, :class:`DownloadError`
        otherwise (transient failures are retried first).
        """
        from ._download import download_image

        self._check_open()
        return await download_image(self._transport, image, max_bytes=max_bytes)

    async def save_image(
        self,
        image: Image | str,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ) -> Path:
        """Stream one image to ``path`` (atomically); returns the final path."""
        from ._download import save_image

        self._check_open()
        return await save_image(self._transport, image, Path(path), max_bytes=max_bytes)

    async def save_images(
        self,
        result: TaskResult,
        directory: str | os.PathLike[str],
        *,
        prefix: str | None = None,
        max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ) -> list[Path]:
        """Save every image of ``result`` as ``directory/<prefix or task_id>-<i>.<ext>``.

        Names are sanitized and sort in image order; paths come back in that order.
        """
        from ._download import save_images

        self._check_open()
        return await save_images(
            self._transport, result, Path(directory), prefix=prefix, max_bytes=max_bytes
        )

    def list_models(
        self,
        *,
        visibility: str | None = None,
        types: str | Sequence[str] | None = None,
        source: str | None = None,
        is_sdxl: bool | None = None,
        is_inpainting: bool | None = None,
        query: str | None = None,
        limit: int | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[Model]:
        """Iterate ``GET /v3/model`` following ``pagination.next_cursor``.

        ``limit`` caps the total number of models yielded.
        """
        from ._listing import iter_models

        self._check_open()
        return iter_models(
            self._transport,
            visibility=visibility,
            types=types,
            source=source,
            is_sdxl=is_sdxl,
            is_inpainting=is_inpainting,
            query=query,
            limit=limit,
            page_size=page_size,
        )
