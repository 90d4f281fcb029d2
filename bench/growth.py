"""How the coordinator's cost grows with the backlog and with DAG width:
``python -m bench.growth [--db sqlite|postgres|both] [--backlogs N,N] [--widths W,W]``.

In-process (the ``Coordinator`` use cases on a real store, no gRPC, no worker processes), so
the figures are the coordinator's and the database's own cost per operation:

- backlog: N single-node executions READY (started with ``batch_start_executions``, 1,000
  per batch; the start rate is reported), then 500 tasks taken one by one from the front of
  the queue (``poll_tasks`` of 1, ``complete_task``), and 20 polls of 32; ms per task (with
  a backlog under 1,140, half and half).
- width: a 1 → W → 1 fan-out/fan-in run to the end by polling up to W tasks at a time;
  total ms, and ms per node.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from bench.run import PG_ADMIN_URL, fan_wf, single_wf
from coordinator.config import CoordinatorConfig
from coordinator.grpc import convert
from coordinator.grpc.server import RunningServer, start
from coordinator.service import Coordinator, StartRequest
from coordinator.store import open_store
from worker_sdk import Workflow

TENANT = "default"
WORKER = "growth-worker"


@asynccontextmanager
async def coordinator(db: str) -> AsyncIterator[Coordinator]:
    """A coordinator on a fresh database (a temp SQLite file, or a new PostgreSQL database
    dropped afterwards)."""
    admin = None
    name = ""
    with tempfile.TemporaryDirectory() as tmp:
        if db == "sqlite":
            url = f"sqlite:///{Path(tmp) / 'growth.db'}"
        else:
            name = f"growth_{uuid.uuid4().hex[:10]}"
            admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        store = await open_store(url)
        running: RunningServer | None = None
        try:
            running = await start(CoordinatorConfig(listen="127.0.0.1:0"), store)
            yield running.coordinator
        finally:
            if running is not None:
                await running.stop()
            await store.close()
            if admin is not None:
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
                admin.dispose()


async def register(c: Coordinator, wf: Workflow) -> None:
    await c.definitions.register_workflow(convert.definition_from_proto(wf.to_proto(), TENANT))
    await c.leasing.register_worker(TENANT, WORKER, ["noop"], 1000)


async def run_tasks(c: Coordinator, n: int, batch: int) -> float:
    """Poll ``batch`` at a time and complete, until ``n`` tasks are done: ms per task."""
    done = 0
    t0 = time.perf_counter()
    while done < n:
        tasks = await c.leasing.poll_tasks(
            TENANT, WORKER, ["noop"], min(batch, n - done), timedelta(0)
        )
        if not tasks:
            raise RuntimeError(f"the queue ran dry after {done} tasks")
        for t in tasks:
            await c.results.complete_task(TENANT, t.token, b"{}", WORKER)
        done += len(tasks)
    return (time.perf_counter() - t0) * 1000 / n


async def backlog(db: str, n: int) -> dict[str, float]:
    async with coordinator(db) as c:
        await register(c, single_wf())
        t0 = time.perf_counter()
        for first in range(0, n, 1000):
            count = min(1000, n - first)
            await c.starts.batch_start_executions(
                TENANT, [StartRequest("single", input=b"{}")] * count
            )
        starts = n / (time.perf_counter() - t0)
        first = min(500, n // 2)
        one = await run_tasks(c, first, 1)
        many = await run_tasks(c, min(20 * 32, n - first), 32)
    return {"starts_per_s": starts, "ms_per_task_poll1": one, "ms_per_task_poll32": many}


async def width(db: str, w: int) -> dict[str, float]:
    async with coordinator(db) as c:
        await register(c, fan_wf(w))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            execution, _ = await c.starts.start_execution(TENANT, "fan", None, b"{}")
            await run_tasks(c, w + 2, w)
            times.append((time.perf_counter() - t0) * 1000)
            view = await c.executions.get_execution(TENANT, execution.id)
            assert view.execution.status.value == "SUCCEEDED", view.execution.status
        total = statistics.median(times)
    return {"total_ms": total, "ms_per_node": total / (w + 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--backlogs", default="10000,100000")
    parser.add_argument("--widths", default="10,100,500")
    args = parser.parse_args(argv)
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    for db in dbs:
        for n in [int(x) for x in args.backlogs.split(",") if x]:
            r = asyncio.run(backlog(db, n))
            print(
                f"{db:8} backlog {n:>7}: {r['starts_per_s']:7.0f} starts/s (batches of 1000); "
                f"{r['ms_per_task_poll1']:.2f} ms/task with polls of 1, "
                f"{r['ms_per_task_poll32']:.2f} ms/task with polls of 32",
                flush=True,
            )
        for w in [int(x) for x in args.widths.split(",") if x]:
            r = asyncio.run(width(db, w))
            print(
                f"{db:8} width {w:>5}: 1->{w}->1 in {r['total_ms']:.0f} ms "
                f"({r['ms_per_node']:.2f} ms per node, median of 3)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
