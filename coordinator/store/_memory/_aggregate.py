"""Writes of the execution aggregate that several repositories share: inserting executions
(with their node runs, events and deliveries), applying a transition (with its dead letters
and redrive), and idempotency keys. Each runs inside the caller's ``State.write()``.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

from coordinator import errors
from coordinator.model import (
    AttemptFailure,
    DeadLetter,
    Delivery,
    Event,
    EventType,
    Execution,
    NewExecution,
    NodeRun,
    Transition,
)
from coordinator.store import _rows
from coordinator.store._memory import _copies
from coordinator.store._memory._state import DeliveryRow, State

log = logging.getLogger(__name__)

# The events a dead letter's attempts are built from, and the one that resets them.
_FAILURES = (EventType.NODE_ATTEMPT_FAILED, EventType.NODE_TIMED_OUT)
_BOUNDARY = EventType.NODE_REDRIVEN


def loaded_nodes(state: State, execution_id: str) -> dict[str, NodeRun]:
    """The execution's node runs by node id, in node id order."""
    return {row.run.node_id: row.run for row in state.node_rows(execution_id)}


def by_idempotency_key(state: State, tenant_id: str, key: str) -> Execution | None:
    found = state.idempotency.get((tenant_id, key))
    return None if found is None else state.executions.get(found)


def release_key(state: State, holder: Execution) -> None:
    """Take an expired idempotency key off the execution holding it (see ``create_all``)."""
    values = _rows.execution_values(holder)
    values["idempotency_key"] = None
    state.executions.put(holder.id, _rows.execution_from_row(values))


def create_all(
    state: State, items: Sequence[NewExecution], cutoff: datetime | None
) -> list[tuple[Execution, bool]]:
    """``ExecutionRepository.create_executions`` inside a write: a key held by an execution
    created at or after ``cutoff`` (any time when None) returns the holder; an older holder
    lets go of it; a key repeated within ``items`` returns its first use's execution."""
    results: list[tuple[Execution, bool]] = []
    in_batch: dict[tuple[str, str], Execution] = {}
    for item in items:
        execution = item.transition.execution
        key = execution.idempotency_key
        if key is not None:
            first = in_batch.get((execution.tenant_id, key))
            if first is not None:
                results.append((first, False))
                continue
            existing = by_idempotency_key(state, execution.tenant_id, key)
            if existing is not None:
                if cutoff is None or existing.created_at >= cutoff:
                    results.append((existing, False))
                    continue
                release_key(state, existing)
        created = insert_execution(state, item.transition, taken=_already_exists(items))
        for child in item.children:
            insert_execution(state, child, taken=_already_exists(items))
        if key is not None:
            in_batch[(execution.tenant_id, key)] = created
        results.append((created, True))
    return results


def _already_exists(items: Sequence[NewExecution]) -> str:
    ids = ", ".join(repr(i.transition.execution.id) for i in items[:3])
    return f"execution {ids} already exists"


def insert_execution(state: State, transition: Transition, *, taken: str) -> Execution:
    """Insert the execution of a start transition, its node runs, events and deliveries (of
    an execution created already ended). Raises ``Conflict(taken)`` when its id (or its
    idempotency key) is taken."""
    execution = _copies.execution(transition.execution)
    key = execution.idempotency_key
    if execution.id in state.executions or (
        key is not None and (execution.tenant_id, key) in state.idempotency
    ):
        raise errors.Conflict(taken)
    state.executions.put(execution.id, execution)
    tenant = execution.tenant_id
    aging = state.priority_aging_ms
    for run in transition.nodes:
        node_key = (execution.id, run.node_id)
        if node_key in state.nodes:
            raise errors.Conflict(taken)
        row = _copies.node(run, aging, tenant_id=tenant, execution_id=execution.id)
        state.nodes.put(node_key, row)
    insert_events(state, tenant, transition.events)
    insert_deliveries(state, transition.deliveries)
    return execution


def insert_events(state: State, tenant_id: str, items: Sequence[Event]) -> None:
    for item in items:
        sequence = state.next_sequence()
        state.events.put(sequence, _copies.event(item, tenant_id=tenant_id, sequence=sequence))


def insert_deliveries(state: State, deliveries: Sequence[Delivery]) -> None:
    """Insert the deliveries a transition carries (decided by the service). Never fails the
    transition: deliveries that cannot be stored (an id taken, an unknown execution) are
    logged and the transition goes on without them, as the SQL store does."""
    if not deliveries:
        return
    unknown = [
        d for d in deliveries if d.id in state.deliveries or d.execution_id not in state.executions
    ]
    if unknown or len({d.id for d in deliveries}) != len(deliveries):
        log.error(
            "could not queue the notifications of an execution; it goes on without them",
            extra={"execution_id": deliveries[0].execution_id},
        )
        return
    for d in deliveries:
        # As the SQL store inserts a delivery: never delivered yet, no attempts recorded.
        stored = dataclasses.replace(_copies.truncated(d), delivered_at=None, history=())
        state.deliveries.put(d.id, DeliveryRow(stored, updated_at=stored.created_at))


