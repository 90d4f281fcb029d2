"""Handlers for tests/e2e/test_dispatch_control.py, run as a real worker process.

TRELLIS_ADDRESS=... [FIXED_FILE=path] [WORKER_CONCURRENCY=n] python tests/support/dispatch_worker.py

- ``tick``: returns at once (rate limits);
- ``keyed``: sleeps 20 ms so that tasks with the same key would overlap without a mutex;
- ``flaky``: fails (retryably) until the file $FIXED_FILE exists (circuit breakers);
- ``work``: sleeps 5 ms (priorities).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from worker_sdk import TaskContext, Worker, task


@task("tick")
async def tick(ctx: TaskContext, data: Any) -> Any:
    return {"i": data.get("i") if isinstance(data, dict) else None}


@task("keyed")
async def keyed(ctx: TaskContext, data: Any) -> Any:
    await asyncio.sleep(0.02)  # the work's duration: same-key tasks would overlap
    return {"account": data["account"]}


@task("flaky")
def flaky(ctx: TaskContext, data: Any) -> Any:
    if not Path(os.environ["FIXED_FILE"]).exists():
        raise RuntimeError("downstream service unavailable")
    return {"ok": True}


@task("work")
async def work(ctx: TaskContext, data: Any) -> Any:
    await asyncio.sleep(0.005)  # the work's duration
    return data


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    Worker(
        tasks=[tick, keyed, flaky, work],
        address=os.environ["TRELLIS_ADDRESS"],
        concurrency=int(os.environ.get("WORKER_CONCURRENCY", "16")),
    ).run()
