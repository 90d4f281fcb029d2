"""Triggers as data: webhook and event triggers, cron schedules and their fires."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from coordinator.model._core import DEFAULT_TENANT, Transition


class WebhookAuth(enum.StrEnum):
    HMAC_SHA256 = "HMAC_SHA256"
    BEARER = "BEARER"


class OverlapPolicy(enum.StrEnum):
    SKIP = "SKIP"
    ALLOW = "ALLOW"
    BUFFER_ONE = "BUFFER_ONE"


class CatchupPolicy(enum.StrEnum):
    SKIP_MISSED = "SKIP_MISSED"
    RUN_ONCE = "RUN_ONCE"
    RUN_ALL = "RUN_ALL"


class FireOutcome(enum.StrEnum):
    STARTED = "STARTED"
    SKIPPED = "SKIPPED"
    BUFFERED = "BUFFERED"


DEFAULT_SIGNATURE_TOLERANCE = timedelta(seconds=300)
DEFAULT_MAX_CATCHUP = 100


@dataclass(frozen=True)
class WebhookTrigger:
    """``secret`` is the HMAC key, or the SHA-256 hex digest of the bearer token."""

    path: str
    workflow_name: str
    workflow_version: int  # 0 = latest
    auth: WebhookAuth
    secret: str
    created_at: datetime
    signature_tolerance: timedelta = DEFAULT_SIGNATURE_TOLERANCE
    idempotency_expr: str = ""
    input_expr: str = ""
    tenant_id: str = DEFAULT_TENANT


@dataclass(frozen=True)
class EventTrigger:
    id: str
    event_name: str
    workflow_name: str
    workflow_version: int  # 0 = latest
    created_at: datetime
    filter_expr: str = ""
    input_expr: str = ""
    tenant_id: str = DEFAULT_TENANT


@dataclass(frozen=True)
class Schedule:
    id: str
    cron: str
    timezone: str
    workflow_name: str
    workflow_version: int  # 0 = latest
    input: bytes
    overlap: OverlapPolicy
    catchup: CatchupPolicy
    max_catchup: int
    created_at: datetime
    updated_at: datetime
    paused: bool = False
    # None while paused.
    next_fire_at: datetime | None = None
    last_fire_at: datetime | None = None
    last_execution_id: str | None = None
    # BUFFER_ONE: the fire time waiting for the running execution to end.
    buffered_fire_at: datetime | None = None
    started_fires: int = 0
    skipped_fires: int = 0
    missed_fires: int = 0
    tenant_id: str = DEFAULT_TENANT


@dataclass(frozen=True)
class ScheduleFire:
    schedule_id: str
    fire_at: datetime
    outcome: FireOutcome
    recorded_at: datetime
    execution_id: str | None = None
    tenant_id: str = DEFAULT_TENANT


@dataclass(frozen=True)
class FiringResult:
    """What one scheduler step over one schedule persists, in one transaction: the
    executions to start (each with its idempotency key ``schedule:<id>:<fire time>``),
    the fires to record (or update: a buffered fire that now started), and the schedule
    as it is afterwards."""

    schedule: Schedule
    starts: tuple[Transition, ...] = ()
    fires: tuple[ScheduleFire, ...] = ()
