"""Helpers of the fault-tolerance e2e tests: what tests/e2e/fault_worker.py records, and
execution histories."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import ROOT
from worker_sdk import Client, Event

FAULT_WORKER = ROOT / "tests/e2e/fault_worker.py"


@dataclass(frozen=True)
class Record:
    """One line of fault_worker.py's RECORD_FILE."""

    what: str
    execution_id: str
    node_id: str
    attempt: int
    pid: int
    worker_id: str


def read_records(path: Path) -> list[Record]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        what, execution_id, node_id, attempt, pid, *rest = line.split()
        out.append(Record(what, execution_id, node_id, int(attempt), int(pid), "".join(rest)))
    return out


def count_records(path: Path, what: str) -> Counter[tuple[str, str]]:
    """How many ``what`` lines each (execution, node) has."""
    return Counter((r.execution_id, r.node_id) for r in read_records(path) if r.what == what)


async def history(client: Client, execution_id: str) -> list[Event]:
    """The whole event history of an execution that has ended (the watch stream then ends)."""
    async with asyncio.timeout(30):
        return [event async for event in client.watch_execution(execution_id)]


def of_node(events: list[Event], node_id: str, *types: str) -> list[Event]:
    return [e for e in events if e.node_id == node_id and (not types or e.type in types)]
