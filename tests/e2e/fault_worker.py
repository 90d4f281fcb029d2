"""A worker process for the fault-tolerance e2e tests; every task type misbehaves on purpose.

Configured by environment variables:

- ``RECORD_FILE`` (required): one line per handler event, appended atomically:
  ``<what> <execution_id> <node_id> <attempt> <pid> <worker_id>`` where ``what`` is
  ``start``, ``done``, ``cancelled`` (an async handler got ``asyncio.CancelledError``) or
  ``sync-cancelled`` (a sync handler saw ``ctx.cancelled`` become True).
- ``FAULT_TASKS``: comma-separated task types to serve (default: all of them).
- ``WORKER_ID``: the worker id to register with (default: assigned by the coordinator).
- ``WORKER_CONCURRENCY`` (default 16).
- ``HOLD_SECONDS`` (default 60): how long ``hold`` and ``sync_hold`` run unless cancelled;
  0 makes them return at once.
- ``FIX_FLAG``: a file path; once the file exists ``slow``, ``silent`` and ``boom`` succeed
  at once ("the handler was fixed").
- ``SLEEP_SECONDS`` (default 30): how long ``slow`` sleeps (past its start-to-close).
- ``SILENT_SECONDS`` (default 3): how long ``silent`` blocks the event loop, so that the
  worker's automatic heartbeats stop.
- ``STEP_MIN_SECONDS``/``STEP_MAX_SECONDS`` (default 0.05/0.1): how long ``step`` takes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from worker_sdk import TaskContext, Worker, task

_fd = os.open(os.environ["RECORD_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
_HOLD = float(os.environ.get("HOLD_SECONDS", "60"))
_SLEEP = float(os.environ.get("SLEEP_SECONDS", "30"))
_SILENT = float(os.environ.get("SILENT_SECONDS", "3"))
_STEP_MIN = float(os.environ.get("STEP_MIN_SECONDS", "0.05"))
_STEP_MAX = float(os.environ.get("STEP_MAX_SECONDS", "0.1"))
_FIX_FLAG = os.environ.get("FIX_FLAG", "")


def _record(what: str, ctx: TaskContext) -> None:
    line = f"{what} {ctx.execution_id} {ctx.node_id} {ctx.attempt} {os.getpid()} {ctx.worker_id}\n"
    os.write(_fd, line.encode())


def _fixed() -> bool:
    return bool(_FIX_FLAG) and Path(_FIX_FLAG).exists()


@task("hold")
async def hold(ctx: TaskContext, data: Any) -> Any:
    """Waits HOLD_SECONDS (or until cancelled): a long-running handler."""
    _record("start", ctx)
    try:
        await asyncio.sleep(_HOLD)  # the long-running work itself, not a wait
    except asyncio.CancelledError:
        _record("cancelled", ctx)
        raise
    _record("done", ctx)
    return {"held_by": ctx.worker_id}


@task("sync_hold")
def sync_hold(ctx: TaskContext, data: Any) -> Any:
    """A sync handler that runs HOLD_SECONDS unless ``ctx.cancelled`` becomes True."""
    _record("start", ctx)
    deadline = time.monotonic() + _HOLD
    while time.monotonic() < deadline:
        if ctx.cancelled:
            _record("sync-cancelled", ctx)
            return {"cancelled": True}
        time.sleep(0.02)  # the handler's own work between checks of ctx.cancelled
    _record("done", ctx)
    return {"held_by": ctx.worker_id}


@task("first")
async def first(ctx: TaskContext, data: Any) -> Any:
    _record("start", ctx)
    _record("done", ctx)
    return {"first": data}


@task("slow")
async def slow(ctx: TaskContext, data: Any) -> Any:
    """Sleeps past its start-to-close timeout unless fixed."""
    _record("start", ctx)
    if not _fixed():
        try:
            await asyncio.sleep(_SLEEP)  # overrunning its timeout is the fault under test
        except asyncio.CancelledError:
            _record("cancelled", ctx)
            raise
    _record("done", ctx)
    return {"slow": "ok"}


@task("silent")
async def silent(ctx: TaskContext, data: Any) -> Any:
    """Blocks the worker's event loop unless fixed, so its heartbeats stop."""
    _record("start", ctx)
    if not _fixed():
        time.sleep(_SILENT)  # noqa: ASYNC251 - blocking the loop is the fault under test
    _record("done", ctx)
    return {"silent": "ok"}


@task("boom")
async def boom(ctx: TaskContext, data: Any) -> Any:
    """Raises ValueError unless fixed."""
    _record("start", ctx)
    if not _fixed():
        raise ValueError(f"boom on attempt {ctx.attempt}")
    _record("done", ctx)
    return {"boom": "ok"}


@task("step")
async def step(ctx: TaskContext, data: Any) -> Any:
    """A short unit of work (STEP_MIN_SECONDS..STEP_MAX_SECONDS) passing its input on."""
    _record("start", ctx)
    await asyncio.sleep(random.uniform(_STEP_MIN, _STEP_MAX))  # the work's duration
    _record("done", ctx)
    return {"n": data["n"], "path": [*data.get("path", []), ctx.node_id]}


ALL_TASKS = [hold, sync_hold, first, slow, silent, boom, step]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    wanted = os.environ.get("FAULT_TASKS", "")
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    tasks = [t for t in ALL_TASKS if not names or t.name in names]
    unknown = names - {t.name for t in ALL_TASKS}
    if unknown:
        raise SystemExit(f"FAULT_TASKS names unknown task types: {sorted(unknown)}")
    Worker(
        tasks=tasks,
        address=os.environ["TRELLIS_ADDRESS"],
        worker_id=os.environ.get("WORKER_ID") or None,
        concurrency=int(os.environ.get("WORKER_CONCURRENCY", "16")),
        poll_wait=5.0,
    ).run()
