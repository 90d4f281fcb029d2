"""What the Client returns: executions, node states, errors, events, workflows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

TERMINAL_EXECUTION_STATUSES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"})


@dataclass(frozen=True)
class ErrorDetails:
    """Why a node or an execution failed.

    ``type`` is the error type a worker reported (an exception class name, say,
    or "TimeoutError"); ``details`` is the decoded JSON the worker attached
    (e.g. ``{"traceback": ...}``) or None. ``node_id``, ``attempt`` and
    ``worker_id`` say where an execution's error came from.
    """

    type: str
    message: str
    node_id: str = ""
    attempt: int = 0
    worker_id: str = ""
    details: Any = None


@dataclass(frozen=True)
class NodeState:
    """One node inside an execution.

    ``status`` is one of BLOCKED, READY, LEASED, SUCCEEDED, FAILED, SKIPPED,
    CANCELLED, TIMED_OUT, WAITING; ``attempt`` is the current or last attempt
    (0 before the first lease); ``output`` is decoded JSON. A workflow node's
    ``child_execution_id`` is the child execution it started; the elements of a map
    node appear as ``"<map id>[<index>]"``. An approval node is WAITING until decided;
    the decision (``approved``, ``by``, ``at``, ``comment``) is then its ``output``, or
    its ``error.details`` when rejected.
    """

    node_id: str
    task_type: str
    status: str
    attempt: int = 0
    output: Any = None
    error: ErrorDetails | None = None
    worker_id: str = ""
    held: bool = False
    child_execution_id: str = ""


@dataclass(frozen=True)
class AttemptFailure:
    """One failed attempt kept by a dead letter."""

    attempt: int
    error: ErrorDetails | None
    worker_id: str = ""
    time: datetime | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A node run that exhausted its retries (or failed non-retryably, or timed out before
    it started). ``redrive_time`` is set once it has been redriven."""

    id: str
    execution_id: str
    workflow_name: str
    workflow_version: int
    node_id: str
    task_type: str
    input: Any = None
    attempts: tuple[AttemptFailure, ...] = ()
    create_time: datetime | None = None
    redrive_time: datetime | None = None


@dataclass(frozen=True)
class Execution:
    """One run of one workflow version.

    ``status`` is one of PENDING, RUNNING, PAUSED, SUCCEEDED, FAILED, CANCELLED,
    TIMED_OUT. ``input`` and ``output`` are decoded JSON. ``nodes`` is filled by
    ``Client.get_execution`` and ``wait_for_execution`` (empty in lists).
    A child execution (started by a workflow node) has ``parent_execution_id``,
    ``parent_node_id`` and ``depth`` (0 for a top-level execution); ``start_time`` is
    when a delayed execution starts (it is PENDING until then). ``max_concurrency``
    caps its leased nodes (0 = none); ``queued`` is true while it waits PENDING behind its
    workflow's max_running_executions.
    """

    id: str
    workflow_name: str
    workflow_version: int
    status: str
    input: Any = None
    output: Any = None
    error: ErrorDetails | None = None
    nodes: tuple[NodeState, ...] = ()
    priority: int = 0
    idempotency_key: str = ""
    create_time: datetime | None = None
    end_time: datetime | None = None
    parent_execution_id: str = ""
    parent_node_id: str = ""
    depth: int = 0
    start_time: datetime | None = None
    max_concurrency: int = 0
    queued: bool = False

    @property
    def terminal(self) -> bool:
        """True once the execution has ended (SUCCEEDED, FAILED, CANCELLED or TIMED_OUT)."""
        return self.status in TERMINAL_EXECUTION_STATUSES

    def node(self, node_id: str) -> NodeState:
        """The state of node ``node_id``; KeyError when there is none."""
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)


@dataclass(frozen=True)
class Event:
    """One state transition of an execution or one of its nodes.

    ``type`` is e.g. EXECUTION_STARTED, NODE_LEASED, NODE_SUCCEEDED;
    ``sequence`` increases within an execution (resume a watch after it);
    ``details`` is decoded JSON or None.
    """

    sequence: int
    type: str
    execution_id: str = ""
    node_id: str = ""
    attempt: int = 0
    worker_id: str = ""
    time: datetime | None = None
    details: Any = None


@dataclass(frozen=True)
class RegisteredWorkflow:
    """The outcome of ``Client.register_workflow``.

    ``created`` is False when identical content was already registered (its
    existing version is returned).
    """

    name: str
    version: int
    created: bool


@dataclass(frozen=True)
class WorkflowSummary:
    """One registered workflow, as listed by ``Client.list_workflows``."""

    name: str
    latest_version: int
    description: str = ""
