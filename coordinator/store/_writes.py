"""The execution aggregate's writes, on a caller's transaction: new executions with their
node runs, events and deliveries; and a transition's fenced writes (``TransitionWrites``),
one statement per table for one transition or a group of them.

The statements of the hot paths are built once with bound parameters: SQLAlchemy neither
rebuilds them nor regenerates their cache keys per call (both memoized on the statement).
Executed with a dict of column values, an INSERT or UPDATE takes its columns (its SET
clause) from the dict's keys; the b_* keys bind the WHERE clause.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.model import Delivery, Event, Execution, NodeRun, Transition
from coordinator.store import _rows
from coordinator.store._db import Database
from coordinator.store._notifications import insert_deliveries
from coordinator.store._tables import events, executions, node_runs

# A transition's execution write: only if the version is still the one it was decided on.
_EXECUTION_UPDATE = sa.update(executions).where(
    executions.c.tenant_id == sa.bindparam("b_tenant_id"),
    executions.c.id == sa.bindparam("b_id"),
    executions.c.version == sa.bindparam("b_version"),
)
_INSERT_EXECUTION = sa.insert(executions)
_INSERT_NODE_RUNS = sa.insert(node_runs)
_INSERT_EVENTS = sa.insert(events)

# A transition's node-run write, executed once for many rows: replaces the row only if its
# (status, lease_seq) is still what the transition was decided on.
_NODE_UPDATE = sa.update(node_runs).where(
    node_runs.c.tenant_id == sa.bindparam("b_tenant_id"),
    node_runs.c.execution_id == sa.bindparam("b_execution_id"),
    node_runs.c.node_id == sa.bindparam("b_node_id"),
    node_runs.c.status == sa.bindparam("b_status"),
    node_runs.c.lease_seq == sa.bindparam("b_lease_seq"),
)


async def insert_executions(
    conn: AsyncConnection, new: Sequence[tuple[Transition, dict[str, Any]]], aging_ms: int
) -> None:
    """Insert executions (each a start transition and its row), their node runs and
    their events: one statement per table, parents before children."""
    if not new:
        return
    await conn.execute(_INSERT_EXECUTION, [values for _, values in new])
    nodes = [
        {
            **_rows.node_run_values(r, aging_ms),
            "tenant_id": t.execution.tenant_id,
            "execution_id": t.execution.id,
        }
        for t, _ in new
        for r in t.nodes
    ]
    if nodes:
        await conn.execute(_INSERT_NODE_RUNS, nodes)
    rows = [
        _rows.event_values(ev, tenant_id=t.execution.tenant_id) for t, _ in new for ev in t.events
    ]
    if rows:
        await conn.execute(_INSERT_EVENTS, rows)
    # Notifications for an execution created already ended (none otherwise).
    await insert_deliveries(conn, [d for t, _ in new for d in t.deliveries])


async def insert_events(conn: AsyncConnection, tenant_id: str, items: Sequence[Event]) -> None:
    if items:
        rows = [_rows.event_values(ev, tenant_id=tenant_id) for ev in items]
        await conn.execute(_INSERT_EVENTS, rows)


@dataclasses.dataclass
class TransitionWrites:
    """The writes of one transition or of a group commit's, gathered per table (see
    ``SqlExecutions.transact_many``)."""

    db: Database
    execution_updates: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    node_updates: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    node_inserts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    deliveries: list[Delivery] = dataclasses.field(default_factory=list)
    wake: list[str] = dataclasses.field(default_factory=list)

    def add(
        self,
        loaded: Execution,
        nodes: Mapping[str, NodeRun],
        t: Transition,
        wake: Sequence[str],
    ) -> None:
        tenant_id = loaded.tenant_id
        aging_ms = self.db.priority_aging_ms
        self.execution_updates.append(
            {
                **_rows.execution_mutable_values(t.execution),
                "version": loaded.version + 1,
                "b_tenant_id": tenant_id,
                "b_id": loaded.id,
                "b_version": loaded.version,
            }
        )
        for r in sorted(t.nodes, key=lambda r: r.node_id):
            before = nodes.get(r.node_id)
            if before is None:
                self.node_inserts.append(
                    {
                        **_rows.node_run_values(r, aging_ms),
                        "tenant_id": tenant_id,
                        "execution_id": loaded.id,
                    }
                )
                continue
            self.node_updates.append(
                {
                    **_rows.node_run_mutable_values(r, aging_ms),
                    "b_tenant_id": tenant_id,
                    "b_execution_id": loaded.id,
                    "b_node_id": r.node_id,
                    "b_status": before.status.value,
                    "b_lease_seq": before.lease_seq,
                }
            )
        self.events.extend(_rows.event_values(ev, tenant_id=tenant_id) for ev in t.events)
        self.deliveries.extend(t.deliveries)
        self.wake.extend(wake)

    async def flush(self, conn: AsyncConnection) -> bool:
        """Write it all, with the notifications to send at commit. False when a claim or
        another transition moved a row since it was loaded: then roll back (part of it
        may be written)."""
        if not await _fenced(conn, _EXECUTION_UPDATE, self.execution_updates):
            return False
        # Inserted rows before updated ones: a later item of a group may update a node an
        # earlier one added (an expansion, a map element).
        if self.node_inserts:
            await conn.execute(_INSERT_NODE_RUNS, self.node_inserts)
        if not await _fenced(conn, _NODE_UPDATE, self.node_updates):
            return False
        if self.events:
            await conn.execute(_INSERT_EVENTS, self.events)
        await insert_deliveries(conn, self.deliveries)
        await self.db.notify(conn, self.wake)
        return True


async def _fenced(conn: AsyncConnection, statement: Any, params: list[dict[str, Any]]) -> bool:
    """Run a fenced UPDATE for each of ``params``; False unless every one matched a row."""
    return not params or (await conn.execute(statement, params)).rowcount == len(params)
