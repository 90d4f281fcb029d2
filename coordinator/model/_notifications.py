"""Notifications as data: channels, rules, deliveries (the outbox) and their attempts.

When a transition ends an execution, the service decides its deliveries
(``deliveries_for``, one per matching rule) and carries them in ``Transition.deliveries``;
the store inserts them in the transition's own database transaction.
"""

from __future__ import annotations

import contextlib
import enum
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from coordinator.model._core import Execution, ExecutionStatus


class ChannelKind(enum.StrEnum):
    WEBHOOK = "webhook"
    SMTP = "smtp"
    SMS = "sms"


# An execution's output is carried in the notification up to this size (else only its size).
MAX_INLINE_OUTPUT = 4096
# Error messages are cut to this length in the notification.
MAX_ERROR_MESSAGE = 2000
TERMINAL_STATUSES = (
    ExecutionStatus.SUCCEEDED,
    ExecutionStatus.FAILED,
    ExecutionStatus.TIMED_OUT,
    ExecutionStatus.CANCELLED,
)


class DeliveryStatus(enum.StrEnum):
    PENDING = "PENDING"  # due at next_attempt_at
    DELIVERED = "DELIVERED"  # an attempt succeeded (set once)
    FAILED = "FAILED"  # given up: out of attempts, too old, or its channel was deleted


@dataclass(frozen=True)
class Channel:
    id: str
    name: str
    kind: ChannelKind
    config: Mapping[str, Any]
    created_at: datetime
    tenant_id: str


@dataclass(frozen=True)
class NotificationRule:
    """Exactly one of ``workflow_name`` and ``execution_id`` is set."""

    id: str
    channel_id: str
    statuses: tuple[ExecutionStatus, ...]
    created_at: datetime
    tenant_id: str
    workflow_name: str | None = None
    execution_id: str | None = None

    def matches(self, status: ExecutionStatus) -> bool:
        return status in self.statuses


@dataclass(frozen=True)
class DeliveryAttempt:
    attempt: int
    time: datetime
    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class Delivery:
    id: str
    tenant_id: str
    execution_id: str
    workflow_name: str
    execution_status: ExecutionStatus
    channel_id: str
    rule_id: str
    status: DeliveryStatus
    payload: bytes  # the notification document (JSON)
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    delivered_at: datetime | None = None
    last_error: str | None = None
    # Fencing number of the current claim: a replica whose lease passed cannot reschedule.
    claim_seq: int = 0
    history: tuple[DeliveryAttempt, ...] = ()


@dataclass(frozen=True)
class ClaimedDelivery:
    delivery: Delivery
    channel: Channel | None  # None: the channel was deleted meanwhile


# -- the notification document ---------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def notification_document(execution: Execution) -> dict[str, Any]:
    """What a delivery carries about an execution that ended (stored as its payload)."""
    error = execution.error
    output = execution.output
    doc: dict[str, Any] = {
        "execution_id": execution.id,
        "workflow_name": execution.workflow_name,
        "workflow_version": execution.workflow_version,
        "status": execution.status.value,
        "error": None
        if error is None
        else {
            "type": error.type,
            "message": error.message[:MAX_ERROR_MESSAGE],
            "node_id": error.node_id,
            "attempt": error.attempt,
        },
        "output_size": 0 if output is None else len(output),
        "created_at": _iso(execution.created_at),
        "ended_at": _iso(execution.ended_at or execution.updated_at),
    }
    if output and len(output) <= MAX_INLINE_OUTPUT:
        with contextlib.suppress(ValueError):
            doc["output"] = json.loads(output)
    return doc


def deliveries_for(
    execution: Execution, rules: Sequence[NotificationRule], now: datetime
) -> list[Delivery]:
    """One PENDING delivery, due now, per rule matching the execution's (terminal) status."""
    matching = [r for r in rules if r.matches(execution.status)]
    if not matching:
        return []
    payload = json.dumps(notification_document(execution), separators=(",", ":")).encode()
    return [
        Delivery(
            id=str(uuid.uuid4()),
            tenant_id=execution.tenant_id,
            execution_id=execution.id,
            workflow_name=execution.workflow_name,
            execution_status=execution.status,
            channel_id=rule.channel_id,
            rule_id=rule.id,
            status=DeliveryStatus.PENDING,
            payload=payload,
            attempts=0,
            created_at=now,
            next_attempt_at=now,
        )
        for rule in matching
    ]
