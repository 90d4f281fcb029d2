"""Domain model: definitions, executions, node runs and events (pure data, no I/O).

Payloads (inputs, outputs, configs, details) are JSON documents kept as UTF-8
bytes; they are parsed only where a value inside them is needed.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from coordinator.model._secrets import secret_references

if TYPE_CHECKING:
    from coordinator.model._notifications import Delivery

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
    # A workflow node waits for its child execution, a map node for its elements, an
    # approval node for a decision.
    NODE_WAITING = "NODE_WAITING"
    # An approval node's decision (details: who, when, the comment); NODE_SUCCEEDED or
    # NODE_FAILED follows.
    NODE_APPROVED = "NODE_APPROVED"
    NODE_REJECTED = "NODE_REJECTED"


class NodeRole(enum.StrEnum):
    """Why a node run exists: a definition node, an on_failure handler, a compensation, or
    one element of a ``map`` node (id ``"<map id>[<index>]"``)."""

    TASK = "task"
    ON_FAILURE = "on_failure"
    COMPENSATION = "compensation"
    MAP_ITEM = "map_item"


class NodeKind(enum.StrEnum):
    """What a node is. Only ``task`` nodes (and the elements of a ``map``) go to workers."""

    TASK = "task"
    # Evaluated by the coordinator: CEL cases choose which children run; the others SKIP.
    SWITCH = "switch"
    # Starts a child execution of another definition and WAITs for it (no worker held).
    WORKFLOW = "workflow"
    # One task of ``task_type`` per element of the list ``items_expr`` gives; output: the list
    # of their outputs, in order.
    MAP = "map"
    # Human in the loop: WAITs (no worker held) until someone with ``required_role``
    # approves it (it SUCCEEDS with the decision) or rejects it (it FAILS, not retried).
    APPROVAL = "approval"


class TriggerRule(enum.StrEnum):
    """When a node with parents runs, given how its parents ended (docs/control-flow.md)."""

    ALL_SUCCESS = "all_success"
    ALL_DONE = "all_done"
    ONE_SUCCESS = "one_success"
    NONE_FAILED_MIN_ONE_SUCCESS = "none_failed_min_one_success"
    ALL_FAILED = "all_failed"


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
    """One node of a definition. ``kind`` is a ``NodeKind`` value (``"task"``: run by a
    worker of ``task_type``)."""

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
    # -- control flow (CEL expressions are compiled and type-checked at registration) --
    trigger_rule: TriggerRule = TriggerRule.ALL_SUCCESS
    # CEL condition; true when the node becomes ready means it is SKIPPED instead of run.
    skip_if: str = ""
    # CEL expression computing the node's input; empty means the default data passing.
    input_expr: str = ""
    # CEL expression over ``output`` (and the context) mapping the node's result
    # (a workflow node's child output, a map's list) to the node's output.
    output_expr: str = ""
    # kind switch: cases in order; ``match_all`` takes every matching case, else the first.
    cases: tuple[SwitchCase, ...] = ()
    default_targets: tuple[str, ...] = ()
    match_all: bool = False
    # kind workflow: the child definition (version 0 = the latest when the child starts).
    workflow_name: str = ""
    workflow_version: int = 0
    # kind map: CEL expression giving the list to fan out over; at most ``max_concurrency``
    # elements READY or LEASED at once (0 = no limit).
    items_expr: str = ""
    max_concurrency: int = 0
    # kind approval: the role a decider must hold ("admin" may always decide), how long
    # the node waits for a decision before it is TIMED_OUT (None: no limit), and the text
    # shown to approvers.
    required_role: str = ""
    approval_timeout: timedelta | None = None
    prompt: str = ""
    # A JSON Schema (JSON text, canonical: sorted keys) every output a worker returns for
    # this node must match (kinds task and map: each element's output); empty: none.
    output_schema: bytes = b""
    # The secrets ``config`` references (``${secret:NAME}``), found once when the spec is
    # built: () means the config is handed out as stored, at no cost.
    secret_refs: tuple[str, ...] = field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.config:
            object.__setattr__(self, "secret_refs", secret_references(self.config))


@dataclass(frozen=True)
class SwitchCase:
    """One branch of a switch node: when ``condition`` (CEL, bool) holds, ``targets`` run."""

    condition: str
    targets: tuple[str, ...]


class OverflowPolicy(enum.StrEnum):
    """What a start does when its workflow already has max_running_executions running."""

    # Created PENDING (``Execution.queued``); started oldest first when a running one ends.
    QUEUE = "QUEUE"
    # Refused (ResourceExhausted); nothing is created.
    REJECT = "REJECT"


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
    # Most nodes of one execution leased at once (0 = no limit); a start may set its own.
    max_concurrency: int = 0
    # Most RUNNING executions of this workflow (all versions together; 0 = no limit) and
    # what a start beyond it does.
    max_running_executions: int = 0
    overflow_policy: OverflowPolicy = OverflowPolicy.QUEUE
    # A JSON Schema (JSON text, canonical: sorted keys) every execution input must match,
    # on every kind of start; empty: none.
    input_schema: bytes = b""

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
    # The workflow node of the parent execution this execution runs for (sub-workflows).
    parent_node_id: str | None = None
    # A delayed start: the execution stays PENDING until then (durable; a sweeper starts it).
    start_at: datetime | None = None
    # Nodes and edges added at run time by tasks (dynamic expansion): a JSON document
    # ``{"nodes": [...], "edges": [[s, t], ...]}`` in definition_to_document's node form.
    expansion: bytes | None = None
    # Most nodes of this execution leased at once (0 = no limit).
    max_concurrency: int = 0
    # PENDING because its workflow had max_running_executions running (overflow QUEUE);
    # started, oldest first, when a running execution of the workflow ends.
    queued: bool = False
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
    # READY rows still unleased at this time are TIMED_OUT (schedule-to-start); a WAITING
    # approval node still undecided at this time is TIMED_OUT (its approval_timeout).
    schedule_deadline: datetime | None = None
    schedule_to_start_timeout: timedelta | None = None
    # Held rows are not dispatched: held = execution PAUSED or node_paused.
    held: bool = False
    # Paused on its own (the spec's pause_before, or PauseNode) until ResumeNode.
    node_paused: bool = False
    # Attempts made before the last redrive: the retry budget counts attempt - retry_base.
    retry_base: int = 0
    role: NodeRole = NodeRole.TASK
    # A workflow node that is WAITING: the child execution it started.
    child_execution_id: str | None = None


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
    # Child executions to create (workflow nodes that became WAITING); the service resolves
    # each definition, starts the child and stores it in the same transaction.
    start_children: tuple[ChildStart, ...] = ()
    # Child executions to cancel (their parent was cancelled or failed).
    cancel_children: tuple[str, ...] = ()
    # Notifications this transition queues (it ended the execution and rules matched): the
    # service decides them (``deliveries_for``), the store inserts them in the same
    # database transaction, so a notification exists exactly when the end was committed.
    deliveries: tuple[Delivery, ...] = ()

    @property
    def ready(self) -> tuple[NodeRun, ...]:
        """Rows this transition left READY and dispatchable (not held)."""
        return tuple(n for n in self.nodes if n.status is NodeStatus.READY and not n.held)


@dataclass(frozen=True)
class ChildStart:
    """A child execution a workflow node asks for (see ``Transition.start_children``)."""

    node_id: str
    workflow_name: str
    workflow_version: int  # 0 = latest
    input: bytes
    priority: int = 0


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
    # The credential that registered the worker id: only it may use the id (heartbeats).
    credential: str = ""


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


def _control_doc(node: NodeSpec) -> dict[str, Any]:
    """The control-flow fields that differ from their defaults (so that definitions without
    them keep the content hash they had before these fields existed)."""
    doc: dict[str, Any] = {}
    if node.trigger_rule is not TriggerRule.ALL_SUCCESS:
        doc["trigger_rule"] = node.trigger_rule.value
    for key in (
        "skip_if",
        "input_expr",
        "output_expr",
        "workflow_name",
        "items_expr",
        "required_role",
        "prompt",
    ):
        if getattr(node, key):
            doc[key] = getattr(node, key)
    if node.cases:
        doc["cases"] = [{"condition": c.condition, "targets": list(c.targets)} for c in node.cases]
    if node.default_targets:
        doc["default_targets"] = list(node.default_targets)
    if node.match_all:
        doc["match_all"] = True
    if node.workflow_version:
        doc["workflow_version"] = node.workflow_version
    if node.max_concurrency:
        doc["max_concurrency"] = node.max_concurrency
    if node.approval_timeout is not None:
        doc["approval_timeout"] = _td(node.approval_timeout)
    if node.output_schema:
        doc["output_schema"] = node.output_schema.decode()
    return doc


def _control_from_doc(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "trigger_rule": TriggerRule(doc.get("trigger_rule", TriggerRule.ALL_SUCCESS.value)),
        "skip_if": doc.get("skip_if", ""),
        "input_expr": doc.get("input_expr", ""),
        "output_expr": doc.get("output_expr", ""),
        "cases": tuple(
            SwitchCase(condition=c["condition"], targets=tuple(c["targets"]))
            for c in doc.get("cases", ())
        ),
        "default_targets": tuple(doc.get("default_targets", ())),
        "match_all": doc.get("match_all", False),
        "workflow_name": doc.get("workflow_name", ""),
        "workflow_version": doc.get("workflow_version", 0),
        "items_expr": doc.get("items_expr", ""),
        "max_concurrency": doc.get("max_concurrency", 0),
        "required_role": doc.get("required_role", ""),
        "approval_timeout": _from_td(doc.get("approval_timeout")),
        "prompt": doc.get("prompt", ""),
        "output_schema": doc["output_schema"].encode() if doc.get("output_schema") else b"",
    }


def node_to_document(node: NodeSpec) -> dict[str, Any]:
    """One node in the document form (also used for dynamic expansions)."""
    return {
        "id": node.id,
        "kind": node.kind,
        "task_type": node.task_type,
        "config": node.config.decode() if node.config else None,
        "retry_policy": _retry_doc(node.retry_policy),
        "start_to_close_timeout": _td(node.start_to_close_timeout),
        "heartbeat_timeout": _td(node.heartbeat_timeout),
        "priority": node.priority,
        "schedule_to_start_timeout": _td(node.schedule_to_start_timeout),
        "on_failure": node.on_failure,
        "compensation_task_type": node.compensation_task_type,
        "pause_before": node.pause_before,
        **_control_doc(node),
    }


def node_from_document(n: dict[str, Any]) -> NodeSpec:
    return NodeSpec(
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
        **_control_from_doc(n),
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
        "nodes": [node_to_document(n) for n in defn.nodes],
        "edges": [[s, t] for s, t in defn.edges],
        # Only when set, so that definitions registered before these existed keep their hash.
        **({"max_concurrency": defn.max_concurrency} if defn.max_concurrency else {}),
        **(
            {
                "max_running_executions": defn.max_running_executions,
                "overflow_policy": str(defn.overflow_policy),
            }
            if defn.max_running_executions
            else {}
        ),
        **({"input_schema": defn.input_schema.decode()} if defn.input_schema else {}),
    }


def definition_from_document(
    doc: dict[str, Any], *, version: int | None = None, created_at: datetime | None = None
) -> WorkflowDef:
    nodes = tuple(node_from_document(n) for n in doc["nodes"])
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
        max_concurrency=doc.get("max_concurrency", 0),
        max_running_executions=doc.get("max_running_executions", 0),
        overflow_policy=OverflowPolicy(doc.get("overflow_policy", OverflowPolicy.QUEUE)),
        input_schema=doc["input_schema"].encode() if doc.get("input_schema") else b"",
    )


# -- dispatch control (docs/dispatch.md) -------------------------------------------------


DEFAULT_BREAKER_RESET = timedelta(seconds=30)


@dataclass(frozen=True)
class TaskTypeLimits:
    """The dispatch limits of one task type, enforced in the claim (0 / "" = none)."""

    task_type: str
    tenant_id: str = DEFAULT_TENANT
    # Token bucket: tasks handed out per second, and the bucket size (0 = see ``bucket_size``).
    rate_per_second: float = 0.0
    burst: int = 0
    # CEL over the node input (``input``): one bucket per value.
    rate_key: str = ""
    # Most tasks of the type leased at once across all replicas.
    max_concurrency: int = 0
    # CEL over the node input: at most ``concurrency_key_limit`` leased tasks per value.
    concurrency_key: str = ""
    concurrency_key_limit: int = 1
    # Consecutive failed attempts that open the type's breaker (0 = no breaker).
    breaker_failure_threshold: int = 0
    breaker_reset_timeout: timedelta = DEFAULT_BREAKER_RESET
    updated_at: datetime | None = None

    @property
    def bucket_size(self) -> int:
        """The burst, defaulting to one second's worth of tokens (at least 1)."""
        if self.burst > 0:
            return self.burst
        return max(1, math.ceil(self.rate_per_second))

    @property
    def limits_concurrency(self) -> bool:
        """True when the claim must count this type's leased tasks."""
        return self.max_concurrency > 0 or bool(self.concurrency_key)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True)
class BreakerInfo:
    """The circuit breaker of one task type, as an operator sees it."""

    task_type: str
    state: BreakerState
    failure_count: int
    failure_threshold: int
    reset_timeout: timedelta
    opened_at: datetime | None = None
    # True when the state lives in Redis (shared by all replicas).
    shared: bool = False
