"""The example diamond worker, recording every handler invocation to $RECORD_FILE.

One line per call: ``execution_id node_id attempt pid`` (O_APPEND writes, atomic per line).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import diamond_worker

from worker_sdk import Task, TaskContext, Worker, task

_fd = os.open(os.environ["RECORD_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _record(ctx: TaskContext) -> None:
    os.write(_fd, f"{ctx.execution_id} {ctx.node_id} {ctx.attempt} {os.getpid()}\n".encode())


def recorded(original: Task) -> Task:
    if original.is_async:

        async def async_handler(ctx: TaskContext, data: Any) -> Any:
            _record(ctx)
            return await original.handler(ctx, data)

        return task(original.name)(async_handler)

    def sync_handler(ctx: TaskContext, data: Any) -> Any:
        _record(ctx)
        return original.handler(ctx, data)

    return task(original.name)(sync_handler)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    Worker(
        tasks=[recorded(t) for t in diamond_worker.TASKS],
        address=os.environ["TRELLIS_ADDRESS"],
        concurrency=int(os.environ.get("WORKER_CONCURRENCY", "32")),
    ).run()
