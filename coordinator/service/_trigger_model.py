"""Triggers as data (webhook, event, schedule) and the store seam they need.

``TriggerStore`` is implemented by ``coordinator.store.SqlStore`` (through its triggers
mixin); the use cases in ``_triggers.py`` and ``_schedules.py`` talk to it only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, TypeVar, runtime_checkable

from coordinator.model import DEFAULT_TENANT, Execution, Transition

T = TypeVar("T")


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


@runtime_checkable
class TriggerStore(Protocol):
    """Persistent triggers. Every method is tenant-scoped except the scheduler's claims."""

    # -- webhooks
    async def create_webhook_trigger(self, trigger: WebhookTrigger) -> None:
        """Raises ``AlreadyExists`` when the path is taken."""
        ...

    async def get_webhook_trigger(self, tenant_id: str, path: str) -> WebhookTrigger:
        """Raises ``NotFound``."""
        ...

    async def list_webhook_triggers(self, tenant_id: str) -> list[WebhookTrigger]: ...

    async def delete_webhook_trigger(self, tenant_id: str, path: str) -> None:
        """Raises ``NotFound``."""
        ...

    # -- events
    async def create_event_trigger(self, trigger: EventTrigger) -> None: ...

    async def list_event_triggers(
        self, tenant_id: str, event_name: str | None
    ) -> list[EventTrigger]: ...

    async def delete_event_trigger(self, tenant_id: str, trigger_id: str) -> None:
        """Raises ``NotFound``."""
        ...

    # -- schedules
    async def create_schedule(self, schedule: Schedule) -> None:
        """Raises ``AlreadyExists`` when the id is taken."""
        ...

    async def get_schedule(self, tenant_id: str, schedule_id: str) -> Schedule:
        """Raises ``NotFound``."""
        ...

    async def list_schedules(self, tenant_id: str) -> list[Schedule]: ...

    async def update_schedule(
        self, tenant_id: str, schedule_id: str, change: Callable[[Schedule], Schedule]
    ) -> Schedule:
        """Lock the schedule, apply ``change`` (pure) and store the result. ``NotFound``."""
        ...

    async def delete_schedule(self, tenant_id: str, schedule_id: str) -> None:
        """Deletes its fire records too. Raises ``NotFound``."""
        ...

    async def list_schedule_fires(
        self, tenant_id: str, schedule_id: str, limit: int
    ) -> list[ScheduleFire]:
        """Newest fire time first."""
        ...

    async def find_due_schedules(self, now: datetime, limit: int) -> list[Schedule]:
        """Unpaused schedules (any tenant) with ``next_fire_at <= now`` or a buffered fire."""
        ...

    async def next_schedule_fire_at(self) -> datetime | None:
        """The earliest ``next_fire_at`` of any unpaused schedule."""
        ...

    async def has_buffered_fires(self) -> bool: ...

    async def fire_schedule(
        self,
        tenant_id: str,
        schedule_id: str,
        decide: Callable[[Schedule, Execution | None], FiringResult | None],
    ) -> FiringResult | None:
        """In one transaction: lock the schedule row (skipping it when another replica holds
        it: returns None), load its last execution, call ``decide`` (pure; None: nothing
        to do), then insert the executions of ``starts`` (one whose idempotency key exists
        is not inserted again), upsert ``fires`` and store ``schedule``."""
        ...


__all__: Sequence[str] = (
    "DEFAULT_MAX_CATCHUP",
    "DEFAULT_SIGNATURE_TOLERANCE",
    "CatchupPolicy",
    "EventTrigger",
    "FireOutcome",
    "FiringResult",
    "OverlapPolicy",
    "Schedule",
    "ScheduleFire",
    "TriggerStore",
    "WebhookAuth",
    "WebhookTrigger",
)
