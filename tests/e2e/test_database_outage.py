"""The database goes away while tasks run, then comes back (PostgreSQL, real processes).

The coordinator reaches PostgreSQL through a TCP proxy that the test cuts and restores;
the shared server keeps running. During the outage RPCs answer UNAVAILABLE ("database
unavailable"), the worker keeps its finished results and re-sends them; afterwards every
execution succeeds with each node run exactly once.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.support.procs import ROOT, spawn_coordinator, spawn_worker
from tests.support.tcp_proxy import TcpProxy
from tests.support.wait import wait_for
from trellis.v1 import common_pb2
from worker_sdk import Client, UnavailableError

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

EXECUTIONS = 4
WAIT = 90.0

# A worker whose task sleeps, so it is in flight when the database goes away; it records
# every invocation ("execution node attempt") to $RECORD_FILE.
WORKER = textwrap.dedent(
    f"""
    import asyncio, logging, os, sys
    sys.path.insert(0, {str(ROOT)!r})
    from worker_sdk import Worker, task

    fd = os.open(os.environ["RECORD_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @task("nap")
    async def nap(ctx, data):
        os.write(fd, f"{{ctx.execution_id}} {{ctx.node_id}} {{ctx.attempt}}\\n".encode())
        await asyncio.sleep(1.5)  # in flight when the database goes away: the fault
        return {{"node": ctx.node_id}}

    logging.basicConfig(level=logging.WARNING)
    Worker(tasks=[nap], address=os.environ["TRELLIS_ADDRESS"], concurrency=16).run()
    """
)


def chain() -> common_pb2.WorkflowDefinition:
    defn = common_pb2.WorkflowDefinition(name="outage")
    for node_id in ("a", "b"):
        defn.nodes.add(id=node_id, task_type="nap")
    defn.edges.add(source="a", target="b")
    return defn


def records(path: Path) -> list[tuple[str, str, int]]:
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(e, n, int(a)) for e, n, a in rows]


async def test_in_flight_results_survive_a_database_outage(
    fresh_postgres_url: str, tmp_path: Path
) -> None:
    url = make_url(fresh_postgres_url)
    record = tmp_path / "calls.txt"
    script = tmp_path / "nap_worker.py"
    script.write_text(WORKER)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        # Generous liveness and sweep settings: the outage (a few seconds) must not look
        # like a lost worker, so no task is legitimately re-run.
        coordinator, address = spawn_coordinator(
            proxied, tmp_path, worker_liveness_timeout="120s", heartbeat_interval="1s"
        )
        worker = spawn_worker(script, address, tmp_path, "nap-worker", RECORD_FILE=str(record))
        try:
            async with Client(address, timeout=10) as client:
                await client.register_workflow(chain())
                ids = [
                    (await client.start_execution("outage", {"i": i})).id for i in range(EXECUTIONS)
                ]

                async def all_first_nodes_running() -> bool:
                    return len(records(record)) >= EXECUTIONS

                await wait_for(all_first_nodes_running, timeout=WAIT)
                proxy.cut()  # while the "a" tasks sleep

                with pytest.raises(UnavailableError) as down:
                    await client.get_execution(ids[0])
                assert "database unavailable" in down.value.message

                async def results_refused() -> bool:
                    return "delivering results to" in worker.output()

                # The handlers finish during the outage; their results are refused and kept.
                await wait_for(results_refused, timeout=WAIT, interval=0.1)
                assert {n for _, n, _ in records(record)} == {"a"}
                proxy.restore()

                done = await asyncio.gather(
                    *(client.wait_for_execution(i, timeout=WAIT) for i in ids)
                )
                for execution in done:
                    assert execution.status == "SUCCEEDED", execution
                    assert {n.node_id: n.attempt for n in execution.nodes} == {"a": 1, "b": 1}
                    events = [ev async for ev in client.watch_execution(execution.id)]
                    succeeded = Counter(ev.node_id for ev in events if ev.type == "NODE_SUCCEEDED")
                    assert succeeded == {"a": 1, "b": 1}, events
        finally:
            worker_exit = worker.stop()
            coordinator_exit = coordinator.stop()
    calls = records(record)
    assert Counter((e, n) for e, n, _ in calls) == {(e, n): 1 for e in ids for n in ("a", "b")}
    assert {a for _, _, a in calls} == {1}  # no task re-run
    assert worker_exit == 0, worker.output()[-3000:]
    assert coordinator_exit == 0, coordinator.output()[-3000:]
