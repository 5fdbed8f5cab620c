"""A distributed batch on arq: one job per prompt, any number of workers and machines.

arq (``pip install arq``; an example dependency, not one of novita_async's) delivers
each job at least once: a worker killed mid-job, or a job past its timeout, is run
again, maybe on another machine. A second run of a job that already paid for its
prompt must not pay again. Each job therefore keeps its prompt's journal in Redis
(:class:`~novita_async.redis.RedisJournal`, one journal per prompt, named after the
batch and the index):

* the journal's lease lets only one run of a job work at a time (a retry of a job
  whose first run is still alive, or died less than ``LEASE`` seconds ago, is
  deferred);
* ``submitting`` is written before the POST and the task id right after it, so a
  retry after a crash waits for the task the first run paid for, and a retry after
  a crash *during* the POST reports the prompt as uncertain instead of paying twice;
* a finished prompt's result comes from the journal.

Every worker takes from one images-per-minute quota in Redis
(:class:`~novita_async.redis.RedisRateLimiter`, the client's ``rate_limiter``: it paces
every POST and gives back the quota of one that certainly created no task), whatever
the number of workers.

A worker killed with ``kill -9`` leaves its jobs "in progress": arq runs them again
(on any worker) once ``job_timeout`` (``ARQ_JOB_TIMEOUT``, 300 s) has passed.

Run it (a Redis on localhost, ``NOVITA_API_KEY`` set)::

    arq examples.redis_arq_batch.WorkerSettings          # on as many machines as you like
    python examples/redis_arq_batch.py enqueue my-batch "a red fox" "a lighthouse" ...
    python examples/redis_arq_batch.py status my-batch

Locally, without an account: ``python -m novita_async.testing --port 9000
--images-per-minute 20`` and ``NOVITA_BASE_URL=http://127.0.0.1:9000``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from contextlib import AsyncExitStack
from typing import Any

import anyio
from arq import Retry, create_pool
from arq.connections import RedisSettings

from novita_async import (
    APIConnectionError,
    APIStatusError,
    AsyncNovita,
    JournalError,
    SubmissionUncertainError,
    TaskFailedError,
    TaskResult,
    TaskTimeoutError,
    Txt2ImgRequest,
    request_key,
)
from novita_async.redis import RedisJournal, RedisRateLimiter

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
MODEL = "sd_xl_base_1.0.safetensors"
IMAGES_PER_MINUTE = float(os.environ.get("NOVITA_IMAGES_PER_MINUTE", "20"))
#: Seconds a crashed job's prompt stays locked before a retry may take it over.
LEASE = 30.0
#: arq runs a job of a killed worker again once this has passed since it started
#: (a task still running after JOB_TIMEOUT - 15 s is waited for by the job's next run).
JOB_TIMEOUT = float(os.environ.get("ARQ_JOB_TIMEOUT", "300"))


def journal_name(batch: str, index: int) -> str:
    return f"novita:batch:{{{batch}}}:{index}"


async def generate(ctx: dict[str, Any], batch: str, index: int, prompt: str) -> dict[str, Any]:
    """One prompt of a batch; safe to run again (arq retries) at any point."""
    request = Txt2ImgRequest(model_name=MODEL, prompt=prompt)
    journal = RedisJournal(ctx["redis"], journal_name(batch, index), lease=LEASE)
    try:
        await journal.open()
    except JournalError:
        raise Retry(defer=LEASE / 2) from None  # another run of this job is (or was) alive
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.keepalive)  # a lost lease cancels the work below
            outcome = await run_prompt(ctx, journal, request)
            tg.cancel_scope.cancel()
    finally:
        await journal.aclose()
    if "retry_in" in outcome:  # raised here: inside the task group it would be wrapped
        raise Retry(defer=outcome["retry_in"])
    return outcome


async def run_prompt(
    ctx: dict[str, Any], journal: RedisJournal, request: Txt2ImgRequest
) -> dict[str, Any]:
    client: AsyncNovita = ctx["novita"]
    record = (await journal.begin([(0, request_key(request, None))]))[0]
    if record.is_finished:
        return summary(record.task_id, record.result, record.error)  # an earlier run did it
    if record.state in ("submitting", "uncertain"):
        # An earlier run died during the POST: a task may exist (and be paid). Not resent
        # (Novita cannot list tasks): check the account's usage, or resubmit by hand.
        return {"state": "uncertain", "error": record.error}
    task_id = record.task_id
    if task_id is None:
        await journal.mark_submitting(0)
        try:
            task_id = await client.submit_txt2img(request)  # paced by the shared quota
        except SubmissionUncertainError as exc:
            await journal.mark_uncertain(0, str(exc))
            return {"state": "uncertain", "error": str(exc)}
        except (APIStatusError, APIConnectionError) as exc:  # certainly no task
            await journal.mark_rejected(0, str(exc))  # a retry may send it again
            if isinstance(exc, APIConnectionError) or exc.status_code in (429, 503):
                return {"retry_in": 10}  # unreachable or busy (other 5xx are uncertain)
            return {"state": "rejected", "error": str(exc)}
        await journal.mark_submitted(0, task_id)
    try:
        result = await client.wait(task_id, timeout=max(JOB_TIMEOUT - 15, 1))
    except TaskTimeoutError:
        return {"retry_in": 1}  # still running: the next run waits for the same task
    except TaskFailedError as exc:
        await journal.mark_finished(0, result=exc.result, error=str(exc))
        return summary(task_id, exc.result, str(exc))
    await journal.mark_finished(0, result=result, error=None)
    return summary(task_id, result, None)


def summary(task_id: str | None, result: TaskResult | None, error: str | None) -> dict[str, Any]:
    urls = [image.image_url for image in result.images] if result is not None else []
    return {"state": "failed" if error else "succeeded", "task_id": task_id, "images": urls}


async def startup(ctx: dict[str, Any]) -> None:
    stack = AsyncExitStack()
    ctx["stack"] = stack
    # arq's own connection (a redis.asyncio.Redis) serves the limiter and the journals too.
    limiter = await stack.enter_async_context(RedisRateLimiter(ctx["redis"], IMAGES_PER_MINUTE))
    base_url = os.environ.get("NOVITA_BASE_URL")
    options: dict[str, Any] = {"base_url": base_url} if base_url else {}
    ctx["novita"] = await stack.enter_async_context(AsyncNovita(rate_limiter=limiter, **options))


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["stack"].aclose()


class WorkerSettings:
    functions = [generate]  # noqa: RUF012 - arq reads class attributes
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    max_jobs = 32  # prompts in flight per worker (mostly waiting on Novita)
    job_timeout = JOB_TIMEOUT
    max_tries = 5


async def enqueue(batch: str, prompts: list[str]) -> None:
    pool = await create_pool(RedisSettings.from_dsn(REDIS_URL))
    for index, prompt in enumerate(prompts):
        # The job id makes enqueueing idempotent too: running this twice queues nothing new.
        await pool.enqueue_job("generate", batch, index, prompt, _job_id=f"{batch}:{index}")
    await pool.aclose()
    print(f"queued {len(prompts)} prompts as batch {batch!r}")


async def status(batch: str) -> None:
    pool = await create_pool(RedisSettings.from_dsn(REDIS_URL))
    index = 0
    while True:
        journal = RedisJournal(pool, journal_name(batch, index))
        record = await journal.get(0)
        await journal.aclose()
        if record is None:
            break
        print(index, record.state, f"posts={record.attempts}", record.task_id, record.error or "")
        index += 1
    await pool.aclose()


if __name__ == "__main__":
    command, batch_name, *rest = sys.argv[1:]
    asyncio.run(enqueue(batch_name, rest) if command == "enqueue" else status(batch_name))
