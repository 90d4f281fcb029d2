"""Domain model: definitions, executions, node runs and events (pure data, no I/O).

Payloads (inputs, outputs, configs, details) are JSON documents kept as UTF-8
bytes; they are parsed only where a value inside them is needed.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

DEFAULT_TENANT = "default"
NULL_JSON = b"null"


class ExecutionStatus(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_EXECUTION


_TERMINAL_EXECUTION = frozenset(
    {
        ExecutionStatus.SUCCEEDED,
        ExecutionStatus.FAILED,
        ExecutionStatus.CANCELLED,
        ExecutionStatus.TIMED_OUT,
    }
)


class NodeStatus(enum.StrEnum):
    BLOCKED = "BLOCKED"
    READY = "READY"
    LEASED = "LEASED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"
    WAITING = "WAITING"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_NODE


_TERMINAL_NODE = frozenset(
    {
        NodeStatus.SUCCEEDED,
        NodeStatus.FAILED,
        NodeStatus.SKIPPED,
        NodeStatus.CANCELLED,
        NodeStatus.TIMED_OUT,
    }
)


class EventType(enum.StrEnum):
    EXECUTION_STARTED = "EXECUTION_STARTED"
    EXECUTION_SUCCEEDED = "EXECUTION_SUCCEEDED"
    EXECUTION_FAILED = "EXECUTION_FAILED"
    EXECUTION_CANCELLED = "EXECUTION_CANCELLED"
    EXECUTION_TIMED_OUT = "EXECUTION_TIMED_OUT"
    EXECUTION_PAUSED = "EXECUTION_PAUSED"
    EXECUTION_RESUMED = "EXECUTION_RESUMED"
    # The execution has failed; its on_failure handlers and compensations run before it ends.
    EXECUTION_FAILING = "EXECUTION_FAILING"
    NODE_READY = "NODE_READY"
    NODE_LEASED = "NODE_LEASED"
    NODE_SUCCEEDED = "NODE_SUCCEEDED"
    NODE_ATTEMPT_FAILED = "NODE_ATTEMPT_FAILED"
    NODE_RETRY_SCHEDULED = "NODE_RETRY_SCHEDULED"
    NODE_FAILED = "NODE_FAILED"
    NODE_CANCELLED = "NODE_CANCELLED"
    NODE_SKIPPED = "NODE_SKIPPED"
    NODE_TIMED_OUT = "NODE_TIMED_OUT"
    NODE_HELD = "NODE_HELD"
    NODE_RELEASED = "NODE_RELEASED"
    NODE_DEAD_LETTERED = "NODE_DEAD_LETTERED"
    NODE_REDRIVEN = "NODE_REDRIVEN"


class NodeRole(enum.StrEnum):
    """Why a node run exists: a definition node, an on_failure handler, or a compensation."""

    TASK = "task"
    ON_FAILURE = "on_failure"
    COMPENSATION = "compensation"


COMPENSATION_SUFFIX = "~compensate"


@dataclass(frozen=True)
class RetryPolicy:
    """How failed attempts of a node are retried. ``max_attempts`` counts the first one."""

    max_attempts: int = 1
    initial_interval: timedelta = timedelta(seconds=1)
    backoff_coefficient: float = 2.0
    max_interval: timedelta = timedelta(seconds=100)
    non_retryable_error_types: tuple[str, ...] = ()
    # Each delay is moved by up to this fraction either way (0 = none), deterministically
    # from (execution, node, attempt) so the engine stays pure.
    jitter: float = 0.0


@dataclass(frozen=True)
class NodeSpec:
    """One node of a definition. ``kind`` is ``"task"`` (run by a worker of ``task_type``)."""

    id: str
    task_type: str
    kind: str = "task"
    config: bytes = b""
    retry_policy: RetryPolicy | None = None
    start_to_close_timeout: timedelta | None = None
    heartbeat_timeout: timedelta | None = None
    priority: int = 0
    schedule_to_start_timeout: timedelta | None = None
    # Id of a handler node (no edges) run with this node's failure as input.
    on_failure: str | None = None
    # Task type run (saga-style) to undo this node when the execution fails after it succeeded.
    compensation_task_type: str | None = None
    # Hold the node when it becomes READY until resumed by an operator.
    pause_before: bool = False


@dataclass(frozen=True)
class WorkflowDef:
    """An immutable, versioned DAG. ``edges`` are ``(source, target)`` pairs."""

    name: str
    nodes: tuple[NodeSpec, ...]
    edges: tuple[tuple[str, str], ...] = ()
    version: int = 0
    description: str = ""
    default_retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    default_start_to_close_timeout: timedelta = timedelta(minutes=5)
    tenant_id: str = DEFAULT_TENANT
    created_at: datetime | None = None
    execution_timeout: timedelta | None = None
    default_schedule_to_start_timeout: timedelta | None = None
    default_heartbeat_timeout: timedelta | None = None

    @cached_property
    def handlers(self) -> frozenset[str]:
        """Nodes named by some node's ``on_failure``: outside the normal flow."""
        return frozenset(n.on_failure for n in self.nodes if n.on_failure)

    @cached_property
    def node_map(self) -> dict[str, NodeSpec]:
        return {n.id: n for n in self.nodes}

    @cached_property
    def parents(self) -> dict[str, tuple[str, ...]]:
        """Parent ids of every node, in edge order."""
        out: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for source, target in self.edges:
            out.setdefault(target, []).append(source)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def children(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for source, target in self.edges:
            out.setdefault(source, []).append(target)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def sinks(self) -> tuple[str, ...]:
        """Nodes without children, in node order: their outputs form the execution's output."""
        return tuple(
            n.id for n in self.nodes if not self.children.get(n.id) and n.id not in self.handlers
        )

    def retry_policy_for(self, node: NodeSpec) -> RetryPolicy:
        return node.retry_policy or self.default_retry_policy

    def start_to_close_for(self, node: NodeSpec) -> timedelta:
        return node.start_to_close_timeout or self.default_start_to_close_timeout

    def schedule_to_start_for(self, node: NodeSpec) -> timedelta | None:
        return node.schedule_to_start_timeout or self.default_schedule_to_start_timeout

    def heartbeat_timeout_for(self, node: NodeSpec) -> timedelta | None:
        return node.heartbeat_timeout or self.default_heartbeat_timeout

    @cached_property
    def content_hash(self) -> str:
        """Hash of the content that defines behaviour (not name bookkeeping like version)."""
        doc = definition_to_document(self)
        for key in ("version", "tenant_id", "created_at"):
            doc.pop(key, None)
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class ErrorInfo:
    """Why a node attempt or an execution failed."""

    type: str
    message: str
    details: bytes | None = None
    node_id: str | None = None
    attempt: int = 0
    worker_id: str | None = None


@dataclass(frozen=True)
class Execution:
    id: str
    workflow_name: str
    workflow_version: int
    status: ExecutionStatus
    input: bytes
    created_at: datetime
    updated_at: datetime
    tenant_id: str = DEFAULT_TENANT
    output: bytes | None = None
    error: ErrorInfo | None = None
    priority: int = 0
    idempotency_key: str | None = None
    parent_execution_id: str | None = None
    depth: int = 0
    ended_at: datetime | None = None
    # When the execution times out (definition's execution_timeout), if it has one.
    deadline: datetime | None = None
    # Optimistic concurrency: every transition writes version + 1 where version matches.
    version: int = 0


@dataclass(frozen=True)
class NodeRun:
    """A node inside an execution, with its current lease (when LEASED)."""

    execution_id: str
    node_id: str
    task_type: str
    status: NodeStatus
    updated_at: datetime
    workflow_name: str
    workflow_version: int
    tenant_id: str = DEFAULT_TENANT
    attempt: int = 0
    input: bytes | None = None
    output: bytes | None = None
    error: ErrorInfo | None = None
    priority: int = 0
    # READY rows may be claimed once available_at <= now (retry backoff pushes it out).
    available_at: datetime | None = None
    start_to_close_timeout: timedelta = timedelta(minutes=5)
    heartbeat_timeout: timedelta | None = None
    # Fencing number: incremented by every claim; lease tokens carry it.
    lease_seq: int = 0
    worker_id: str | None = None
    lease_deadline: datetime | None = None
    heartbeat_deadline: datetime | None = None
    # READY rows still unleased at this time are TIMED_OUT (schedule-to-start).
    schedule_deadline: datetime | None = None
    schedule_to_start_timeout: timedelta | None = None
    # Held rows are not dispatched: held = execution PAUSED or node_paused.
    held: bool = False
    # Paused on its own (the spec's pause_before, or PauseNode) until ResumeNode.
    node_paused: bool = False
    # Attempts made before the last redrive: the retry budget counts attempt - retry_base.
    retry_base: int = 0
    role: NodeRole = NodeRole.TASK


@dataclass(frozen=True)
class AttemptFailure:
    attempt: int
    error: ErrorInfo
    time: datetime
    worker_id: str | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A node run that exhausted its retries, failed non-retryably, or timed out unstarted."""

    id: str
    execution_id: str
    workflow_name: str
    workflow_version: int
    node_id: str
    task_type: str
    input: bytes | None
    attempts: tuple[AttemptFailure, ...]
    created_at: datetime
    tenant_id: str = DEFAULT_TENANT
    redriven_at: datetime | None = None


@dataclass(frozen=True)
class Event:
    """One state transition. ``sequence`` is assigned by the store (increasing)."""

    execution_id: str
    type: EventType
    time: datetime
    tenant_id: str = DEFAULT_TENANT
    node_id: str | None = None
    attempt: int = 0
    worker_id: str | None = None
    details: bytes | None = None
    sequence: int = 0


@dataclass(frozen=True)
class Transition:
    """What one engine step changes: persisted by the store in one transaction.

    ``execution`` carries the *loaded* ``version``; the store writes ``version + 1``
    only where the stored version still matches, and raises ``Conflict`` otherwise.
    ``nodes`` holds only the node runs that changed (whole rows, replaced).
    """

    execution: Execution
    nodes: tuple[NodeRun, ...] = ()
    events: tuple[Event, ...] = ()
    # Node ids dead-lettered by this transition: the store writes a DeadLetter for each,
    # with the node's input and its attempts' failures (from NODE_ATTEMPT_FAILED events).
    dead_lettered: tuple[str, ...] = ()
    # The dead letter this transition redrives: the store stamps its redriven_at.
    redriven_dead_letter: str | None = None

    @property
    def ready(self) -> tuple[NodeRun, ...]:
        """Rows this transition left READY and dispatchable (not held)."""
        return tuple(n for n in self.nodes if n.status is NodeStatus.READY and not n.held)


@dataclass(frozen=True)
class WorkflowSummary:
    name: str
    latest_version: int
    description: str = ""


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    task_types: tuple[str, ...]
    capacity: int
    last_seen: datetime
    tenant_id: str = DEFAULT_TENANT
    labels: dict[str, str] = field(default_factory=dict)
    sdk_language: str = ""
    sdk_version: str = ""
    identity: str = ""


# -- JSON helpers -------------------------------------------------------------------------


def compose_object(items: list[tuple[str, bytes | None]]) -> bytes:
    """Build ``{"k": <v>, ...}`` from already-serialized JSON values without re-parsing them."""
    parts = [json.dumps(k).encode() + b":" + (v or NULL_JSON) for k, v in items]
    return b"{" + b",".join(parts) + b"}"


def _td(value: timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


def _from_td(value: float | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=value)


def _retry_doc(policy: RetryPolicy | None) -> dict[str, Any] | None:
    if policy is None:
        return None
    return {
        "max_attempts": policy.max_attempts,
        "initial_interval": _td(policy.initial_interval),
        "backoff_coefficient": policy.backoff_coefficient,
        "max_interval": _td(policy.max_interval),
        "non_retryable_error_types": list(policy.non_retryable_error_types),
        "jitter": policy.jitter,
    }


def _retry_from_doc(doc: dict[str, Any] | None) -> RetryPolicy | None:
    if doc is None:
        return None
    return RetryPolicy(
        max_attempts=doc["max_attempts"],
        initial_interval=timedelta(seconds=doc["initial_interval"]),
        backoff_coefficient=doc["backoff_coefficient"],
        max_interval=timedelta(seconds=doc["max_interval"]),
        non_retryable_error_types=tuple(doc["non_retryable_error_types"]),
        jitter=doc.get("jitter", 0.0),
    )


def definition_to_document(defn: WorkflowDef) -> dict[str, Any]:
    """A JSON-serializable form of a definition, used for storage and content hashing."""
    return {
        "name": defn.name,
        "version": defn.version,
        "description": defn.description,
        "tenant_id": defn.tenant_id,
        "default_retry_policy": _retry_doc(defn.default_retry_policy),
        "default_start_to_close_timeout": _td(defn.default_start_to_close_timeout),
        "execution_timeout": _td(defn.execution_timeout),
        "default_schedule_to_start_timeout": _td(defn.default_schedule_to_start_timeout),
        "default_heartbeat_timeout": _td(defn.default_heartbeat_timeout),
        "nodes": [
            {
                "id": n.id,
                "kind": n.kind,
                "task_type": n.task_type,
                "config": n.config.decode() if n.config else None,
                "retry_policy": _retry_doc(n.retry_policy),
                "start_to_close_timeout": _td(n.start_to_close_timeout),
                "heartbeat_timeout": _td(n.heartbeat_timeout),
                "priority": n.priority,
                "schedule_to_start_timeout": _td(n.schedule_to_start_timeout),
                "on_failure": n.on_failure,
                "compensation_task_type": n.compensation_task_type,
                "pause_before": n.pause_before,
            }
            for n in defn.nodes
        ],
        "edges": [[s, t] for s, t in defn.edges],
    }


def definition_from_document(
    doc: dict[str, Any], *, version: int | None = None, created_at: datetime | None = None
) -> WorkflowDef:
    nodes = tuple(
        NodeSpec(
            id=n["id"],
            kind=n["kind"],
            task_type=n["task_type"],
            config=n["config"].encode() if n["config"] else b"",
            retry_policy=_retry_from_doc(n["retry_policy"]),
            start_to_close_timeout=_from_td(n["start_to_close_timeout"]),
            heartbeat_timeout=_from_td(n["heartbeat_timeout"]),
            priority=n["priority"],
            schedule_to_start_timeout=_from_td(n.get("schedule_to_start_timeout")),
            on_failure=n.get("on_failure"),
            compensation_task_type=n.get("compensation_task_type"),
            pause_before=n.get("pause_before", False),
        )
        for n in doc["nodes"]
    )
    default_retry = _retry_from_doc(doc["default_retry_policy"]) or RetryPolicy()
    return WorkflowDef(
        name=doc["name"],
        nodes=nodes,
        edges=tuple((s, t) for s, t in doc["edges"]),
        version=doc["version"] if version is None else version,
        description=doc["description"],
        default_retry_policy=default_retry,
        default_start_to_close_timeout=timedelta(seconds=doc["default_start_to_close_timeout"]),
        tenant_id=doc["tenant_id"],
        created_at=created_at,
        execution_timeout=_from_td(doc.get("execution_timeout")),
        default_schedule_to_start_timeout=_from_td(doc.get("default_schedule_to_start_timeout")),
        default_heartbeat_timeout=_from_td(doc.get("default_heartbeat_timeout")),
    )
