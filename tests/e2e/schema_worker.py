"""A worker for tests/e2e/test_schemas.py: ``price`` returns the total its input names
(the test sends a negative one to break the node's output_schema), ``ship`` says ok."""

from __future__ import annotations

import logging
import os
from typing import Any

from worker_sdk import TaskContext, Worker, task


@task("price")
async def price(ctx: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
    return {"total": data["total"]}


@task("ship")
async def ship(ctx: TaskContext, data: dict[str, Any]) -> dict[str, Any]:
    return {"shipped": data["total"]}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    Worker(tasks=[price, ship], address=os.environ["TRELLIS_ADDRESS"]).run()
