"""Child process of tests/test_redis_journal.py: a journaled batch driven by hand.

    python tests/_redis_journal_writer.py REDIS_URL NAME BASE_URL API_KEY PROMPTS
        [--stop-at I] [--lease S]

Prompts are ``prompt 0`` .. ``prompt N-1``, one at a time, following the journal rules
(the lead's batch engine will do the same): finished records are skipped; submitted
ones are waited for; ``submitting``/``uncertain`` ones are reported, never re-sent;
``new``/``rejected`` ones are journaled ``submitting``, POSTed, journaled ``submitted``.
With ``--stop-at I`` the run journals prompt I as ``submitting``, prints
``{"event": "stopped", "index": I}`` and sleeps forever *before* its POST (to be
killed). If the journal is in use it prints ``{"event": "refused"}``; at the end
``{"event": "done", "posted": n, "uncertain": [...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import httpx

from novita_async import JournalError, Txt2ImgRequest, request_key
from novita_async._convert import request_body, task_result
from novita_async.redis import RedisJournal


def emit(**line: Any) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


async def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("redis_url", "name", "base_url", "api_key"):
        parser.add_argument(name)
    parser.add_argument("prompts", type=int)
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--lease", type=float, default=30.0)
    args = parser.parse_args()
    requests = [
        Txt2ImgRequest(model_name="m.safetensors", prompt=f"prompt {i}")
        for i in range(args.prompts)
    ]
    journal = RedisJournal(args.redis_url, args.name, lease=args.lease)
    try:
        await journal.open()
    except JournalError:
        emit(event="refused")
        return
    headers = {"Authorization": f"Bearer {args.api_key}"}
    posted, uncertain = 0, []
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers) as http:
        keep = asyncio.create_task(journal.keepalive())
        records = await journal.begin([(i, request_key(r, None)) for i, r in enumerate(requests)])
        for index, request in enumerate(requests):
            record = records[index]
            if record.is_finished:
                continue
            if record.state in ("submitting", "uncertain"):
                uncertain.append(index)
                continue
            task_id = record.task_id
            if task_id is None:
                await journal.mark_submitting(index)
                if index == args.stop_at:
                    emit(event="stopped", index=index)
                    await asyncio.sleep(3600)
                answer = await http.post("/v3/async/txt2img", json=request_body(request, None))
                answer.raise_for_status()
                posted += 1
                task_id = str(answer.json()["task_id"])
                await journal.mark_submitted(index, task_id)
            got = await http.get("/v3/async/task-result", params={"task_id": task_id})
            await journal.mark_finished(index, result=task_result(got.json()), error=None)
        keep.cancel()
    await journal.aclose()
    emit(event="done", posted=posted, uncertain=uncertain)


if __name__ == "__main__":
    asyncio.run(main())
