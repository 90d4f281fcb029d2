"""A Python worker for examples/diamond.yaml.

    python examples/diamond_worker.py            # TRELLIS_ADDRESS defaults to 127.0.0.1:7400

Each handler gets the node's input: `prepare` the execution input, `double` and
`square` the output of `prepare`, and `combine` an object keyed by its parents' ids.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from worker_sdk import DEFAULT_ADDRESS, NonRetryableError, TaskContext, Worker, task


@task("prepare")
async def prepare(ctx: TaskContext, data: dict[str, Any]) -> dict[str, int]:
    n = data.get("n") if isinstance(data, dict) else None
    if not isinstance(n, int):
        raise NonRetryableError('input must look like {"n": 3}')
    return {"n": n}


@task("double")
async def double(ctx: TaskContext, data: dict[str, int]) -> dict[str, int]:
    return {"doubled": data["n"] * 2}


@task("square", timeout="30s")
def square(ctx: TaskContext, data: dict[str, int]) -> dict[str, int]:
    # A plain function runs in a thread pool; it may report progress too.
    ctx.heartbeat({"squaring": data["n"]})
    return {"squared": data["n"] ** 2}


@task("combine")
async def combine(ctx: TaskContext, data: dict[str, dict[str, int]]) -> dict[str, int]:
    ctx.logger.info("combining %s", sorted(data))
    return {"sum": data["double"]["doubled"] + data["square"]["squared"]}


TASKS = [prepare, double, square, combine]

if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("TRELLIS_LOG_LEVEL", "INFO"))
    Worker(
        tasks=TASKS,
        address=os.environ.get("TRELLIS_ADDRESS", DEFAULT_ADDRESS),
        concurrency=int(os.environ.get("WORKER_CONCURRENCY", "16")),
    ).run()
