"""Dead letters: ``SqlDeadLetters`` lists them; transitions write them.

``write_dead_letters`` (for dead-lettered nodes) and ``stamp_redriven`` (on redrive) run on
the transition's connection, after its node runs and events are written, so a dead letter's
attempts include the failure that exhausted the node, and a refused redrive rolls the whole
transition back.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator import errors
from coordinator.model import AttemptFailure, DeadLetter, EventType, NodeRun, Transition
from coordinator.store import _rows
from coordinator.store._db import Database
from coordinator.store._tables import dead_letters, events

# The events a dead letter's attempts are built from, and the one that resets them.
_FAILURES = (EventType.NODE_ATTEMPT_FAILED.value, EventType.NODE_TIMED_OUT.value)
_BOUNDARY = EventType.NODE_REDRIVEN.value

# The failure and redrive events of some nodes of an execution, in order (built once).
_FAILURE_EVENTS = (
    sa.select(
        events.c.node_id,
        events.c.type,
        events.c.attempt,
        events.c.worker_id,
        events.c.time,
        events.c.details,
    )
    .where(
        events.c.tenant_id == sa.bindparam("b_tenant_id"),
        events.c.execution_id == sa.bindparam("b_execution_id"),
        events.c.node_id.in_(sa.bindparam("b_node_ids", expanding=True)),
        events.c.type.in_([*_FAILURES, _BOUNDARY]),
    )
    .order_by(events.c.sequence)
)
_INSERT_DEAD_LETTERS = sa.insert(dead_letters)


def _since_last_redrive(rows: list[Any], retry_base: int) -> tuple[AttemptFailure, ...]:
    """The failures (``rows`` in sequence order) after the node's last NODE_REDRIVEN event.

    Failed attempts also count only past ``retry_base`` (the attempts made before the last
    redrive), so the boundary holds even where no NODE_REDRIVEN event was written. Timeouts
    are taken on the event boundary alone: a node that timed out unstarted failed no
    attempt, and its event carries the attempt number of its last start.
    """
    after = 0
    for i, row in enumerate(rows):
        if row["type"] == _BOUNDARY:
            after = i + 1
    return tuple(
        _rows.attempt_failure_from_event(row)
        for row in rows[after:]
        if row["type"] == EventType.NODE_TIMED_OUT.value
        or (row["type"] == EventType.NODE_ATTEMPT_FAILED.value and row["attempt"] > retry_base)
    )


async def write_dead_letters(
    conn: AsyncConnection,
    tenant_id: str,
    loaded_nodes: Mapping[str, NodeRun],
    transition: Transition,
) -> list[DeadLetter]:
    """Insert a DeadLetter for each node of ``transition.dead_lettered``."""
    if not transition.dead_lettered:
        return []
    execution = transition.execution
    written = {r.node_id: r for r in transition.nodes}
    params = {
        "b_tenant_id": tenant_id,
        "b_execution_id": execution.id,
        "b_node_ids": sorted(set(transition.dead_lettered)),
    }
    by_node: dict[str, list[Any]] = {}
    for row in (await conn.execute(_FAILURE_EVENTS, params)).mappings():
        by_node.setdefault(row["node_id"], []).append(row)
    letters = []
    for node_id in transition.dead_lettered:
        node = written.get(node_id) or loaded_nodes.get(node_id)
        if node is None:
            raise errors.FailedPrecondition(
                f"execution {execution.id!r} has no node {node_id!r} to dead-letter"
            )
        letters.append(
            DeadLetter(
                id=str(uuid.uuid4()),
                tenant_id=tenant_id,
                execution_id=execution.id,
                workflow_name=execution.workflow_name,
                workflow_version=execution.workflow_version,
                node_id=node_id,
                task_type=node.task_type,
                input=node.input,
                attempts=_since_last_redrive(by_node.get(node_id, []), node.retry_base),
                created_at=execution.updated_at,
            )
        )
    values = [_rows.dead_letter_values(d) for d in letters]
    await conn.execute(_INSERT_DEAD_LETTERS, values)
    return [_rows.dead_letter_from_row(v) for v in values]


async def stamp_redriven(
    conn: AsyncConnection, tenant_id: str, dead_letter_id: str, at: datetime
) -> None:
    """Set ``redriven_at`` of a dead letter not yet redriven; refuse one that was."""
    d = dead_letters
    result = await conn.execute(
        sa.update(d)
        .where(d.c.tenant_id == tenant_id, d.c.id == dead_letter_id, d.c.redriven_at.is_(None))
        .values(redriven_at=_rows.to_ms(at))
    )
    if result.rowcount == 1:
        return
    exists = await conn.scalar(
        sa.select(sa.literal(1)).where(d.c.tenant_id == tenant_id, d.c.id == dead_letter_id)
    )
    if exists is None:
        raise errors.NotFound(f"dead letter {dead_letter_id!r} not found")
    raise errors.FailedPrecondition(f"dead letter {dead_letter_id!r} was already redriven")


class SqlDeadLetters:
    """The ``DeadLetterRepository`` port."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def list_dead_letters(
        self,
        tenant_id: str,
        *,
        workflow_name: str | None,
        task_type: str | None,
        include_redriven: bool,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[DeadLetter]:
        d = dead_letters
        query = (
            sa.select(d)
            .where(d.c.tenant_id == tenant_id)
            .order_by(d.c.created_at.desc(), d.c.id.desc())
            .limit(limit)
        )
        if not include_redriven:
            query = query.where(d.c.redriven_at.is_(None))
        if workflow_name is not None:
            query = query.where(d.c.workflow_name == workflow_name)
        if task_type is not None:
            query = query.where(d.c.task_type == task_type)
        if before is not None:
            at, last_id = _rows.to_ms(before[0]), before[1]
            query = query.where(sa.tuple_(d.c.created_at, d.c.id) < sa.tuple_(at, last_id))
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.dead_letter_from_row(r) for r in rows]

    async def get_dead_letter(self, tenant_id: str, dead_letter_id: str) -> DeadLetter:
        d = dead_letters
        query = sa.select(d).where(d.c.tenant_id == tenant_id, d.c.id == dead_letter_id)
        async with self._db.tx(write=False) as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise errors.NotFound(f"dead letter {dead_letter_id!r} not found")
        return _rows.dead_letter_from_row(row)
