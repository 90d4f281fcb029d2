"""Handlers for tests/e2e/test_chaos.py, run as a real worker process (and SIGKILLed at will).

TRELLIS_ADDRESS=... [WORKER_CONCURRENCY=n] python tests/support/chaos_worker.py

- ``chaos-noop``: returns at once (the fan-out and fan-in nodes);
- ``chaos-sleep``: sleeps 5 ms (the three parallel nodes).
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


@task("chaos-noop")
async def noop(ctx: TaskContext, data: Any) -> Any:
    return {"node": ctx.node_id}


@task("chaos-sleep")
async def sleep(ctx: TaskContext, data: Any) -> Any:
    await asyncio.sleep(0.005)  # the work's duration
    return {"node": ctx.node_id}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    # "registered with ...": the test waits for it before its final SIGTERM.
    logging.getLogger("worker_sdk._worker").setLevel(logging.INFO)
    Worker(
        tasks=[noop, sleep],
        address=os.environ["TRELLIS_ADDRESS"],
        concurrency=int(os.environ.get("WORKER_CONCURRENCY", "16")),
        poll_wait=5.0,
    ).run()
