"""What the memory store keeps of a domain object: what the SQL store would read back.

The execution aggregate, workers, definitions and dead letters go through the SQL store's
own row conversion (``coordinator.store._rows``), there and back: one conversion, so both
stores return equal objects (times truncated to the millisecond, a READY row's
``available_at`` defaulting to its ``updated_at``, the dispatch rank). Triggers, limits and
notifications, whose rows the SQL store converts in its repository modules, are truncated
here field by field (``truncated``).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta
from typing import Any, TypeVar

from coordinator.model import (
    Channel,
    DeadLetter,
    Event,
    Execution,
    NodeRun,
    WorkerInfo,
    WorkflowDef,
    definition_from_document,
    definition_to_document,
)
from coordinator.store import _rows
from coordinator.store._memory._state import NodeRow

D = TypeVar("D")

_MS = timedelta(milliseconds=1)


def ms(value: datetime) -> datetime:
    """``value`` as stored: UTC, truncated to the millisecond (naive is taken as UTC)."""
    return _rows.from_ms(_rows.to_ms(value))


def opt_ms(value: datetime | None) -> datetime | None:
    return None if value is None else ms(value)


def add_ms(at: datetime, span: timedelta | None) -> datetime | None:
    """``at + span`` as the SQL store computes it (milliseconds added), None without a span."""
    if span is None:
        return None
    return _rows.from_ms(_rows.to_ms(at) + span // _MS)


def truncated(obj: D) -> D:
    """A copy of the frozen dataclass ``obj`` with every datetime and timedelta (also inside
    tuples and nested dataclasses) truncated to the millisecond."""
    changes = {
        f.name: _truncate(getattr(obj, f.name))
        for f in dataclasses.fields(obj)  # type: ignore[arg-type]
        if f.init
    }
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]


def _truncate(value: Any) -> Any:
    if isinstance(value, datetime):
        return ms(value)
    if isinstance(value, timedelta):
        return timedelta(milliseconds=value // _MS)
    if isinstance(value, tuple):
        return tuple(_truncate(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return truncated(value)
    return value


# -- through the SQL store's rows -----------------------------------------------------------


def definition(defn: WorkflowDef, *, version: int, created_at: datetime) -> WorkflowDef:
    return _rows.definition_from_row(
        _rows.definition_values(defn, version=version, created_at=created_at)
    )


def definition_copy(defn: WorkflowDef) -> WorkflowDef:
    """A fresh copy (its cached properties are computed per object)."""
    document = json.loads(json.dumps(definition_to_document(defn)))
    return definition_from_document(document, created_at=defn.created_at)


def execution(value: Execution) -> Execution:
    return _rows.execution_from_row(_rows.execution_values(value))


def updated_execution(stored: Execution, new: Execution, version: int) -> Execution:
    """``stored`` with the columns a transition writes taken from ``new``."""
    values = _rows.execution_values(stored)
    values.update(_rows.execution_mutable_values(new))
    values["version"] = version
    return _rows.execution_from_row(values)


def node(run: NodeRun, aging_ms: int, *, tenant_id: str, execution_id: str) -> NodeRow:
    values = {
        **_rows.node_run_values(run, aging_ms),
        "tenant_id": tenant_id,
        "execution_id": execution_id,
    }
    return NodeRow(_rows.node_run_from_row(values), values["dispatch_rank"])


def updated_node(stored: NodeRow, new: NodeRun, aging_ms: int) -> NodeRow:
    """``stored`` with the columns a transition replaces taken from ``new`` (all but the key
    and the workflow identity); the concurrency key stays."""
    values = _rows.node_run_values(stored.run, aging_ms)
    values.update(_rows.node_run_mutable_values(new, aging_ms))
    return NodeRow(_rows.node_run_from_row(values), values["dispatch_rank"], stored.concurrency_key)


def event(value: Event, *, tenant_id: str, sequence: int) -> Event:
    values = _rows.event_values(value, tenant_id=tenant_id)
    values["sequence"] = sequence
    return _rows.event_from_row(values)


def worker(value: WorkerInfo) -> WorkerInfo:
    return _rows.worker_from_row(_rows.worker_values(value))


def worker_copy(value: WorkerInfo) -> WorkerInfo:
    """A copy whose labels the caller may change."""
    return dataclasses.replace(value, labels=dict(value.labels))


def dead_letter(value: DeadLetter) -> DeadLetter:
    return _rows.dead_letter_from_row(_rows.dead_letter_values(value))


def channel(value: Channel) -> Channel:
    """Truncated, its config a JSON round trip (as the SQL store keeps it)."""
    config = json.loads(json.dumps(dict(value.config), sort_keys=True))
    return dataclasses.replace(truncated(value), config=config)


def channel_copy(value: Channel) -> Channel:
    """A copy whose config the caller may change."""
    return dataclasses.replace(value, config=json.loads(json.dumps(dict(value.config))))
