"""Starting executions as data: what to insert, and the cap of running executions
(``max_running_executions``) with its overflow policy."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from coordinator.model._core import OverflowPolicy, Transition, WorkflowDef


@dataclass(frozen=True)
class NewExecution:
    """An execution to insert: its start transition (or a PENDING row for a delayed start)
    and the child executions (sub-workflows) that start with it, each a start transition."""

    transition: Transition
    children: tuple[Transition, ...] = ()


@dataclass(frozen=True)
class RunningCap:
    """A workflow's max_running_executions (> 0) and what a start beyond it does."""

    max_running: int
    policy: OverflowPolicy

    def refusal(self, workflow_name: str, running: int) -> str:
        return (
            f"workflow '{workflow_name}' has {running} running executions "
            f"(max_running_executions {self.max_running}); retry later or raise the limit"
        )


def running_cap(defn: WorkflowDef) -> RunningCap | None:
    """The cap of ``defn``'s executions, or None when it has none (no counting at all)."""
    if defn.max_running_executions <= 0:
        return None
    return RunningCap(defn.max_running_executions, defn.overflow_policy)


@dataclass(frozen=True)
class CappedStart:
    """An execution to create now, under its workflow's cap when ``cap`` is set."""

    item: NewExecution
    cap: RunningCap | None = None
    # What is stored instead when the workflow is full and the policy is QUEUE: the
    # execution PENDING with ``queued`` set, no node runs.
    queued: Transition | None = None


class PendingStart(enum.Enum):
    """What ``OverflowStore.start_pending`` did."""

    # The execution is RUNNING (or ended at once).
    STARTED = "started"
    # The workflow was full; ``when_full`` was written (queued, or refused).
    DEFERRED = "deferred"
    # The workflow was full and nothing was written (an already queued execution).
    FULL = "full"
    # The row changed since it was read, is gone, or another replica holds it.
    SKIPPED = "skipped"
