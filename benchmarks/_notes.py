"""The README's "how to read it" text under the benchmark tables."""

from __future__ import annotations

__all__ = ["NOTES"]

NOTES = [
    "How to read it:",
    "",
    "- Every scenario runs in a fresh client process against the emulator in another "
    "process over loopback HTTP (no IPM quota; every task runs at once, but on `queued`), "
    "except the webhook rows (one process, see there). *polls/task* counts task-result GETs "
    "the emulator received per measured task; *added latency* is the caller getting the "
    "result minus the emulator's completion instant (both `time.monotonic()`, one clock for "
    "both processes). CPU is the client process's own (`time.process_time()` over the "
    "measured batch); RSS growth is peak RSS (`ru_maxrss`) minus RSS when the batch "
    "started. *max in flight*: the scheduler's most task-result GETs at once (the loops: "
    "requests inside their transport).",
    "- Durations are a pure function of each request, so every client sees the same tasks. "
    "`uniform` tells the client nothing from the request: no scheduler can aim its first poll, "
    "and an integer eta (`uniform-eta`) bounds the finish to a one-second window. `cost` is "
    "proportional to steps x megapixels x images; `affine` adds a fixed part per task (model "
    "load, VAE, upload, queueing) drawn per task from U(0.6, 1.2) s, closer to real GPUs; "
    "`affine-const` has the same fixed part, 0.9 s, for every task. On `affine` what the "
    "request does not explain is wide: at every size the 5-85 % quantile range of the "
    "durations is 0.48-0.52 s, so any policy with <= 1.15 polls per task (one poll at the 85 % "
    "quantile or later for most tasks) leaves about a third of them more than 0.3 s late, even "
    "knowing the distribution exactly: the oracle (see the workloads table) needs >= 1.5 "
    "polls per task for a p95 of 0.3 s there (#9's warm goal is only reachable on "
    "`affine-const`). `bursts` submits the `affine` prompts "
    "in 5 waves 2 s apart: later waves meet a client that has learned from earlier ones. "
    "`queued` runs the `affine` prompts on a server that queues what it cannot run at once: "
    "durations from submission grow with the queue, and the client sees `QUEUED`.",
    "- cold: a fresh client, the whole batch submitted before any task finished (nothing "
    "learned); warm: the same client first ran other tasks of the same workload.",
    "- The hand-written baseline (`naive`) uses httpx's default pool with every task's request "
    "in flight at once; on this 2-core machine httpcore's pool costs milliseconds of CPU per "
    "request under that load, so the loop is CPU-bound at 1000 prompts and its latency grows. "
    "The fixed-interval loops of the trade-off run on httpx-aiohttp so that the interval alone "
    "sets their latency.",
    "- Single timings vary by 10-20 % from run to run on a shared machine; compare rows of the "
    "same run, and re-run a surprising row on its own (`--sections`).",
]
