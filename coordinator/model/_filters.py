"""Which executions an operator means: the filter of ListExecutions and of bulk actions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from coordinator.model._core import Execution, ExecutionStatus

# The longest id prefix a filter may give (execution ids are shorter than this).
MAX_ID_PREFIX = 64


@dataclass(frozen=True)
class ExecutionFilter:
    """Executions of one tenant that match every field given (None or empty: any).

    Times are half-open: ``created_after`` is exclusive, ``created_before`` exclusive, so
    two adjacent windows never share an execution; ``ended_*`` match only ended executions.
    """

    workflow_name: str | None = None
    # Needs ``workflow_name``.
    workflow_version: int | None = None
    statuses: frozenset[ExecutionStatus] = frozenset()
    created_after: datetime | None = None
    created_before: datetime | None = None
    ended_after: datetime | None = None
    ended_before: datetime | None = None
    idempotency_key: str | None = None
    parent_execution_id: str | None = None
    id_prefix: str | None = None

    def problems(self) -> list[str]:
        """What makes this filter unusable, each as a sentence saying what to fix."""
        out: list[str] = []
        if self.workflow_version is not None and not self.workflow_name:
            out.append("a workflow version needs the workflow name too")
        if self.workflow_version is not None and self.workflow_version < 1:
            out.append(f"workflow version {self.workflow_version} is not a version (1 or more)")
        for lower, upper, what in (
            (self.created_after, self.created_before, "created"),
            (self.ended_after, self.ended_before, "ended"),
        ):
            if lower is not None and upper is not None and lower >= upper:
                out.append(f"the {what} range is empty: its start is not before its end")
        if self.id_prefix is not None and len(self.id_prefix) > MAX_ID_PREFIX:
            out.append(f"the id prefix is longer than {MAX_ID_PREFIX} characters")
        return out

    def matches(self, execution: Execution) -> bool:
        e = execution
        if self.workflow_name is not None and e.workflow_name != self.workflow_name:
            return False
        if self.workflow_version is not None and e.workflow_version != self.workflow_version:
            return False
        if self.statuses and e.status not in self.statuses:
            return False
        if self.created_after is not None and not e.created_at > self.created_after:
            return False
        if self.created_before is not None and not e.created_at < self.created_before:
            return False
        if self.ended_after is not None or self.ended_before is not None:
            if e.ended_at is None:
                return False
            if self.ended_after is not None and not e.ended_at > self.ended_after:
                return False
            if self.ended_before is not None and not e.ended_at < self.ended_before:
                return False
        if self.idempotency_key is not None and e.idempotency_key != self.idempotency_key:
            return False
        if (
            self.parent_execution_id is not None
            and e.parent_execution_id != self.parent_execution_id
        ):
            return False
        return self.id_prefix is None or e.id.startswith(self.id_prefix)


ANY_EXECUTION = ExecutionFilter()