def apply(
    state: State,
    tenant_id: str,
    loaded: Execution,
    nodes: Mapping[str, NodeRun],
    transition: Transition,
) -> None:
    """Write ``transition``, decided on ``loaded`` and ``nodes``: the execution (version + 1),
    its node runs (inserted, or replaced), events and deliveries, then its dead letters and
    its redrive. Raises ``Conflict`` when a row changed since it was loaded (the SQL store's
    fences; under the state's lock only a caller's stale load trips them)."""
    stored = state.executions.get(loaded.id)
    if stored is None or stored.version != loaded.version:
        raise errors.Conflict(f"execution {loaded.id!r} changed since it was loaded; retry")
    state.executions.put(
        loaded.id, _copies.updated_execution(stored, transition.execution, loaded.version + 1)
    )
    aging = state.priority_aging_ms
    for run in sorted(transition.nodes, key=lambda r: r.node_id):
        key = (loaded.id, run.node_id)
        before = nodes.get(run.node_id)
        current = state.nodes.get(key)
        if before is None:
            if current is not None:
                raise errors.Conflict(f"execution {loaded.id!r}: node {run.node_id!r} exists")
            state.nodes.put(key, _copies.node(run, aging, tenant_id=tenant_id, execution_id=key[0]))
            continue
        if current is None or (current.run.status, current.run.lease_seq) != (
            before.status,
            before.lease_seq,
        ):
            raise errors.Conflict(f"execution {loaded.id!r} changed since it was loaded; retry")
        state.nodes.put(key, _copies.updated_node(current, run, aging))
    insert_events(state, tenant_id, transition.events)
    insert_deliveries(state, transition.deliveries)
    write_dead_letters(state, tenant_id, nodes, transition)
    if transition.redriven_dead_letter is not None:
        stamp_redriven(
            state, tenant_id, transition.redriven_dead_letter, transition.execution.updated_at
        )


def write_dead_letters(
    state: State, tenant_id: str, loaded: Mapping[str, NodeRun], transition: Transition
) -> None:
    """A DeadLetter for each node of ``transition.dead_lettered``, with the node's input and
    its failures since its last redrive (the transition's own events included)."""
    if not transition.dead_lettered:
        return
    execution = transition.execution
    written = {r.node_id: r for r in transition.nodes}
    wanted = set(transition.dead_lettered)
    by_node: dict[str, list[Event]] = {}
    for sequence in state.event_seqs.get(execution.id, ()):
        ev = state.events.get(sequence)
        if (
            ev is not None
            and ev.tenant_id == tenant_id
            and ev.node_id in wanted
            and (ev.type in _FAILURES or ev.type is _BOUNDARY)
        ):
            by_node.setdefault(ev.node_id, []).append(ev)
    for node_id in transition.dead_lettered:
        node = written.get(node_id) or loaded.get(node_id)
        if node is None:
            raise errors.FailedPrecondition(
                f"execution {execution.id!r} has no node {node_id!r} to dead-letter"
            )
        letter = DeadLetter(
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
        state.dead_letters.put(letter.id, _copies.dead_letter(letter))


def _since_last_redrive(events: list[Event], retry_base: int) -> tuple[AttemptFailure, ...]:
    """The failures (``events`` in sequence order) after the node's last NODE_REDRIVEN event;
    failed attempts also only past ``retry_base`` (see the SQL store's ``_dead_letters``)."""
    after = 0
    for i, ev in enumerate(events):
        if ev.type is _BOUNDARY:
            after = i + 1
    return tuple(
        _rows.attempt_failure_from_event(_event_row(ev))
        for ev in events[after:]
        if ev.type is EventType.NODE_TIMED_OUT
        or (ev.type is EventType.NODE_ATTEMPT_FAILED and ev.attempt > retry_base)
    )


def _event_row(ev: Event) -> dict[str, object]:
    return _rows.event_values(ev, tenant_id=ev.tenant_id)


def stamp_redriven(state: State, tenant_id: str, dead_letter_id: str, at: datetime) -> None:
    """Set ``redriven_at`` of a dead letter not yet redriven; refuse one that was."""
    letter = state.dead_letters.get(dead_letter_id)
    if letter is None or letter.tenant_id != tenant_id:
        raise errors.NotFound(f"dead letter {dead_letter_id!r} not found")
    if letter.redriven_at is not None:
        raise errors.FailedPrecondition(f"dead letter {dead_letter_id!r} was already redriven")
    values = _rows.dead_letter_values(letter)
    values["redriven_at"] = _rows.to_ms(at)
    state.dead_letters.put(dead_letter_id, _rows.dead_letter_from_row(values))
