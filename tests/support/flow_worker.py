"""Handlers for tests/e2e/test_control_flow.py, run as a real worker process.

TRELLIS_ADDRESS=... python tests/support/flow_worker.py
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from worker_sdk import NonRetryableError, Result, TaskContext, TaskNode, Worker, task

CHILD_ERROR = "card declined: insufficient funds"


@task("echo")
async def echo(ctx: TaskContext, data: Any) -> Any:
    return data


@task("fail-always")
async def fail_always(ctx: TaskContext, data: Any) -> Any:
    raise NonRetryableError(CHILD_ERROR)


@task("block")
async def block(ctx: TaskContext, data: Any) -> Any:
    """Runs until the coordinator cancels it (bounded: gives up after 120 s)."""
    for _ in range(1200):
        ctx.heartbeat({"waiting": True})
        await asyncio.sleep(0.1)  # the handler's own heartbeat period, not a wait
    raise NonRetryableError("block was never cancelled")


@task("range")
async def make_range(ctx: TaskContext, data: Any) -> list[int]:
    return list(range(int(data["n"])))


@task("double-item")
async def double_item(ctx: TaskContext, item: int) -> int:
    if ctx.map_index != item:
        raise NonRetryableError(f"map_index {ctx.map_index} does not match element {item}")
    await asyncio.sleep(0.01)  # long enough for leases to overlap
    return item * 2


@task("expand-cycle")
async def expand_cycle(ctx: TaskContext, data: Any) -> Result:
    return Result(
        {"expanded": True},
        add_nodes=(TaskNode("extra_a", "echo"), TaskNode("extra_b", "echo")),
        add_edges=(("seed", "extra_a"), ("extra_a", "extra_b"), ("extra_b", "extra_a")),
    )


TASKS = [echo, fail_always, block, make_range, double_item, expand_cycle]

if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("TRELLIS_LOG_LEVEL", "INFO"))
    Worker(tasks=TASKS, address=os.environ["TRELLIS_ADDRESS"], concurrency=50).run()
