"""The Node.js example worker (examples/node-worker) against a real coordinator: a workflow
shared with a Python worker, a SIGKILLed Node worker's lease retried elsewhere, retryable and
non-retryable handler errors, and a graceful SIGTERM.

Needs Node.js and npm: ``npm ci`` runs in examples/node-worker when its node_modules is
missing or older than package-lock.json. Without Node.js these tests skip, unless CI=true.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from coordinator.model import DEFAULT_TENANT
from coordinator.store import open_store
from tests.support.faults import history, of_node
from tests.support.node import node_with_dependencies, spawn_node_worker
from tests.support.procs import ROOT, Proc, spawn_coordinator, spawn_worker
from tests.support.wait import wait_for
from worker_sdk import Client, Workflow

pytestmark = pytest.mark.e2e

PYTHON_PART = ROOT / "tests/e2e/diamond_part_worker.py"
DIAMONDS = 20
# Liveness settings under which a SIGKILLed worker's leases are failed within seconds.
FAST_LIVENESS = {
    "heartbeat_interval": "500ms",
    "worker_liveness_timeout": "2s",
    "sweep_interval": "200ms",
}


@pytest.fixture(scope="session")
def node() -> str:
    """The ``node`` executable, with examples/node-worker's dependencies installed."""
    return node_with_dependencies()


async def logged(proc: Proc, text: str, count: int = 1, within: float = 20) -> None:
    """Waits until ``text`` occurs ``count`` times in the process's output."""

    async def probe() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited early:\n{proc.output()}")
        return proc.output().count(text) >= count

    await wait_for(probe, timeout=within)


def hold_workflow(timeout: str) -> Workflow:
    wf = Workflow("hold-one")
    wf.node("hold", "hold", timeout=timeout, retries=2, retry_initial_interval="100ms")
    return wf


async def test_diamonds_shared_by_a_node_and_a_python_worker(
    node: str, db_url: str, tmp_path: Path
) -> None:
    """20 diamonds: the Node worker serves double and combine, the Python worker prepare
    and square. Every execution succeeds with the right sum, each node leased once by the
    worker serving its type, and the Node worker is registered as sdk_language node."""
    coordinator, address = spawn_coordinator(db_url, tmp_path)
    node_worker = spawn_node_worker(
        node, address, tmp_path, "node-worker", NODE_TASKS="double,combine"
    )
    python_worker = spawn_worker(
        PYTHON_PART,
        address,
        tmp_path,
        "python-worker",
        WORKER_ID="python-worker",
        DIAMOND_TASKS="prepare,square",
    )
    workers = [node_worker, python_worker]
    expected_worker = {
        "prepare": "python-worker",
        "double": "node-worker",
        "square": "python-worker",
        "combine": "node-worker",
    }
    try:
        async with Client(address) as client:
            await client.register_workflow(ROOT / "examples/diamond.yaml")
            started = await asyncio.gather(
                *(client.start_execution("diamond", {"n": n}) for n in range(DIAMONDS))
            )
            finished = await asyncio.gather(
                *(client.wait_for_execution(e.id, timeout=40) for e in started)
            )
            for n, execution in enumerate(finished):
                assert execution.status == "SUCCEEDED", execution
                assert execution.output == {"sum": n * 2 + n * n}
                assert execution.node("double").output == {"doubled": n * 2}
                events = await history(client, execution.id)
                leased = {
                    e.node_id: (e.attempt, e.worker_id) for e in events if e.type == "NODE_LEASED"
                }
                assert leased == {k: (1, w) for k, w in expected_worker.items()}, events
    finally:
        exit_codes = [w.stop() for w in workers]
        coordinator_exit = coordinator.stop()
    assert exit_codes == [0, 0], [w.output() for w in workers]
    assert coordinator_exit == 0, coordinator.output()
    store = await open_store(db_url)
    try:
        registered_node = await store.workers.get_worker(DEFAULT_TENANT, "node-worker")
        registered_python = await store.workers.get_worker(DEFAULT_TENANT, "python-worker")
    finally:
        await store.close()
    assert registered_node.sdk_language == "node"
    assert registered_node.identity.endswith(f":{node_worker.popen.pid}")
    assert set(registered_node.task_types) == {"double", "combine"}
    assert registered_python.sdk_language == "python"
    assert set(registered_python.task_types) == {"prepare", "square"}


