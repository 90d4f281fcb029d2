"""The diamond runs end to end: a coordinator process, two SDK worker processes, 200 runs."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from tests.support.procs import ROOT, spawn_coordinator, spawn_worker
from worker_sdk import Client

pytestmark = pytest.mark.e2e

RUNS = 200
NODES = ("prepare", "double", "square", "combine")


async def test_200_concurrent_diamonds_with_two_workers(db_url: str, tmp_path: Path) -> None:
    coordinator, address = spawn_coordinator(db_url, tmp_path)
    record = tmp_path / "calls.txt"
    workers = [
        spawn_worker(
            ROOT / "tests/e2e/recording_worker.py",
            address,
            tmp_path,
            f"worker-{i}",
            RECORD_FILE=str(record),
        )
        for i in range(2)
    ]
    try:
        async with Client(address) as client:
            reg = await client.register_workflow(ROOT / "examples/diamond.yaml")
            assert reg.name == "diamond"
            started = await asyncio.gather(
                *(client.start_execution("diamond", {"n": i}) for i in range(RUNS))
            )
            ids = {e.id: i for e, i in zip(started, range(RUNS), strict=True)}
            assert len(ids) == RUNS
            finished = await asyncio.gather(
                *(client.wait_for_execution(e.id, timeout=90) for e in started)
            )
            for execution in finished:
                n = ids[execution.id]
                assert execution.status == "SUCCEEDED", execution
                assert execution.output == {"sum": n * 2 + n * n}
                full = await client.get_execution(execution.id)
                assert [node.node_id for node in full.nodes] == list(NODES)
                assert all(node.status == "SUCCEEDED" for node in full.nodes)
                assert all(node.attempt == 1 for node in full.nodes), full.nodes
                events = [ev async for ev in client.watch_execution(execution.id)]
                leased = Counter(ev.node_id for ev in events if ev.type == "NODE_LEASED")
                assert leased == dict.fromkeys(NODES, 1)
    finally:
        exit_codes = [w.stop() for w in workers]
        coordinator_exit = coordinator.stop()
    calls = Counter(tuple(line.split()[:2]) for line in record.read_text().splitlines())
    assert len(calls) == RUNS * len(NODES)
    assert set(calls.values()) == {1}, "some node ran more than once"
    pids = {line.split()[3] for line in record.read_text().splitlines()}
    assert len(pids) == 2, "both worker processes should have taken work"
    assert exit_codes == [0, 0], [w.output() for w in workers]
    assert coordinator_exit == 0, coordinator.output()
