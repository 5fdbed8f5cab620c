"""``AsyncNovita``: the public client."""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypedDict

import anyio
import anyio.abc
import httpx

from ._batch import BatchRun, check_requests, make_limiter
from ._convert import task_result_for
from ._download import DEFAULT_MAX_IMAGE_BYTES
from ._engine import DEFAULT_CONCURRENT_SUBMISSIONS, BatchItem, Engine
from ._errors import InvalidRequestError, NovitaError
from ._host import HostState, TaskHost
from ._models import Extra, Txt2ImgRequest
from ._policy import PollHint, PollPolicy
from ._poller import PollScheduler, check_timeout
from ._results import Image, Model, TaskResult
from ._retry import RetryPolicy
from ._submit import RateLimiter, Submitter
from ._transport import NOT_GIVEN, NotGiven, Transport
from ._webhooks import WebhookBody, WebhookRelay, receive_webhook

if TYPE_CHECKING:
    from ._journal import AsyncJournal, Journal

__all__ = ["AsyncNovita", "ClientOptions"]

logger = logging.getLogger("novita_async")

DEFAULT_BASE_URL = "https://api.novita.ai"
TASK_RESULT_PATH = "/v3/async/task-result"

_NOT_ENTERED = (
    "{what} needs the client's background task group: use `async with AsyncNovita() as "
    "client:` (in FastAPI, enter it in the app's lifespan; in aiohttp, in cleanup_ctx; in "
    "pytest, in an async fixture), or call `await client.__aenter__()` / `aclose()` yourself"
)


class ClientOptions(TypedDict, total=False):
    """:class:`AsyncNovita`'s parameters, for ``**kwargs`` that are handed on to it
    (``NovitaEmulator.client(**options)``), so type checkers check those too."""

    api_key: str | None
    base_url: str
    timeout: float | httpx.Timeout | NotGiven | None
    max_retries: int
    http_client: httpx.AsyncClient | None
    transport: httpx.AsyncBaseTransport | None
    max_connections: int
    max_concurrent_polls: int
    retry_policy: RetryPolicy | None
    poll_policy: PollPolicy | None
    rate_limiter: RateLimiter | None
    webhook_url: str | None
    webhook_relay: WebhookRelay | None