async def test_sigkilled_node_worker_lease_is_retried_by_another_node_worker(
    node: str, db_url: str, tmp_path: Path
) -> None:
    """Node worker A is SIGKILLed while its handlers hold three leases (5 min start-to-close):
    the liveness sweep fails them as WorkerLost and Node worker B runs attempt 2 of each."""
    coordinator, address = spawn_coordinator(db_url, tmp_path, **FAST_LIVENESS)
    worker_a = spawn_node_worker(node, address, tmp_path, "node-a", NODE_TASKS="hold")
    workers = [worker_a]
    try:
        async with Client(address) as client:
            await client.register_workflow(hold_workflow(timeout="5m"))
            started = await asyncio.gather(
                *(client.start_execution("hold-one", {"i": i}) for i in range(3))
            )
            ids = [e.id for e in started]

            async def all_leased_to_a() -> bool:
                runs = await asyncio.gather(*(client.get_execution(i) for i in ids))
                return all(
                    r.node("hold").status == "LEASED" and r.node("hold").worker_id == "node-a"
                    for r in runs
                )

            await wait_for(all_leased_to_a, timeout=20)
            await logged(worker_a, "holding for", count=3)
            killed_at = time.monotonic()
            assert worker_a.stop(signal.SIGKILL) == -signal.SIGKILL
            workers.append(
                spawn_node_worker(node, address, tmp_path, "node-b", NODE_TASKS="hold", HOLD_MS="0")
            )
            finished = await asyncio.gather(
                *(client.wait_for_execution(i, timeout=30) for i in ids)
            )
            recovery = time.monotonic() - killed_at
            for execution in finished:
                assert execution.status == "SUCCEEDED", execution
                assert execution.output == {"held_by": "node-b"}
                assert execution.node("hold").attempt == 2
                events = await history(client, execution.id)
                leased = of_node(events, "hold", "NODE_LEASED")
                assert [(e.attempt, e.worker_id) for e in leased] == [(1, "node-a"), (2, "node-b")]
                (failed,) = of_node(events, "hold", "NODE_ATTEMPT_FAILED")
                assert (failed.attempt, failed.details["error_type"]) == (1, "WorkerLost")
            assert recovery < 20, f"recovery took {recovery:.1f}s"  # far below 5 min
    finally:
        exit_codes = [w.stop() for w in workers]
        coordinator_exit = coordinator.stop()
    assert "trellis.worker held" in workers[1].output()
    assert exit_codes[1:] == [0], workers[1].output()
    assert coordinator_exit == 0, coordinator.output()


async def test_node_handler_errors_retry_or_fail_the_execution(
    node: str, db_url: str, tmp_path: Path
) -> None:
    """A TransientError is retried (and succeeds on attempt 2, or fails after 3 attempts);
    a NonRetryableError fails the execution at once with the handler's message and stack."""
    coordinator, address = spawn_coordinator(db_url, tmp_path)
    worker = spawn_node_worker(node, address, tmp_path, "node-fail", NODE_TASKS="fail")
    try:
        async with Client(address) as client:
            wf = Workflow("flaky")
            wf.node("f", "fail", retries=2, retry_initial_interval="100ms")
            await client.register_workflow(wf)
            inputs = [
                {"succeed_on_attempt": 2},
                {"message": "card declined", "non_retryable": True},
                {"message": "still down"},
            ]
            started = [await client.start_execution("flaky", data) for data in inputs]
            once, hard, always = await asyncio.gather(
                *(client.wait_for_execution(e.id, timeout=30) for e in started)
            )

            assert once.status == "SUCCEEDED", once
            assert once.output == {"succeeded_on_attempt": 2}
            (failed,) = of_node(await history(client, once.id), "f", "NODE_ATTEMPT_FAILED")
            assert (failed.attempt, failed.details["error_type"]) == (1, "TransientError")

            assert hard.status == "FAILED", hard
            assert hard.node("f").attempt == 1
            assert hard.error is not None
            assert hard.error.type == "NonRetryableError"
            assert "card declined" in hard.error.message
            assert (hard.error.node_id, hard.error.worker_id) == ("f", "node-fail")
            assert "NonRetryableError: card declined" in hard.error.details["stack"]
            leased = of_node(await history(client, hard.id), "f", "NODE_LEASED")
            assert [e.attempt for e in leased] == [1], "a non-retryable error is not retried"

            assert always.status == "FAILED", always
            leased = of_node(await history(client, always.id), "f", "NODE_LEASED")
            assert [e.attempt for e in leased] == [1, 2, 3]
            assert always.error is not None
            assert always.error.type == "TransientError"
            assert "still down" in always.error.message
    finally:
        exit_code = worker.stop()
        coordinator_exit = coordinator.stop()
    assert exit_code == 0, worker.output()
    assert coordinator_exit == 0, coordinator.output()


