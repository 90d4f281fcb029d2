"""Notifications: channels, rules, and the durable outbox of deliveries.

- A **channel** is where notifications go (a webhook, an SMTP server, an SMS provider).
- A **rule** attaches a channel to a workflow (by name, every version) or to one execution,
  for some terminal statuses.
- When a transition makes an execution terminal, the store inserts one **delivery** per
  matching rule in the same database transaction (``notification_document`` is its
  payload). The ``NotificationDispatcher`` on every replica claims due deliveries, sends
  them and records every attempt; failures are retried with backoff, a channel that keeps
  failing is paused by its circuit breaker.

This module imports neither grpc nor SQLAlchemy; the store implements
``NotificationStore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound
from coordinator.model import Execution, ExecutionStatus
from coordinator.notify import Backoff, ChannelBreakers, ChannelKind, validate_channel

log = logging.getLogger(__name__)

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
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


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


@runtime_checkable
class NotificationStore(Protocol):
    """What notifications need from the store (``SqlStore`` implements it)."""

    async def create_channel(self, channel: Channel) -> Channel:
        """Raises ``Conflict`` when the tenant has a channel of that name."""
        ...

    async def get_channel(self, tenant_id: str, ref: str) -> Channel:
        """By id or name. Raises ``NotFound``."""
        ...

    async def list_channels(self, tenant_id: str) -> list[Channel]: ...

    async def delete_channel(self, tenant_id: str, channel_id: str, now: datetime) -> None:
        """Delete the channel and its rules; its pending deliveries become FAILED."""
        ...

    async def create_rule(self, rule: NotificationRule) -> NotificationRule: ...

    async def list_rules(
        self,
        tenant_id: str,
        *,
        channel_id: str | None,
        workflow_name: str | None,
        execution_id: str | None,
    ) -> list[NotificationRule]: ...

    async def delete_rule(self, tenant_id: str, rule_id: str) -> None:
        """Raises ``NotFound``."""
        ...

    async def list_deliveries(
        self,
        tenant_id: str,
        *,
        execution_id: str | None,
        channel_id: str | None,
        status: DeliveryStatus | None,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[Delivery]:
        """Newest first (created_at, id descending), each with its attempts."""
        ...

    async def claim_deliveries(
        self, now: datetime, limit: int, lease: timedelta
    ) -> list[ClaimedDelivery]:
        """Claim up to ``limit`` PENDING deliveries (any tenant) due at ``now`` and not
        claimed by a live lease: ``claimed_until = now + lease``, ``claim_seq + 1``."""
        ...

    async def defer_delivery(
        self, delivery_id: str, claim_seq: int, until: datetime, now: datetime
    ) -> None:
        """Release a claim without an attempt: due again at ``until``."""
        ...

    async def record_attempt(
        self,
        delivery_id: str,
        claim_seq: int,
        attempt: DeliveryAttempt,
        *,
        retry_at: datetime | None,
    ) -> int:
        """Record one attempt (numbered from the row's count) and settle the delivery:
        DELIVERED once when ``attempt.ok`` (only from PENDING); otherwise PENDING again at
        ``retry_at``, or FAILED when ``retry_at`` is None — both only while ``claim_seq``
        is still the row's. Returns the attempt's number."""
        ...


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


# -- use cases -------------------------------------------------------------------------------


class _Executions(Protocol):
    async def get_execution(self, tenant_id: str, execution_id: str) -> Execution: ...


class _Workflows(Protocol):
    async def list_workflow_versions(self, tenant_id: str, name: str) -> Sequence[object]: ...


class NotificationService:
    """Channels, rules and the deliveries' history, for the gRPC servicer."""

    def __init__(
        self,
        store: NotificationStore,
        executions: _Executions,
        workflows: _Workflows,
        *,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self._executions = executions
        self._workflows = workflows
        self._clock = clock

    async def create_channel(
        self, tenant_id: str, name: str, kind: ChannelKind, config: Mapping[str, Any]
    ) -> Channel:
        if not _NAME.match(name):
            raise InvalidArgument(
                f"name: {name!r} is not a channel name; use 1-100 letters, digits, '_', '.' "
                "or '-', starting with a letter or digit"
            )
        channel = Channel(
            id=str(uuid.uuid4()),
            name=name,
            kind=kind,
            config=validate_channel(kind, config),
            created_at=self._clock(),
            tenant_id=tenant_id,
        )
        return await self.store.create_channel(channel)

    async def get_channel(self, tenant_id: str, ref: str) -> Channel:
        if not ref:
            raise InvalidArgument("channel: give a channel id or name")
        return await self.store.get_channel(tenant_id, ref)

    async def list_channels(self, tenant_id: str) -> list[Channel]:
        return await self.store.list_channels(tenant_id)

    async def delete_channel(self, tenant_id: str, ref: str) -> None:
        channel = await self.get_channel(tenant_id, ref)
        await self.store.delete_channel(tenant_id, channel.id, self._clock())

    async def create_rule(
        self,
        tenant_id: str,
        channel_ref: str,
        *,
        workflow_name: str | None,
        execution_id: str | None,
        statuses: Sequence[ExecutionStatus],
    ) -> NotificationRule:
        if bool(workflow_name) == bool(execution_id):
            raise InvalidArgument(
                "target: give exactly one of workflow_name (every version of a workflow) "
                "and execution_id (one execution)"
            )
        wrong = [s.value for s in statuses if s not in TERMINAL_STATUSES]
        if wrong:
            raise InvalidArgument(
                f"statuses: {', '.join(wrong)} is not a final status; use "
                f"{', '.join(s.value for s in TERMINAL_STATUSES)}"
            )
        chosen = tuple(s for s in TERMINAL_STATUSES if s in statuses) or TERMINAL_STATUSES
        channel = await self.get_channel(tenant_id, channel_ref)
        if workflow_name:
            if not await self._workflows.list_workflow_versions(tenant_id, workflow_name):
                raise NotFound(
                    f"workflow {workflow_name!r} not found; register it before attaching "
                    "notifications to it"
                )
        elif execution_id:
            execution = await self._executions.get_execution(tenant_id, execution_id)
            if execution.status.terminal:
                raise FailedPrecondition(
                    f"execution {execution_id!r} already ended {execution.status.value}; "
                    "a rule on it would never fire"
                )
        rule = NotificationRule(
            id=str(uuid.uuid4()),
            channel_id=channel.id,
            statuses=chosen,
            created_at=self._clock(),
            tenant_id=tenant_id,
            workflow_name=workflow_name or None,
            execution_id=execution_id or None,
        )
        return await self.store.create_rule(rule)

    async def list_rules(
        self,
        tenant_id: str,
        *,
        channel_ref: str | None,
        workflow_name: str | None,
        execution_id: str | None,
    ) -> list[NotificationRule]:
        channel_id = None
        if channel_ref:
            channel_id = (await self.get_channel(tenant_id, channel_ref)).id
        return await self.store.list_rules(
            tenant_id,
            channel_id=channel_id,
            workflow_name=workflow_name,
            execution_id=execution_id,
        )

    async def delete_rule(self, tenant_id: str, rule_id: str) -> None:
        if not rule_id:
            raise InvalidArgument("id: give the rule's id")
        await self.store.delete_rule(tenant_id, rule_id)

    async def list_deliveries(
        self,
        tenant_id: str,
        *,
        execution_id: str | None,
        channel_ref: str | None,
        status: DeliveryStatus | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Delivery], str]:
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        limit = min(page_size or 100, 1000)
        channel_id = None
        if channel_ref:
            channel_id = (await self.get_channel(tenant_id, channel_ref)).id
        rows = await self.store.list_deliveries(
            tenant_id,
            execution_id=execution_id,
            channel_id=channel_id,
            status=status,
            limit=limit + 1,
            before=_decode_cursor(page_token) if page_token else None,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        token = f"{int(rows[-1].created_at.timestamp() * 1000)}:{rows[-1].id}" if more else ""
        return rows, token


def _decode_cursor(token: str) -> tuple[datetime, str]:
    try:
        ms, _, ident = token.partition(":")
        return datetime.fromtimestamp(int(ms) / 1000, UTC), ident
    except ValueError as exc:
        raise InvalidArgument("page_token is malformed; pass next_page_token unchanged") from exc


# -- the delivery loop -----------------------------------------------------------------------


class Sender(Protocol):
    async def send(
        self,
        kind: ChannelKind,
        config: Mapping[str, Any],
        delivery_id: str,
        notification: Mapping[str, Any],
    ) -> None:
        """Return once delivered; raise (``DeliveryError``) otherwise."""
        ...


@dataclass(frozen=True)
class DeliverySettings:
    poll_interval: timedelta = timedelta(seconds=1)
    max_attempts: int = 10
    max_age: timedelta = timedelta(hours=24)
    backoff: Backoff = field(default_factory=Backoff)
    breaker_threshold: int = 5
    breaker_reset: timedelta = timedelta(seconds=30)
    send_timeout: timedelta = timedelta(seconds=10)
    batch: int = 20

    @property
    def lease(self) -> timedelta:
        """How long a claim holds a delivery: past it, another replica may take it."""
        return self.send_timeout * 3 + timedelta(seconds=5)


class NotificationDispatcher:
    """Sends due deliveries. Runs on every replica at once: claims are exclusive (SKIP
    LOCKED on PostgreSQL, the single writer on SQLite) and leased, so a crashed replica's
    claims come back after ``settings.lease``."""

    def __init__(
        self,
        store: NotificationStore,
        sender: Sender,
        settings: DeliverySettings | None = None,
        *,
        clock: Callable[[], datetime],
        breakers: ChannelBreakers | None = None,
    ) -> None:
        self._store = store
        self._sender = sender
        self.settings = settings or DeliverySettings()
        self._clock = clock
        self.breakers = breakers or ChannelBreakers(
            self.settings.breaker_threshold, self.settings.breaker_reset
        )

    async def run(self) -> None:
        """Deliver until cancelled; a full batch is followed at once by the next."""
        while True:
            try:
                handled = await self.run_once()
            except Exception as exc:
                log.warning("notification delivery pass failed: %s", exc)
                handled = 0
            if handled < self.settings.batch:
                await asyncio.sleep(self.settings.poll_interval.total_seconds())

    async def run_once(self) -> int:
        """Claim due deliveries and handle each; returns how many were claimed."""
        s = self.settings
        claimed = await self._store.claim_deliveries(self._clock(), s.batch, s.lease)
        if claimed:
            await asyncio.gather(*(self._handle(c) for c in claimed))
        return len(claimed)

    async def _handle(self, claimed: ClaimedDelivery) -> None:
        delivery, channel = claimed.delivery, claimed.channel
        try:
            if channel is None:
                await self._record(delivery, False, "its channel was deleted", give_up=True)
                return
            until = self.breakers.admit(channel.id)
            if until is not None:
                await self._store.defer_delivery(
                    delivery.id, delivery.claim_seq, until, self._clock()
                )
                return
            error = None
            try:
                notification = json.loads(delivery.payload)
                async with asyncio.timeout(self.settings.send_timeout.total_seconds()):
                    await self._sender.send(channel.kind, channel.config, delivery.id, notification)
            except TimeoutError:
                error = f"no answer within {self.settings.send_timeout.total_seconds():g}s"
            except Exception as exc:
                error = str(exc) or type(exc).__name__
            finally:
                self.breakers.record(channel.id, error is None)
            await self._record(delivery, error is None, error, give_up=False)
        except Exception:
            # The claim lapses and the delivery comes back: nothing is lost.
            log.exception("could not settle a notification delivery", extra={"id": delivery.id})

    async def _record(
        self, delivery: Delivery, ok: bool, error: str | None, *, give_up: bool
    ) -> None:
        now = self._clock()
        number = delivery.attempts + 1
        retry_at: datetime | None = None
        if not ok and not give_up:
            retry_at = now + self.settings.backoff.delay(number)
            if (
                number >= self.settings.max_attempts
                or retry_at - delivery.created_at > self.settings.max_age
            ):
                retry_at = None
        attempt = DeliveryAttempt(attempt=number, time=now, ok=ok, error=error)
        recorded = await self._store.record_attempt(
            delivery.id, delivery.claim_seq, attempt, retry_at=retry_at
        )
        extra = {
            "delivery_id": delivery.id,
            "execution_id": delivery.execution_id,
            "channel_id": delivery.channel_id,
            "attempt": recorded,
        }
        if ok:
            log.info("notification delivered", extra=extra)
        elif retry_at is None:
            log.warning("notification delivery failed for good: %s", error, extra=extra)
        else:
            log.info("notification attempt failed, will retry: %s", error, extra=extra)
