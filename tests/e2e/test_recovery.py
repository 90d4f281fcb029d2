"""Recovery from killed processes: a worker and the coordinator, each with SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.faults import FAULT_WORKER, count_records, history, of_node, read_records
from tests.support.procs import Proc, free_port, spawn_coordinator, spawn_worker
from tests.support.wait import wait_for
from worker_sdk import Client, UnavailableError, Workflow

pytestmark = pytest.mark.e2e

HELD_RUNS = 10
CHAIN_RUNS = 100
CHAIN = ("s1", "s2", "s3")


def _stop_all(procs: list[Proc]) -> list[int]:
    return [p.stop() for p in procs]


async def test_sigkilled_worker_leases_are_retried_by_another_worker(
    db_url: str, tmp_path: Path
) -> None:
    """Worker A holds 10 leases (5 min start-to-close) and is SIGKILLed: the liveness sweep
    fails its leases as WorkerLost within seconds and worker B finishes every execution."""
    coordinator, address = spawn_coordinator(
        db_url,
        tmp_path,
        heartbeat_interval="500ms",
        worker_liveness_timeout="2s",
        sweep_interval="200ms",
    )
    record = tmp_path / "calls.txt"
    common = {"RECORD_FILE": str(record), "FAULT_TASKS": "hold", "WORKER_CONCURRENCY": "16"}
    worker_a = spawn_worker(
        FAULT_WORKER, address, tmp_path, "worker-a", WORKER_ID="worker-a", **common
    )
    workers = [worker_a]
    try:
        async with Client(address) as client:
            wf = Workflow("hold-one")
            wf.node("hold", "hold", timeout="5m", retries=2, retry_initial_interval="100ms")
            await client.register_workflow(wf)
            started = await asyncio.gather(
                *(client.start_execution("hold-one", {"i": i}) for i in range(HELD_RUNS))
            )
            ids = [e.id for e in started]

            async def all_leased_to_a() -> bool:
                runs = await asyncio.gather(*(client.get_execution(i) for i in ids))
                return all(
                    r.node("hold").status == "LEASED" and r.node("hold").worker_id == "worker-a"
                    for r in runs
                )

            async def all_running_in_a() -> bool:
                return len(count_records(record, "start")) == HELD_RUNS

            await wait_for(all_leased_to_a, timeout=30)
            await wait_for(all_running_in_a, timeout=10)

            killed_at = time.monotonic()
            assert worker_a.stop(signal.SIGKILL) == -signal.SIGKILL
            workers.append(
                spawn_worker(
                    FAULT_WORKER,
                    address,
                    tmp_path,
                    "worker-b",
                    WORKER_ID="worker-b",
                    HOLD_SECONDS="0",
                    **common,
                )
            )
            finished = await asyncio.gather(
                *(client.wait_for_execution(i, timeout=60) for i in ids)
            )
            recovery = time.monotonic() - killed_at
            print(
                f"\nrecovery: {recovery:.2f} s from SIGKILL of the worker to {HELD_RUNS} "
                "executions SUCCEEDED (heartbeat_interval=500ms, worker_liveness_timeout=2s, "
                "sweep_interval=200ms, start_to_close=5m, retry after 100ms)"
            )
            for execution in finished:
                assert execution.status == "SUCCEEDED", execution
                node = execution.node("hold")
                assert node.attempt == 2, node
                assert node.worker_id == "worker-b", node
                assert execution.output == {"held_by": "worker-b"}
                events = await history(client, execution.id)
                leased = of_node(events, "hold", "NODE_LEASED")
                assert [(e.attempt, e.worker_id) for e in leased] == [
                    (1, "worker-a"),
                    (2, "worker-b"),
                ]
                (failed,) = of_node(events, "hold", "NODE_ATTEMPT_FAILED")
                assert failed.attempt == 1
                assert failed.details["error_type"] == "WorkerLost", failed
                succeeded = of_node(events, "hold", "NODE_SUCCEEDED")
                assert [e.attempt for e in succeeded] == [2]
            # Far below the 5-minute start-to-close: only the liveness sweep can explain it.
            assert recovery < 30, f"recovery took {recovery:.1f}s"
    finally:
        exit_codes = _stop_all(workers)
        coordinator_exit = coordinator.stop()
    records = read_records(record)
    by_a = [r for r in records if r.worker_id == "worker-a"]
    assert {(r.what, r.attempt) for r in by_a} == {("start", 1)}, "A never finished a task"
    done_by_b = Counter(r.execution_id for r in records if r.what == "done")
    assert done_by_b == dict.fromkeys(ids, 1)
    assert exit_codes[1:] == [0], workers[1].output()
    assert coordinator_exit == 0, coordinator.output()


async def test_coordinator_sigkill_mid_run_then_restart_finishes_everything_once(
    db_url: str, tmp_path: Path
) -> None:
    """100 three-step chains; the coordinator is SIGKILLed once ~30 have finished and
    restarted on the same database and port. Two workers stay up throughout (reconnecting
    and re-delivering results): all 100 succeed and no node ever succeeds twice."""
    port = free_port()
    # A poll whose reply is lost in the kill leaves a lease its worker never received; it
    # is recovered by the lost-worker sweep once that worker goes quiet. A 5 s liveness
    # window (default 15 s) keeps that wait short and still far above the restart's gap.
    settings = {
        "sweep_interval": "200ms",
        "heartbeat_interval": "1s",
        "worker_liveness_timeout": "5s",
    }
    coordinator, address = spawn_coordinator(db_url, tmp_path, port=port, **settings)
    record = tmp_path / "calls.txt"
    workers = [
        spawn_worker(
            FAULT_WORKER,
            address,
            tmp_path,
            f"worker-{i}",
            RECORD_FILE=str(record),
            FAULT_TASKS="step",
            WORKER_ID=f"step-{i}",
            WORKER_CONCURRENCY="3",
        )
        for i in range(2)
    ]
    try:
        async with Client(address) as client:
            wf = Workflow("chain3")
            previous: list[str] = []
            for node_id in CHAIN:
                wf.node(node_id, "step", after=previous, retries=3, retry_initial_interval="100ms")
                previous = [node_id]
            await client.register_workflow(wf)
            started = await asyncio.gather(
                *(client.start_execution("chain3", {"n": i}) for i in range(CHAIN_RUNS))
            )
            inputs = {e.id: i for i, e in enumerate(started)}

            async def succeeded() -> int:
                try:
                    done = await client.list_executions(status="SUCCEEDED", limit=CHAIN_RUNS)
                except UnavailableError:  # the client's channel is still reconnecting
                    return 0
                return len(done)

            async def thirty_percent_done() -> int:
                n = await succeeded()
                return n if n >= CHAIN_RUNS * 3 // 10 else 0

            at_kill = await wait_for(thirty_percent_done, timeout=60, interval=0.02)
            killed_at = time.monotonic()
            assert coordinator.stop(signal.SIGKILL) == -signal.SIGKILL
            killed_wall = datetime.now(UTC)
            killed_log = coordinator.log.rename(tmp_path / "coordinator-killed.log")
            assert at_kill < CHAIN_RUNS, "the kill should land mid-run"

            coordinator, _ = spawn_coordinator(db_url, tmp_path, port=port, **settings)

            async def all_done() -> bool:
                return await succeeded() == CHAIN_RUNS

            await wait_for(all_done, timeout=60, interval=0.2)
            finished_after = time.monotonic() - killed_at

            carried_over = 0  # attempts leased before the kill and completed after it
            retried: Counter[str] = Counter()  # attempts failed, by error type
            for execution_id, n in inputs.items():
                execution = await client.get_execution(execution_id)
                assert execution.status == "SUCCEEDED", execution
                assert [node.status for node in execution.nodes] == ["SUCCEEDED"] * 3
                assert execution.output == {"n": n, "path": list(CHAIN)}
                events = await history(client, execution_id)
                succeeded_nodes = Counter(e.node_id for e in events if e.type == "NODE_SUCCEEDED")
                assert succeeded_nodes == dict.fromkeys(CHAIN, 1), (execution_id, events)
                assert [e.type for e in events].count("EXECUTION_SUCCEEDED") == 1
                retried.update(
                    e.details["error_type"] for e in events if e.type == "NODE_ATTEMPT_FAILED"
                )
                for node_id in CHAIN:
                    *_, leased = of_node(events, node_id, "NODE_LEASED")
                    (done,) = of_node(events, node_id, "NODE_SUCCEEDED")
                    assert done.attempt == leased.attempt
                    assert leased.time is not None and done.time is not None
                    carried_over += leased.time < killed_wall < done.time
            # Results of handlers in flight at the kill were kept by their workers and
            # delivered to the restarted coordinator.
            assert carried_over >= 1
    finally:
        exit_codes = _stop_all(workers)
        coordinator_exit = coordinator.stop()
    starts = len([r for r in read_records(record) if r.what == "start"])
    print(
        f"\ncoordinator SIGKILL at {at_kill}/{CHAIN_RUNS} executions finished; all "
        f"{CHAIN_RUNS} SUCCEEDED {finished_after:.2f}s after the kill (restart included); "
        f"{starts} handler starts for {CHAIN_RUNS * len(CHAIN)} nodes; {carried_over} "
        f"attempts leased before the kill completed after it; failed attempts: {dict(retried)}"
    )
    assert exit_codes == [0, 0], [w.output() for w in workers]
    assert coordinator_exit == 0, coordinator.output() + killed_log.read_text()
