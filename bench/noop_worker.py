"""Bench worker: one no-op async handler for task type ``noop``.

Env: TRELLIS_ADDRESS, WORKER_CONCURRENCY (default 32), RECORD_FILE (optional: one line
``execution_id node_id time.time()`` appended when a handler starts, for dispatch latency).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from worker_sdk import TaskContext, Worker, task

_record = os.environ.get("RECORD_FILE")
_fd = os.open(_record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if _record else None


@task("noop")
async def noop(ctx: TaskContext, data: Any) -> Any:
    if _fd is not None:
        os.write(_fd, f"{ctx.execution_id} {ctx.node_id} {time.time():.6f}\n".encode())
    return {}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    Worker(
        tasks=[noop],
        address=os.environ["TRELLIS_ADDRESS"],
        concurrency=int(os.environ.get("WORKER_CONCURRENCY", "32")),
    ).run()
