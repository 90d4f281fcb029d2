"""Faulty handlers through real processes: timeouts, lost heartbeats and exceptions are
retried with backoff, dead-lettered, then redriven once fixed; cancellation reaches running
handlers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import trellis_cli
from tests.support.faults import FAULT_WORKER, count_records, history, of_node, read_records
from tests.support.procs import ROOT, spawn_coordinator, spawn_worker
from tests.support.wait import wait_for
from worker_sdk import Client, Workflow

pytestmark = pytest.mark.e2e

# Event times are stored in milliseconds: allow for rounding when comparing gaps to delays.
CLOCK_RESOLUTION = 0.002


@dataclass(frozen=True)
class Fault:
    kind: str
    task_type: str
    error_type: str
    node_options: dict[str, Any]
    output: Any


FAULTS = (
    Fault("timeout", "slow", "StartToCloseTimeout", {"timeout": "1s"}, {"slow": "ok"}),
    Fault(
        "heartbeat",
        "silent",
        "HeartbeatTimeout",
        {"timeout": "5m", "heartbeat_timeout": "1s"},
        {"silent": "ok"},
    ),
    Fault("raise", "boom", "ValueError", {}, {"boom": "ok"}),
)


def _chain(fault: Fault) -> Workflow:
    wf = Workflow(f"chain-{fault.kind}")
    first = wf.node("first", "first")
    wf.node(
        "flaky",
        fault.task_type,
        after=first,
        retries=2,
        retry_initial_interval="500ms",
        retry_backoff=2.0,
        **fault.node_options,
    )
    return wf


async def test_failing_handlers_retry_with_backoff_dead_letter_and_redrive(
    db_url: str, tmp_path: Path
) -> None:
    """A handler sleeping past start-to-close, one that stops heartbeating and one that
    raises: each gets 3 attempts 0.5 s then 1 s apart, is dead-lettered and its execution
    FAILED; once fixed, a redrive (CLI for one, Client for the others) finishes the execution
    without running the finished ``first`` node again."""
    # Heartbeat deadlines are enforced once the coordinator has been up for one liveness
    # window (workers may still be reconnecting before that): keep the window short.
    coordinator, address = spawn_coordinator(
        db_url,
        tmp_path,
        heartbeat_interval="500ms",
        sweep_interval="200ms",
        worker_liveness_timeout="2s",
    )
    record = tmp_path / "calls.txt"
    fix_flag = tmp_path / "fixed"
    env = {"RECORD_FILE": str(record), "FIX_FLAG": str(fix_flag), "SILENT_SECONDS": "3"}
    workers = [
        spawn_worker(
            FAULT_WORKER, address, tmp_path, "worker", FAULT_TASKS="first,slow,boom", **env
        ),
        # `silent` blocks its worker's event loop: it gets a process of its own.
        spawn_worker(FAULT_WORKER, address, tmp_path, "blocker", FAULT_TASKS="silent", **env),
    ]
    try:
        async with Client(address) as client:
            for fault in FAULTS:
                await client.register_workflow(_chain(fault))
            started = {
                fault.kind: await client.start_execution(f"chain-{fault.kind}", {"k": fault.kind})
                for fault in FAULTS
            }
            failed = await asyncio.gather(
                *(client.wait_for_execution(e.id, timeout=60) for e in started.values())
            )
            letters = {}
            for fault, execution in zip(FAULTS, failed, strict=True):
                assert execution.status == "FAILED", execution
                assert execution.error is not None and execution.error.node_id == "flaky"
                assert execution.error.type == fault.error_type, execution.error
                assert execution.node("first").status == "SUCCEEDED"
                assert execution.node("flaky").status == "FAILED"
                assert execution.node("flaky").attempt == 3
                events = await history(client, execution.id)
                _check_retries(fault, events)
                assert of_node(events, "flaky", "NODE_DEAD_LETTERED"), fault.kind

                (letter,) = await client.list_dead_letters(workflow_name=f"chain-{fault.kind}")
                assert (letter.execution_id, letter.node_id) == (execution.id, "flaky")
                assert letter.task_type == fault.task_type
                assert letter.input == {"first": {"k": fault.kind}}
                assert [a.attempt for a in letter.attempts] == [1, 2, 3]
                types = [a.error.type if a.error else None for a in letter.attempts]
                assert types == [fault.error_type] * 3, (fault.kind, letter.attempts)
                assert letter.redrive_time is None
                letters[fault.kind] = letter

            fix_flag.touch()  # "deploy the fix"
            cli = await trellis_cli(address, "dlq", "redrive", letters["raise"].id)
            assert cli.returncode == 0, cli.stderr
            for kind in ("timeout", "heartbeat"):
                await client.redrive_dead_letter(letters[kind].id)

            done = await asyncio.gather(
                *(client.wait_for_execution(e.id, timeout=60) for e in started.values())
            )
            for fault, execution in zip(FAULTS, done, strict=True):
                assert execution.status == "SUCCEEDED", (fault.kind, execution)
                assert execution.output == fault.output
                events = await history(client, execution.id)
                assert len(of_node(events, "flaky", "NODE_REDRIVEN")) == 1, fault.kind
                assert len(of_node(events, "flaky", "NODE_SUCCEEDED")) == 1, fault.kind
                # The node that had finished before the failure was not run again.
                assert len(of_node(events, "first", "NODE_LEASED")) == 1, fault.kind
                assert len(of_node(events, "first", "NODE_SUCCEEDED")) == 1, fault.kind
            assert await client.list_dead_letters() == []
            redriven = await client.list_dead_letters(include_redriven=True)
            assert {d.id for d in redriven} == {d.id for d in letters.values()}
            assert all(d.redrive_time is not None for d in redriven)
    finally:
        exit_codes = [w.stop() for w in workers]
        coordinator_exit = coordinator.stop()
    first_runs = count_records(record, "start")
    for execution in started.values():
        assert first_runs[(execution.id, "first")] == 1, "first ran again"
    assert exit_codes == [0, 0], [w.output() for w in workers]
    assert coordinator_exit == 0, coordinator.output()


def _check_retries(fault: Fault, events: list[Any]) -> None:
    """3 attempts of the same error, retried after 0.5 s then 1 s, never earlier."""
    leased = of_node(events, "flaky", "NODE_LEASED")
    failures = of_node(events, "flaky", "NODE_ATTEMPT_FAILED")
    scheduled = of_node(events, "flaky", "NODE_RETRY_SCHEDULED")
    assert [e.attempt for e in leased] == [1, 2, 3], fault.kind
    assert [e.attempt for e in failures] == [1, 2, 3], fault.kind
    assert [e.details["error_type"] for e in failures] == [fault.error_type] * 3, failures
    assert [e.attempt for e in scheduled] == [1, 2], fault.kind
    delays = [e.details["delay_seconds"] for e in scheduled]
    assert delays == pytest.approx([0.5, 1.0]), (fault.kind, delays)
    for failure, delay, next_lease in zip(failures, delays, leased[1:], strict=False):
        assert failure.time is not None and next_lease.time is not None
        gap = (next_lease.time - failure.time).total_seconds()
        assert gap >= delay - CLOCK_RESOLUTION, (fault.kind, failure.attempt, gap, delay)


async def test_cancel_reaches_running_async_and_sync_handlers(db_url: str, tmp_path: Path) -> None:
    """`trellis cancel` while an async and a sync handler run: the async one gets
    CancelledError, the sync one sees ctx.cancelled; the execution and every node end
    CANCELLED and nothing the handlers did afterwards changes that."""
    coordinator, address = spawn_coordinator(
        db_url, tmp_path, heartbeat_interval="300ms", sweep_interval="200ms"
    )
    record = tmp_path / "calls.txt"
    worker = spawn_worker(
        FAULT_WORKER,
        address,
        tmp_path,
        "worker",
        RECORD_FILE=str(record),
        FAULT_TASKS="hold,sync_hold,first",
        HOLD_SECONDS="60",
    )
    try:
        async with Client(address) as client:
            wf = Workflow("cancel-me")
            a = wf.node("async", "hold", timeout="5m")
            s = wf.node("sync", "sync_hold", timeout="5m")
            wf.node("after", "first", after=[a, s])
            await client.register_workflow(wf)
            execution = await client.start_execution("cancel-me", {})

            async def both_running() -> bool:
                starts = count_records(record, "start")
                return starts[(execution.id, "async")] == 1 and starts[(execution.id, "sync")] == 1

            await wait_for(both_running, timeout=30)
            cancelled_at = time.monotonic()
            cli = await trellis_cli(address, "cancel", execution.id, "--reason", "e2e")
            assert cli.returncode == 0, cli.stderr
            assert "CANCELLED" in cli.stdout, cli.stdout

            async def handlers_saw_it() -> bool:
                async_seen = count_records(record, "cancelled")[(execution.id, "async")]
                sync_seen = count_records(record, "sync-cancelled")[(execution.id, "sync")]
                return async_seen == 1 and sync_seen == 1

            await wait_for(handlers_saw_it, timeout=10)
            latency = time.monotonic() - cancelled_at
            print(f"\ncancel observed by both handlers {latency:.2f}s after `trellis cancel`")

            final = await client.wait_for_execution(execution.id, timeout=30)
            assert final.status == "CANCELLED", final
            assert {n.node_id: n.status for n in final.nodes} == dict.fromkeys(
                ("after", "async", "sync"), "CANCELLED"
            )
            events = await history(client, execution.id)
            types = [e.type for e in events]
            assert types.count("EXECUTION_CANCELLED") == 1
            assert sorted(e.node_id for e in events if e.type == "NODE_CANCELLED") == [
                "after",
                "async",
                "sync",
            ]
            for absent in ("NODE_SUCCEEDED", "NODE_ATTEMPT_FAILED", "NODE_RETRY_SCHEDULED"):
                assert absent not in types, events
    finally:
        worker_exit = worker.stop()
        coordinator_exit = coordinator.stop()
    assert not [r for r in read_records(record) if r.what == "done"], "a handler ran to the end"
    assert worker_exit == 0, worker.output()
    assert coordinator_exit == 0, coordinator.output()


async def test_short_heartbeat_timeout_is_honoured_with_a_long_heartbeat_interval(
    db_url: str, tmp_path: Path
) -> None:
    """The SDK heartbeats a new lease within half its heartbeat_timeout even when the
    coordinator's interval (5 s) is longer and the worker's loop was sleeping."""
    coordinator, address = spawn_coordinator(
        db_url,
        tmp_path,
        heartbeat_interval="5s",
        worker_liveness_timeout="1s",
        sweep_interval="100ms",
    )
    worker = spawn_worker(
        ROOT / "tests/e2e/fault_worker.py",
        address,
        tmp_path,
        "short-hb",
        RECORD_FILE=str(tmp_path / "calls.txt"),
        FAULT_TASKS="hold",
        HOLD_SECONDS="3",
    )
    try:
        async with Client(address) as client:
            wf = Workflow("short-heartbeat")
            wf.node("a", "hold", heartbeat_timeout="1s")
            await client.register_workflow(wf)
            # Past the start-up grace, so deadlines are enforced. Not a wait for a state: the
            # grace is a span of the coordinator's clock that nothing reports.
            await asyncio.sleep(1.5)
            started = await client.start_execution("short-heartbeat", {})
            done = await client.wait_for_execution(started.id, timeout=30)
            assert done.status == "SUCCEEDED", done
            assert done.nodes[0].attempt == 1
    finally:
        assert worker.stop() == 0, worker.output()
        coordinator.stop()
