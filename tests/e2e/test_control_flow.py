"""Control flow through real processes: a coordinator, SDK workers, on SQLite and PostgreSQL.

Switch and join (examples/order.yaml), sub-workflows failing and being cancelled, a map
node with a concurrency cap, idempotent starts under concurrency, and refusals that leave
nothing behind (bad CEL, a cyclic expansion, sub-workflows nested too deep).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.flow_worker import CHILD_ERROR
from tests.support.procs import ROOT, Proc, spawn_coordinator, spawn_worker
from tests.support.wait import wait_for
from worker_sdk import Client, Execution, InvalidArgumentError, Workflow

pytestmark = pytest.mark.e2e

FLOW_WORKER = ROOT / "tests/support/flow_worker.py"
WAIT = 90.0


@contextlib.asynccontextmanager
async def cluster(db_url: str, tmp_path: Path, *scripts: Path) -> AsyncIterator[Client]:
    """A coordinator and one worker process per script; a Client on the coordinator."""
    coordinator, address = spawn_coordinator(db_url, tmp_path)
    workers: list[Proc] = []
    try:
        workers = [
            spawn_worker(script, address, tmp_path, f"worker-{i}")
            for i, script in enumerate(scripts)
        ]
        async with Client(address, timeout=30) as client:
            yield client
    finally:
        exits = [w.stop() for w in workers]
        coordinator_exit = coordinator.stop()
    assert exits == [0] * len(workers), [w.output()[-3000:] for w in workers]
    assert coordinator_exit == 0, coordinator.output()[-3000:]


async def node_succeeded_count(client: Client, execution_id: str, node_id: str) -> int:
    events = [ev async for ev in client.watch_execution(execution_id)]
    return sum(1 for ev in events if ev.type == "NODE_SUCCEEDED" and ev.node_id == node_id)


def statuses(execution: Execution) -> dict[str, str]:
    return {node.node_id: node.status for node in execution.nodes}


# -- switch, skipped branch, join ----------------------------------------------------------


async def test_order_takes_one_branch_and_joins_once(db_url: str, tmp_path: Path) -> None:
    async with cluster(db_url, tmp_path, ROOT / "examples/order_worker.py") as client:
        await client.register_workflow(ROOT / "examples/order.yaml")
        small = await client.start_execution("order", {"order_id": 1, "amount": 120})
        large = await client.start_execution("order", {"order_id": 2, "amount": 4800})
        small_done, large_done = await asyncio.gather(
            client.wait_for_execution(small.id, timeout=WAIT),
            client.wait_for_execution(large.id, timeout=WAIT),
        )
        for done, taken, skipped, approver, order_id in (
            (small_done, "auto_approve", "manual_review", "auto", 1),
            (large_done, "manual_review", "auto_approve", "reviewer", 2),
        ):
            assert done.status == "SUCCEEDED", done
            state = statuses(done)
            assert state[taken] == "SUCCEEDED", state
            assert state[skipped] == "SKIPPED", state
            assert state["route"] == "SUCCEEDED", state
            assert state["join"] == "SUCCEEDED", state
            assert done.output == {"shipped": order_id, "approved_by": approver}
            assert await node_succeeded_count(client, done.id, "join") == 1
            assert await node_succeeded_count(client, done.id, skipped) == 0


# -- sub-workflows -------------------------------------------------------------------------


async def test_failing_child_fails_the_parent_with_its_error(db_url: str, tmp_path: Path) -> None:
    async with cluster(db_url, tmp_path, FLOW_WORKER) as client:
        child = Workflow("payment")
        child.node("charge", "fail-always")
        await client.register_workflow(child)
        parent = Workflow("checkout")
        pre = parent.node("pre", "echo")
        pay = parent.subworkflow("pay", "payment", after=pre)
        parent.node("done", "echo", after=pay)
        await client.register_workflow(parent)

        run = await client.start_execution("checkout", {"cart": 7})
        done = await client.wait_for_execution(run.id, timeout=WAIT)
        assert done.status == "FAILED", done
        assert done.error is not None and CHILD_ERROR in done.error.message, done.error
        state = statuses(done)
        assert state["pre"] == "SUCCEEDED" and state["pay"] == "FAILED", state
        assert state["done"] != "SUCCEEDED", state
        child_id = done.node("pay").child_execution_id
        assert child_id, done.node("pay")
        child_run = await client.get_execution(child_id)
        assert child_run.status == "FAILED", child_run
        assert (child_run.parent_execution_id, child_run.parent_node_id) == (run.id, "pay")
        assert child_run.depth == 1


async def test_cancelling_the_parent_cancels_the_running_child(db_url: str, tmp_path: Path) -> None:
    async with cluster(db_url, tmp_path, FLOW_WORKER) as client:
        child = Workflow("slow")
        child.node("hold", "block")
        await client.register_workflow(child)
        parent = Workflow("wrapper")
        parent.subworkflow("sub", "slow")
        await client.register_workflow(parent)

        run = await client.start_execution("wrapper", None)

        async def child_running() -> str:
            execution = await client.get_execution(run.id)
            sub = execution.node("sub")
            if sub.status != "WAITING" or not sub.child_execution_id:
                return ""
            child_run = await client.get_execution(sub.child_execution_id)
            return sub.child_execution_id if child_run.node("hold").status == "LEASED" else ""

        child_id = await wait_for(child_running, timeout=WAIT)
        await client.cancel_execution(run.id, "changed my mind")
        parent_done = await client.wait_for_execution(run.id, timeout=WAIT)
        child_done = await client.wait_for_execution(child_id, timeout=WAIT)
        assert parent_done.status == "CANCELLED", parent_done
        assert child_done.status == "CANCELLED", child_done
        assert child_done.node("hold").status == "CANCELLED", child_done.nodes


# -- map -----------------------------------------------------------------------------------

MAP_SIZE = 500
MAP_LIMIT = 20
LEASE_ENDS = {"NODE_SUCCEEDED", "NODE_FAILED"}


async def test_map_keeps_order_and_its_concurrency_cap(db_url: str, tmp_path: Path) -> None:
    async with cluster(db_url, tmp_path, FLOW_WORKER) as client:
        wf = Workflow("doubler")
        gen = wf.node("gen", "range")
        wf.map("m", "double-item", items="input", max_concurrency=MAP_LIMIT, after=gen)
        await client.register_workflow(wf)

        run = await client.start_execution("doubler", {"n": MAP_SIZE})
        done = await client.wait_for_execution(run.id, timeout=120)
        assert done.status == "SUCCEEDED", done.error
        assert done.output == [i * 2 for i in range(MAP_SIZE)]

        events = [ev async for ev in client.watch_execution(run.id)]
        events.sort(key=lambda ev: ev.sequence)
        elements = {f"m[{i}]" for i in range(MAP_SIZE)}
        leased = Counter(ev.node_id for ev in events if ev.type == "NODE_LEASED")
        assert {n for n in leased if n.startswith("m[")} == elements
        assert all(leased[n] == 1 for n in elements)  # a clean run: one lease per element
        in_flight: set[str] = set()
        peak = 0
        for ev in events:
            if ev.node_id not in elements:
                continue
            if ev.type == "NODE_LEASED":
                in_flight.add(ev.node_id)
                peak = max(peak, len(in_flight))
            elif ev.type in LEASE_ENDS:
                in_flight.discard(ev.node_id)
        assert peak <= MAP_LIMIT, f"{peak} elements were leased at once"
        assert peak > 1, "the worker (concurrency 50) should have run elements in parallel"
        assert not in_flight


# -- starts ----------------------------------------------------------------------------------


async def test_concurrent_starts_with_one_key_make_one_execution(
    db_url: str, tmp_path: Path
) -> None:
    async with cluster(db_url, tmp_path, FLOW_WORKER) as client:
        wf = Workflow("single")
        wf.node("only", "echo")
        await client.register_workflow(wf)
        started = await asyncio.gather(
            *(
                client.start_execution("single", {"i": i}, idempotency_key="order-42")
                for i in range(50)
            )
        )
        assert len({e.id for e in started}) == 1
        executions = await client.list_executions(workflow_name="single", limit=100)
        assert [e.id for e in executions] == [started[0].id]
        done = await client.wait_for_execution(started[0].id, timeout=WAIT)
        assert done.status == "SUCCEEDED", done


# -- refusals that leave nothing behind ----------------------------------------------------


async def test_invalid_cel_is_refused_at_registration(db_url: str, tmp_path: Path) -> None:
    async with cluster(db_url, tmp_path) as client:
        syntax = Workflow("bad-syntax")
        syntax.node("check", "echo", skip_if="input.amount >")
        with pytest.raises(InvalidArgumentError) as info:
            await client.register_workflow(syntax)
        message = info.value.message
        assert "check" in message and "skip_if" in message, message
        assert "syntax" in message.lower(), message

        typed = Workflow("bad-types")
        typed.node("mix", "echo", input="1 + 'a'")
        with pytest.raises(InvalidArgumentError) as info:
            await client.register_workflow(typed)
        message = info.value.message
        assert "mix" in message and "input" in message, message
        assert "no matching overload" in message, message

        assert await client.list_workflows() == []
        assert await client.list_executions() == []


async def test_cyclic_expansion_fails_the_node_and_adds_nothing(
    db_url: str, tmp_path: Path
) -> None:
    async with cluster(db_url, tmp_path, FLOW_WORKER) as client:
        wf = Workflow("grow")
        seed = wf.node("seed", "expand-cycle")
        wf.node("tail", "echo", after=seed)
        await client.register_workflow(wf)

        run = await client.start_execution("grow", {"x": 1})
        done = await client.wait_for_execution(run.id, timeout=WAIT)
        assert done.status == "FAILED", done
        seed_state = done.node("seed")
        assert seed_state.status == "FAILED", seed_state
        assert seed_state.error is not None
        assert "refused" in seed_state.error.message, seed_state.error
        assert "cycle" in seed_state.error.message.lower(), seed_state.error
        assert seed_state.attempt == 1  # not retried
        assert set(statuses(done)) == {"seed", "tail"}, "the expansion's nodes were kept"
        assert done.node("tail").status != "SUCCEEDED"


async def test_sub_workflows_nested_too_deep_are_refused(db_url: str, tmp_path: Path) -> None:
    async with cluster(db_url, tmp_path) as client:
        leaf = Workflow("depth-0")
        leaf.node("work", "echo")
        await client.register_workflow(leaf)
        for level in range(1, 11):  # depth-10 nests ten levels: the default limit
            wf = Workflow(f"depth-{level}")
            wf.subworkflow("inner", f"depth-{level - 1}")
            await client.register_workflow(wf)
        too_deep = Workflow("depth-11")
        too_deep.subworkflow("inner", "depth-10")
        with pytest.raises(InvalidArgumentError) as info:
            await client.register_workflow(too_deep)
        message = info.value.message
        assert "depth" in message.lower(), message
        assert "10" in message, message
        names = {w.name for w in await client.list_workflows()}
        assert names == {f"depth-{level}" for level in range(11)}
        assert await client.list_executions() == []
