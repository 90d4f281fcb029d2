"""Domain objects ⇄ table rows: the one place where rows become model objects and back,
for workflow definitions, the execution aggregate (executions, node runs, events, claim
candidates, dead letters) and workers, which several repositories read and write, and
audit records with the check of their chain, which both stores share. Limits,
notifications, triggers and identity convert their rows in their repository module, the
only one that reads or writes them.

Timestamps are stored as epoch milliseconds and come back as aware UTC datetimes, so a value
read back is its written value truncated to the millisecond. Objects returned by the store
after a write are round-tripped through these functions, so they equal what a later read
returns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from coordinator.model import (
    AttemptFailure,
    AuditEntry,
    AuditRecord,
    Candidate,
    DeadLetter,
    ErrorInfo,
    Event,
    EventType,
    Execution,
    ExecutionStatus,
    NodeRole,
    NodeRun,
    NodeStatus,
    WorkerInfo,
    WorkflowDef,
    WorkflowSummary,
    audit_hash,
    definition_from_document,
    definition_to_document,
)

Row = Mapping[Any, Any]  # a RowMapping, or the dict of values just written

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


# -- scalars ------------------------------------------------------------------------------


def to_ms(value: datetime) -> int:
    """Epoch milliseconds of ``value`` (a naive datetime is taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MS


def from_ms(value: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=value)


def opt_to_ms(value: datetime | None) -> int | None:
    return None if value is None else to_ms(value)


def opt_from_ms(value: int | None) -> datetime | None:
    return None if value is None else from_ms(value)


def duration_ms(value: timedelta) -> int:
    return value // _MS


def opt_duration_ms(value: timedelta | None) -> int | None:
    return None if value is None else duration_ms(value)


def opt_duration(value: int | None) -> timedelta | None:
    return None if value is None else timedelta(milliseconds=value)


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


# -- errors -------------------------------------------------------------------------------


def _error_values(error: ErrorInfo | None) -> dict[str, Any]:
    if error is None:
        return {
            "error_type": None,
            "error_message": None,
            "error_details": None,
            "error_node_id": None,
            "error_attempt": None,
            "error_worker_id": None,
        }
    return {
        "error_type": error.type,
        "error_message": error.message,
        "error_details": error.details,
        "error_node_id": error.node_id,
        "error_attempt": error.attempt,
        "error_worker_id": error.worker_id,
    }


def _error_from_row(row: Row) -> ErrorInfo | None:
    if row["error_type"] is None:
        return None
    return ErrorInfo(
        type=row["error_type"],
        message=row["error_message"] or "",
        details=_bytes(row["error_details"]),
        node_id=row["error_node_id"],
        attempt=row["error_attempt"] or 0,
        worker_id=row["error_worker_id"],
    )


# -- definitions --------------------------------------------------------------------------


def definition_values(defn: WorkflowDef, *, version: int, created_at: datetime) -> dict[str, Any]:
    document = definition_to_document(defn)
    document["version"] = version
    return {
        "tenant_id": defn.tenant_id,
        "name": defn.name,
        "version": version,
        "content_hash": defn.content_hash,
        "description": defn.description,
        "document": json.dumps(document, separators=(",", ":")),
        "created_at": to_ms(created_at),
    }


def definition_from_row(row: Row) -> WorkflowDef:
    return definition_from_document(
        json.loads(row["document"]),
        version=row["version"],
        created_at=from_ms(row["created_at"]),
    )


def summary_from_row(row: Row) -> WorkflowSummary:
    return WorkflowSummary(
        name=row["name"], latest_version=row["version"], description=row["description"]
    )


# -- executions ---------------------------------------------------------------------------


def execution_values(execution: Execution) -> dict[str, Any]:
    """Every column of ``executions``."""
    return {
        "id": execution.id,
        "tenant_id": execution.tenant_id,
        "workflow_name": execution.workflow_name,
        "workflow_version": execution.workflow_version,
        "input": execution.input,
        "created_at": to_ms(execution.created_at),
        "idempotency_key": execution.idempotency_key,
        "parent_execution_id": execution.parent_execution_id,
        "parent_node_id": execution.parent_node_id,
        "depth": execution.depth,
        "start_at": opt_to_ms(execution.start_at),
        "max_concurrency": execution.max_concurrency,
        "version": execution.version,
        **execution_mutable_values(execution),
    }


def execution_mutable_values(execution: Execution) -> dict[str, Any]:
    """The columns a transition may change (``version`` is written by the store)."""
    return {
        "status": execution.status.value,
        "output": execution.output,
        **_error_values(execution.error),
        "priority": execution.priority,
        "updated_at": to_ms(execution.updated_at),
        "ended_at": opt_to_ms(execution.ended_at),
        "deadline": opt_to_ms(execution.deadline),
        "expansion": execution.expansion,
        "queued": execution.queued,
    }


def execution_from_row(row: Row) -> Execution:
    return Execution(
        id=row["id"],
        tenant_id=row["tenant_id"],
        workflow_name=row["workflow_name"],
        workflow_version=row["workflow_version"],
        status=ExecutionStatus(row["status"]),
        input=bytes(row["input"]),
        output=_bytes(row["output"]),
        error=_error_from_row(row),
        priority=row["priority"],
        idempotency_key=row["idempotency_key"],
        parent_execution_id=row["parent_execution_id"],
        depth=row["depth"],
        version=row["version"],
        created_at=from_ms(row["created_at"]),
        updated_at=from_ms(row["updated_at"]),
        ended_at=opt_from_ms(row["ended_at"]),
        deadline=opt_from_ms(row["deadline"]),
        parent_node_id=row["parent_node_id"],
        start_at=opt_from_ms(row["start_at"]),
        expansion=_bytes(row["expansion"]),
        max_concurrency=row["max_concurrency"],
        queued=bool(row["queued"]),
    )


# -- node runs ----------------------------------------------------------------------------


# One priority step is worth this much waiting in the dispatch order (TRELLIS_PRIORITY_AGING).
DEFAULT_PRIORITY_AGING_MS = 60_000


def node_run_values(run: NodeRun, aging_ms: int = DEFAULT_PRIORITY_AGING_MS) -> dict[str, Any]:
    """Every column of ``node_runs``."""
    return {
        "execution_id": run.execution_id,
        "node_id": run.node_id,
        "tenant_id": run.tenant_id,
        "workflow_name": run.workflow_name,
        "workflow_version": run.workflow_version,
        "task_type": run.task_type,
        **node_run_mutable_values(run, aging_ms),
    }


def node_run_mutable_values(
    run: NodeRun, aging_ms: int = DEFAULT_PRIORITY_AGING_MS
) -> dict[str, Any]:
    """The columns a transition replaces (all but the key and the workflow identity).
    ``dispatch_rank`` orders the claim: a priority step is worth ``aging_ms`` of waiting."""
    available_at = run.available_at
    if available_at is None and run.status is NodeStatus.READY:
        # A READY row without a date is claimable from the moment it became ready: the
        # claim index orders on available_at, so it is never NULL on a READY row.
        available_at = run.updated_at
    return {
        "status": run.status.value,
        "attempt": run.attempt,
        "input": run.input,
        "output": run.output,
        **_error_values(run.error),
        "priority": run.priority,
        "available_at": opt_to_ms(available_at),
        "dispatch_rank": None
        if available_at is None
        else to_ms(available_at) - run.priority * aging_ms,
        "start_to_close_ms": duration_ms(run.start_to_close_timeout),
        "heartbeat_timeout_ms": opt_duration_ms(run.heartbeat_timeout),
        "lease_seq": run.lease_seq,
        "worker_id": run.worker_id,
        "lease_deadline": opt_to_ms(run.lease_deadline),
        "heartbeat_deadline": opt_to_ms(run.heartbeat_deadline),
        "updated_at": to_ms(run.updated_at),
        "schedule_deadline": opt_to_ms(run.schedule_deadline),
        "schedule_to_start_ms": opt_duration_ms(run.schedule_to_start_timeout),
        "held": run.held,
        "node_paused": run.node_paused,
        "retry_base": run.retry_base,
        "role": run.role.value,
        "child_execution_id": run.child_execution_id,
    }


def node_run_from_row(row: Row) -> NodeRun:
    return NodeRun(
        execution_id=row["execution_id"],
        node_id=row["node_id"],
        tenant_id=row["tenant_id"],
        workflow_name=row["workflow_name"],
        workflow_version=row["workflow_version"],
        task_type=row["task_type"],
        status=NodeStatus(row["status"]),
        attempt=row["attempt"],
        input=_bytes(row["input"]),
        output=_bytes(row["output"]),
        error=_error_from_row(row),
        priority=row["priority"],
        available_at=opt_from_ms(row["available_at"]),
        start_to_close_timeout=timedelta(milliseconds=row["start_to_close_ms"]),
        heartbeat_timeout=opt_duration(row["heartbeat_timeout_ms"]),
        lease_seq=row["lease_seq"],
        worker_id=row["worker_id"],
        lease_deadline=opt_from_ms(row["lease_deadline"]),
        heartbeat_deadline=opt_from_ms(row["heartbeat_deadline"]),
        updated_at=from_ms(row["updated_at"]),
        schedule_deadline=opt_from_ms(row["schedule_deadline"]),
        schedule_to_start_timeout=opt_duration(row["schedule_to_start_ms"]),
        held=bool(row["held"]),
        node_paused=bool(row["node_paused"]),
        retry_base=row["retry_base"],
        role=NodeRole(row["role"]),
        child_execution_id=row["child_execution_id"],
    )


def node_output_from_row(row: Any) -> tuple[tuple[str, str], bytes | None]:
    """A node run's key and output, from a row of (execution_id, node_id, output)."""
    return (row[0], row[1]), _bytes(row[2])


def candidate_from_row(row: Any, needs_input: bool) -> Candidate:
    """A claimable node run, from a row of the claim's candidate scan (with ``input`` when
    ``needs_input``)."""
    return Candidate(
        execution_id=row.execution_id,
        node_id=row.node_id,
        task_type=row.task_type,
        input=bytes(row.input) if needs_input and row.input is not None else None,
        execution_max_concurrency=row.max_concurrency,
    )


# -- events -------------------------------------------------------------------------------


def event_values(event: Event, *, tenant_id: str) -> dict[str, Any]:
    """Every column of ``events`` but ``sequence``, which the database assigns."""
    return {
        "tenant_id": tenant_id,
        "execution_id": event.execution_id,
        "type": event.type.value,
        "node_id": event.node_id,
        "attempt": event.attempt,
        "worker_id": event.worker_id,
        "time": to_ms(event.time),
        "details": event.details,
    }


def event_from_row(row: Row) -> Event:
    return Event(
        sequence=row["sequence"],
        tenant_id=row["tenant_id"],
        execution_id=row["execution_id"],
        type=EventType(row["type"]),
        node_id=row["node_id"],
        attempt=row["attempt"],
        worker_id=row["worker_id"],
        time=from_ms(row["time"]),
        details=_bytes(row["details"]),
    )


# -- workers ------------------------------------------------------------------------------


def worker_values(worker: WorkerInfo) -> dict[str, Any]:
    return {
        "tenant_id": worker.tenant_id,
        "id": worker.id,
        "task_types": json.dumps(list(worker.task_types)),
        "capacity": worker.capacity,
        "labels": json.dumps(worker.labels, sort_keys=True),
        "sdk_language": worker.sdk_language,
        "sdk_version": worker.sdk_version,
        "identity": worker.identity,
        "last_seen": to_ms(worker.last_seen),
        "credential": worker.credential,
    }


def worker_from_row(row: Row) -> WorkerInfo:
    return WorkerInfo(
        tenant_id=row["tenant_id"],
        id=row["id"],
        task_types=tuple(json.loads(row["task_types"])),
        capacity=row["capacity"],
        labels=dict(json.loads(row["labels"])),
        sdk_language=row["sdk_language"],
        sdk_version=row["sdk_version"],
        identity=row["identity"],
        last_seen=from_ms(row["last_seen"]),
        credential=row["credential"],
    )


# -- dead letters -------------------------------------------------------------------------


def attempt_failure_from_event(row: Row) -> AttemptFailure:
    """A failed (or timed-out) attempt from its NODE_ATTEMPT_FAILED / NODE_TIMED_OUT event.

    The event's details are ``{"error_type", "message", ...}``; the error's own details, if
    any, under ``"details"`` (JSON text as a string, or a JSON value). A timeout event without
    an ``error_type`` is typed by its event type.
    """
    raw = row["details"]
    doc: Any = json.loads(bytes(raw)) if raw else None
    if not isinstance(doc, dict):
        doc = {}
    error_details = _json_text(doc.get("details"))
    return AttemptFailure(
        attempt=row["attempt"],
        worker_id=row["worker_id"],
        time=from_ms(row["time"]),
        error=ErrorInfo(
            type=str(doc.get("error_type") or row["type"]),
            message=str(doc.get("message") or doc.get("reason") or ""),
            details=None if error_details is None else error_details.encode(),
            node_id=row["node_id"],
            attempt=row["attempt"],
            worker_id=row["worker_id"],
        ),
    )


def _json_text(value: Any) -> str | None:
    """``value`` as JSON text: a string holding JSON is kept as is, anything else encoded."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            pass
        else:
            return value
    return json.dumps(value, separators=(",", ":"))


def _attempt_doc(failure: AttemptFailure) -> dict[str, Any]:
    details = failure.error.details
    return {
        "attempt": failure.attempt,
        "type": failure.error.type,
        "message": failure.error.message,
        "details": None if details is None else details.decode(),
        "worker_id": failure.worker_id,
        "time": to_ms(failure.time),
    }


def _attempt_from_doc(doc: Mapping[str, Any], node_id: str) -> AttemptFailure:
    details = doc["details"]
    return AttemptFailure(
        attempt=doc["attempt"],
        worker_id=doc["worker_id"],
        time=from_ms(doc["time"]),
        error=ErrorInfo(
            type=doc["type"],
            message=doc["message"],
            details=None if details is None else details.encode(),
            node_id=node_id,
            attempt=doc["attempt"],
            worker_id=doc["worker_id"],
        ),
    )


def dead_letter_values(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "tenant_id": letter.tenant_id,
        "execution_id": letter.execution_id,
        "workflow_name": letter.workflow_name,
        "workflow_version": letter.workflow_version,
        "node_id": letter.node_id,
        "task_type": letter.task_type,
        "input": letter.input,
        "attempts": json.dumps([_attempt_doc(a) for a in letter.attempts], separators=(",", ":")),
        "created_at": to_ms(letter.created_at),
        "redriven_at": opt_to_ms(letter.redriven_at),
    }


def dead_letter_from_row(row: Row) -> DeadLetter:
    node_id = row["node_id"]
    return DeadLetter(
        id=row["id"],
        tenant_id=row["tenant_id"],
        execution_id=row["execution_id"],
        workflow_name=row["workflow_name"],
        workflow_version=row["workflow_version"],
        node_id=node_id,
        task_type=row["task_type"],
        input=_bytes(row["input"]),
        attempts=tuple(_attempt_from_doc(d, node_id) for d in json.loads(row["attempts"])),
        created_at=from_ms(row["created_at"]),
        redriven_at=opt_from_ms(row["redriven_at"]),
    )


# -- audit records --------------------------------------------------------------------------


def _audit_fields(
    source: AuditEntry | AuditRecord,
) -> tuple[str, str, str, str, str, str]:
    """The fields ``model.audit_hash`` covers besides the chain position and the time."""
    s = source
    return (s.actor, s.credential, s.action, s.target, s.outcome, s.request_id)


def audit_record(entry: AuditEntry, *, seq: int, prev_hash: str, at_ms: int) -> AuditRecord:
    """``entry`` as record ``seq`` of its tenant's chain, after the record hashed
    ``prev_hash`` ("" for record 1)."""
    fields = _audit_fields(entry)
    return AuditRecord(
        tenant_id=entry.tenant_id,
        seq=seq,
        at=from_ms(at_ms),
        actor=entry.actor,
        credential=entry.credential,
        action=entry.action,
        target=entry.target,
        outcome=entry.outcome,
        request_id=entry.request_id,
        prev_hash=prev_hash,
        hash=audit_hash(prev_hash, entry.tenant_id, seq, at_ms, fields),
    )


def audit_record_values(record: AuditRecord) -> dict[str, Any]:
    return {
        "tenant_id": record.tenant_id,
        "seq": record.seq,
        "at": to_ms(record.at),
        "actor": record.actor,
        "credential": record.credential,
        "action": record.action,
        "target": record.target,
        "outcome": record.outcome,
        "request_id": record.request_id,
        "prev_hash": record.prev_hash,
        "hash": record.hash,
    }


def audit_record_from_row(row: Row) -> AuditRecord:
    return AuditRecord(
        tenant_id=row["tenant_id"],
        seq=row["seq"],
        at=from_ms(row["at"]),
        actor=row["actor"],
        credential=row["credential"],
        action=row["action"],
        target=row["target"],
        outcome=row["outcome"],
        request_id=row["request_id"],
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


class AuditChainCheck:
    """The check ``AuditRepository.verify`` makes of one tenant's chain: feed it the records
    in seq order (``add``, which names the first problem), then its head (``finish``).

    Each record's hash must match its fields, its ``prev_hash`` the previous record's hash
    ("" for record 1), and the seqs must run 1, 2, 3, ... without a gap; the head (seq and
    hash of the last record) must name the last record. So a changed row, a missing one,
    one inserted (its successor no longer links to it), and records removed from the end
    (the head says more) are all found."""

    def __init__(self) -> None:
        self.count = 0
        self._last_hash = ""

    def add(self, record: AuditRecord) -> tuple[int, str] | None:
        """None while the chain holds, else ``(seq, what is wrong)``."""
        expected = self.count + 1
        seq = record.seq
        if seq != expected:
            return expected, f"record {expected} is missing (the next record is {seq})"
        fields = _audit_fields(record)
        at_ms = to_ms(record.at)
        if audit_hash(record.prev_hash, record.tenant_id, seq, at_ms, fields) != record.hash:
            return seq, f"record {seq} was changed (its hash does not match its fields)"
        if record.prev_hash != self._last_hash:
            return seq, (
                f"record {seq} does not follow record {seq - 1} (its prev_hash is not that "
                f"record's hash: record {seq - 1} was replaced, or record {seq} inserted)"
            )
        self.count = seq
        self._last_hash = record.hash
        return None

    def finish(self, head: tuple[int, str] | None) -> tuple[int, str | None]:
        """``(records checked, None)`` when the head (its seq and hash; None: no head row)
        names the last record fed, else ``(seq, what is wrong)``."""
        count = self.count
        if head is None:
            if count == 0:
                return 0, None
            return count, (
                f"the chain has {count} records but no head (its audit_heads row was removed)"
            )
        head_seq, head_hash = head
        if count < head_seq:
            if count == 0:
                return 1, (
                    f"the chain has no records but its head says {head_seq} (records were removed)"
                )
            return count + 1, (
                f"the chain ends at record {count} but its head says {head_seq} "
                "(records were removed from the end)"
            )
        if count > head_seq:
            return head_seq + 1, (
                f"the chain goes on past its head: record {head_seq + 1} follows record "
                f"{head_seq}, where the head says the chain ends (records were added "
                "without the head)"
            )
        if head_hash != self._last_hash:
            return count, (
                f"record {count} is not the one the chain head names (its hash differs: "
                "the last record was replaced)"
            )
        return count, None