class AsyncNovita:
    """Async client for Novita's v3 async image API.

    One instance is meant to be shared (e.g. by every request of a FastAPI
    app): it holds the connection pool, the ONE polling scheduler that serves
    every :meth:`wait`, and a task group for its background work. Enter it:
    ``async with AsyncNovita() as client: ...``. :meth:`submit_txt2img`,
    :meth:`get_task_result`, downloads and :meth:`list_models` also work on a
    client that was never entered; :meth:`wait`, :meth:`txt2img` and
    :meth:`txt2img_many` need it entered.

    Parameters (all keyword-only but ``api_key``):

    * ``api_key``: Novita API key; default ``$NOVITA_API_KEY``. Sent only to
      ``base_url``'s origin, never logged or shown in a repr.
    * ``base_url``: the API origin (default ``https://api.novita.ai``); point
      it at the built-in emulator or a proxy.
    * ``timeout``: the **HTTP timeout of each request** (seconds, an
      ``httpx.Timeout``, or ``None`` for none), as in httpx. Not given: 60 s
      (10 s to connect), or your ``http_client``'s own. The overall deadline
      of a result is the ``timeout`` argument of :meth:`wait`,
      :meth:`txt2img` and :meth:`txt2img_many` instead.
    * ``max_retries``: retries of a transient failure (``RetryPolicy.max_retries``).
    * ``retry_policy``: full control of backoff (overrides ``max_retries``).
    * ``http_client``: your own ``httpx.AsyncClient`` (not closed by
      :meth:`aclose`); ``transport``: an httpx transport for the client this
      one creates (e.g. the emulator's). Pass at most one of the two.
    * ``max_connections``: size of the connection pool (default 64).
    * ``max_concurrent_polls``: scheduled task-result GETs in flight at once (default
      16). The GETs confirming webhook deliveries run in the delivering task, bounded
      by ``max_connections`` alone, so a burst of deliveries is not queued behind them.
    * ``poll_policy``: :class:`PollPolicy`, when to poll (eta, learning, backoff).
    * ``rate_limiter``: a :class:`WeightedRateLimiter` (or anything with its
      interface, e.g. a Redis-shared one) that paces EVERY submission of this
      client, so many single :meth:`txt2img` calls stay inside the account's
      images-per-minute quota too. Default: unpaced.
    * ``webhook_url``: your app's public URL for Novita's deliveries. Every
      submission then carries ``extra.webhook.url`` (unless your ``Extra``
      sets its own), your route hands each delivery to
      :meth:`receive_webhook`, and the waits of :meth:`txt2img` and
      :meth:`txt2img_many` are driven by deliveries: one confirming GET per
      task, polls only when a delivery is clearly late. (:meth:`wait` on an id
      from :meth:`submit_txt2img` polls as usual; a delivery still ends it.)
    * ``webhook_relay``: with several replicas behind a load balancer, passes
      a delivery to the replica that waits on its task (e.g.
      ``novita_async.redis.RedisWebhookRelay``).
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float | httpx.Timeout | NotGiven | None = NOT_GIVEN,
        max_retries: int = 3,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 64,
        max_concurrent_polls: int = 16,
        retry_policy: RetryPolicy | None = None,
        poll_policy: PollPolicy | None = None,
        rate_limiter: RateLimiter | None = None,
        webhook_url: str | None = None,
        webhook_relay: WebhookRelay | None = None,
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
        if rate_limiter is not None and not callable(getattr(rate_limiter, "acquire", None)):
            raise TypeError("rate_limiter must be a WeightedRateLimiter or have its interface")
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
        self._submitter = Submitter(
            self._transport, rate_limiter=rate_limiter, webhook_url=webhook_url
        )
        self._relay = webhook_relay
        self._scheduler = PollScheduler(
            self._fetch_task_result,
            max_concurrent_polls=max_concurrent_polls,
            policy=poll_policy if poll_policy is not None else PollPolicy(),
        )
        services = [self._scheduler.run]
        if webhook_relay is not None:
            services.append(self._serve_relay)
        self._host = TaskHost(*services)

    def __repr__(self) -> str:
        return f"AsyncNovita(base_url={str(self._transport.base_url).rstrip('/')!r})"

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> AsyncNovita:
        await self._host.start()
        try:
            self._transport.open()  # the pool is ready before the first request
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop all background work (pending waits end with an error), then close the
        connection pool if this client created it. Idempotent."""
        if self._host.state is HostState.CLOSED:
            return
        try:
            await self._host.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                await self._transport.aclose()

    @property
    def is_closed(self) -> bool:
        return self._host.state is HostState.CLOSED

    @property
    def max_connections(self) -> int:
        return self._transport.max_connections

    @property
    def transport_name(self) -> str:
        """What carries the requests: ``"httpx-aiohttp"`` (the default on asyncio),
        ``"httpx-shards"`` (the default on trio), ``"httpx"`` (where the environment sets
        proxies), or the class name of the one you gave; ``"not chosen yet"`` before a
        default client is entered or makes its first request."""
        return self._transport.transport_name

    @property
    def scheduler(self) -> PollScheduler:
        """The client's shared polling scheduler (its ``stats`` count polls)."""
        return self._scheduler

    @property
    def rate_limiter(self) -> RateLimiter | None:
        """The limiter that paces every submission of this client (None: unpaced)."""
        return self._submitter.rate_limiter

    def _check_open(self) -> None:
        if self._host.state is HostState.CLOSED:
            raise RuntimeError("this AsyncNovita client is closed")

    def _check_running(self, what: str) -> None:
        self._check_open()
        if not self._host.open:
            raise RuntimeError(_NOT_ENTERED.format(what=what))

    # ----------------------------------------------------------------- core API

    async def submit_txt2img(self, request: Txt2ImgRequest, extra: Extra | None = None) -> str:
        """Create a txt2img task and return its task_id (paced by ``rate_limiter``).

        Never silently resubmits: if the POST may have created a task but gave
        no usable answer, :class:`SubmissionUncertainError` is raised.
        """
        self._check_open()
        return (await self._submitter.submit(request, extra)).task_id

    async def get_task_result(self, task_id: str) -> TaskResult:
        """One ``GET /v3/async/task-result`` (retried on transient failures; an answer
        about another task counts as malformed)."""
        if not isinstance(task_id, str) or not task_id:
            raise InvalidRequestError(f"task_id must be a non-empty str, got {task_id!r}")
        self._check_open()
        return await self._fetch_task_result(task_id)

    async def _fetch_task_result(self, task_id: str) -> TaskResult:
        """The GET of :meth:`get_task_result`, and the scheduler's polls. Those do not
        check that the client is open: while it closes, a poll started before the
        scheduler is cancelled must not end its wait with "closed" as a RuntimeError
        (the scheduler's end gives every pending wait a NovitaError)."""
        return await self._transport.get(
            TASK_RESULT_PATH,
            params={"task_id": task_id},
            parse=functools.partial(task_result_for, task_id=task_id),
        )

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult:
        """Wait until the task finishes, sharing polls with every other waiter.

        ``timeout``: the overall deadline in seconds for the result (as in
        ``asyncio.wait_for``; ``None``: no deadline), not the HTTP timeout.
        Raises :class:`TaskFailedError` on FAILED and :class:`TaskTimeoutError`
        after ``timeout`` (polling of the task stops at once).
        """
        if not isinstance(task_id, str) or not task_id:
            raise InvalidRequestError(f"task_id must be a non-empty str, got {task_id!r}")
        self._check_running("AsyncNovita.wait")
        return await self._scheduler.wait(task_id, timeout=timeout)

    async def receive_webhook(self, body: WebhookBody) -> TaskResult | None:
        """Hand over one webhook delivery (raw bytes, text or the parsed mapping) from
        your route, then answer Novita with a 2xx.

        The body is never trusted (deliveries are unsigned). For a task this
        client waits on, one GET confirms it and every waiter of that task gets
        the confirmed result at once; duplicates cost nothing. A delivery for
        a task nobody here waits on costs no request (it goes to the
        ``webhook_relay``, if any). A forged "succeeded" for a running task
        resolves nothing. Returns the confirmed result (SUCCEED or FAILED), or
        ``None`` when nothing was confirmed.
        """
        self._check_running("AsyncNovita.receive_webhook")
        return await receive_webhook(self._scheduler, self._relay, body)

    async def _serve_relay(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliveries other replicas received for tasks that this one waits on."""
        relay = self._relay
        assert relay is not None
        task_status.started()

        async def deliver(task_id: str, body: bytes) -> None:
            if self._scheduler.is_tracking(task_id):
                self._host.start_soon(self._scheduler.confirm, task_id)

        await relay.serve(deliver)

    async def txt2img(
        self,
        request: Txt2ImgRequest,
        extra: Extra | None = None,
        timeout: float | None = None,
    ) -> TaskResult:
        """Submit and wait. ``timeout``: the deadline in seconds for the result, counted
        from submission (not the HTTP timeout)."""
        self._check_running("AsyncNovita.txt2img")
        check_timeout(timeout)  # after the POST, its task id would be lost with the error
        task_id, submitted_at = await self._submitter.submit(request, extra)
        hint = PollHint(
            submitted_at=submitted_at,
            cost=request.cost,
            webhook=self._submitter.webhooked(extra),
        )
        try:
            return await self._scheduler.wait(task_id, timeout=timeout, hint=hint)
        except anyio.get_cancelled_exc_class():
            logger.info("txt2img cancelled while waiting; task %s runs on and is billed", task_id)
            raise

    def txt2img_many(
        self,
        requests: Iterable[Txt2ImgRequest],
        extra: Extra | None = None,
        timeout: float | None = None,
        *,
        max_concurrent_submissions: int | None = None,
        images_per_minute: float | RateLimiter | None = None,
        journal: str | os.PathLike[str] | Journal | AsyncJournal | None = None,
        resubmit_uncertain: bool = False,
    ) -> BatchRun:
        """Fan out ``requests``; iterate the returned run for items as they finish.

        Each item has ``.index``, ``.request``, ``.task_id``, ``.result`` and
        ``.error``: one failed prompt is an item, not an exception. A request of
        the wrong type raises ``TypeError`` here (for a list or tuple; for a
        lazy iterable, when the run reaches it).

        * ``timeout``: the deadline in seconds of each task's result, from its
          submission (not the HTTP timeout).
        * ``images_per_minute``: pacing by image weight for this run (a number,
          or a shared :class:`WeightedRateLimiter`); Novita's default quota is
          20. ``None``: the client's ``rate_limiter`` alone, or, without one,
          unpaced until Novita's first 429, then adapting.
        * ``max_concurrent_submissions``: POSTs in flight (default 8, lowered to
          fit ``max_connections - max_concurrent_polls``).
        * ``journal``: a sqlite path (or :class:`Journal`, or an async journal
          such as ``novita_async.redis.RedisJournal``) that makes the batch
          resumable; ``resubmit_uncertain`` resends prompts whose earlier POST
          may have created a task.

        Iterate it bare (``async for item in client.txt2img_many(...)``) or in
        ``async with client.txt2img_many(...) as run``; both run at full
        concurrency. Leaving the loop stops new POSTs (see :class:`BatchRun`).
        """
        self._check_running("AsyncNovita.txt2img_many")
        check_requests(requests)
        if extra is not None and not isinstance(extra, Extra):
            raise InvalidRequestError(f"extra must be an Extra, got {type(extra).__name__}")
        if timeout is not None and not (timeout > 0 and not math.isnan(timeout)):
            raise ValueError(f"timeout must be None or > 0, got {timeout!r}")
        polls = self._scheduler.max_concurrent_polls
        room = self.max_connections - polls
        if max_concurrent_submissions is None:
            workers = max(1, min(DEFAULT_CONCURRENT_SUBMISSIONS, room))
        else:
            workers = max_concurrent_submissions
            if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
                raise ValueError(f"max_concurrent_submissions must be an int >= 1, got {workers!r}")
            if workers > room:
                raise ValueError(
                    f"max_concurrent_submissions={workers} plus the client's "
                    f"max_concurrent_polls={polls} exceeds its max_connections="
                    f"{self.max_connections}; raise max_connections or lower one of them"
                )
        engine = Engine(
            submitter=self._submitter,
            scheduler=self._scheduler,
            requests=requests,
            extra=extra,
            timeout=timeout,
            workers=workers,
            limiter=make_limiter(images_per_minute, self._submitter.rate_limiter),
            journal=journal,
            resubmit_uncertain=resubmit_uncertain,
        )
        return BatchRun(engine, self._host.start_soon)

    async def txt2img_all(
        self,
        requests: Iterable[Txt2ImgRequest],
        extra: Extra | None = None,
        timeout: float | None = None,
        *,
        max_concurrent_submissions: int | None = None,
        images_per_minute: float | RateLimiter | None = None,
        journal: str | os.PathLike[str] | Journal | AsyncJournal | None = None,
        resubmit_uncertain: bool = False,
    ) -> list[BatchItem]:
        """Like :meth:`txt2img_many` (same arguments), but returns every item, in
        request order."""
        items: list[BatchItem] = []
        run = self.txt2img_many(
            requests,
            extra,
            timeout,
            max_concurrent_submissions=max_concurrent_submissions,
            images_per_minute=images_per_minute,
            journal=journal,
            resubmit_uncertain=resubmit_uncertain,
        )
        async with run:
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