async def test_sigterm_lets_the_running_node_handler_finish_and_deliver(
    node: str, db_url: str, tmp_path: Path
) -> None:
    """SIGTERM mid-handler: the Node worker stops polling (a task started afterwards stays
    READY), the handler finishes, its result is delivered, then the process exits 0."""
    coordinator, address = spawn_coordinator(db_url, tmp_path)
    worker = spawn_node_worker(
        node, address, tmp_path, "node-term", NODE_TASKS="hold", HOLD_MS="2000"
    )
    try:
        async with Client(address) as client:
            await client.register_workflow(hold_workflow(timeout="1m"))
            running = await client.start_execution("hold-one", {})
            await logged(worker, "holding for")
            worker.popen.send_signal(signal.SIGTERM)
            await logged(worker, "received SIGTERM")
            later = await client.start_execution("hold-one", {})
            exit_code = await asyncio.to_thread(worker.popen.wait, 20)
            assert exit_code == 0, worker.output()
            # Delivered before the exit: no waiting here.
            done = await client.get_execution(running.id)
            assert done.status == "SUCCEEDED", done
            assert done.output == {"held_by": "node-term"}
            assert done.node("hold").attempt == 1
            untouched = await client.get_execution(later.id)
            assert untouched.node("hold").status == "READY", untouched
            assert untouched.node("hold").attempt == 0
    finally:
        worker.stop()
        coordinator_exit = coordinator.stop()
    output = worker.output()
    assert (
        output.index("received SIGTERM")
        < output.index("trellis.worker held")
        < output.index("worker stopped")
    )
    assert coordinator_exit == 0, coordinator.output()


async def test_node_heartbeats_keep_the_lease_and_a_cancel_aborts_the_handler(
    node: str, db_url: str, tmp_path: Path
) -> None:
    """A lease with a 1 s heartbeat timeout outlives it several times over: the Node worker
    heartbeats every 0.5 s for it, though told to heartbeat every 5 s. (A 2 s liveness window
    makes the coordinator enforce heartbeat deadlines 2 s after its start rather than 15.)
    Cancelling the execution aborts the handler through its AbortSignal and the worker sends
    nothing for it."""
    coordinator, address = spawn_coordinator(
        db_url,
        tmp_path,
        heartbeat_interval="5s",
        worker_liveness_timeout="2s",
        sweep_interval="200ms",
    )
    worker = spawn_node_worker(node, address, tmp_path, "node-beat", NODE_TASKS="hold")
    try:
        async with Client(address) as client:
            wf = Workflow("hold-beat")
            wf.node("hold", "hold", timeout="1m", heartbeat_timeout="1s")
            await client.register_workflow(wf)
            execution = await client.start_execution("hold-beat", {})
            await logged(worker, "holding for")
            leased_at = time.monotonic()

            async def lease_outlived_its_heartbeat_timeout() -> bool:
                hold = (await client.get_execution(execution.id)).node("hold")
                assert (hold.status, hold.attempt) == ("LEASED", 1), hold
                return time.monotonic() - leased_at > 3

            await wait_for(lease_outlived_its_heartbeat_timeout, timeout=10)
            await client.cancel_execution(execution.id, reason="test")
            await logged(worker, "dropped without a result (cancelled by the coordinator)")
            cancelled = await client.get_execution(execution.id)
            assert cancelled.status == "CANCELLED", cancelled
    finally:
        exit_code = worker.stop()
        coordinator_exit = coordinator.stop()
    output = worker.output()
    assert "trellis.worker held" not in output
    assert "refused" not in output, "nothing may be sent for a cancelled lease"
    assert exit_code == 0, output
    assert coordinator_exit == 0, coordinator.output()
