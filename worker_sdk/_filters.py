"""Which executions an operator means (``Client.list_executions`` and bulk actions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from trellis.v1 import common_pb2
from worker_sdk._convert import execution_status_from_name


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    if value.utcoffset() is None:
        raise ValueError(f"{value.isoformat()} has no time zone; give one (e.g. +00:00)")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


@dataclass(frozen=True)
class ExecutionFilter:
    """Executions matching every field given (None or empty: any). Times need a zone;
    ``*_after`` and ``*_before`` are exclusive; ``ended_*`` match only ended executions."""

    workflow_name: str | None = None
    workflow_version: int | None = None
    # Status names, e.g. ("RUNNING", "PAUSED").
    statuses: tuple[str, ...] = field(default_factory=tuple)
    created_after: datetime | None = None
    created_before: datetime | None = None
    ended_after: datetime | None = None
    ended_before: datetime | None = None
    idempotency_key: str | None = None
    parent_execution_id: str | None = None
    id_prefix: str | None = None

    def to_proto(self) -> common_pb2.ExecutionFilter:
        return common_pb2.ExecutionFilter(
            workflow_name=self.workflow_name or "",
            workflow_version=self.workflow_version or 0,
            statuses=[execution_status_from_name(s) for s in self.statuses],
            created_after=_timestamp(self.created_after),
            created_before=_timestamp(self.created_before),
            ended_after=_timestamp(self.ended_after),
            ended_before=_timestamp(self.ended_before),
            idempotency_key=self.idempotency_key or "",
            parent_execution_id=self.parent_execution_id or "",
            id_prefix=self.id_prefix or "",
        )
