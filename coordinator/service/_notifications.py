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
``NotificationRepository``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound, TrellisError
from coordinator.model import (
    TERMINAL_STATUSES,
    Channel,
    ChannelKind,
    ClaimedDelivery,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Execution,
    ExecutionStatus,
    NotificationRule,
)
from coordinator.notify import (
    Backoff,
    ChannelBreakers,
    DestinationRefused,
    Destinations,
    validate_channel,
)
from coordinator.service._common import clamp_page_size, decode_cursor, page_of
from coordinator.service._rules import RuleBook, rules_key
from coordinator.service.ports import NotificationRepository, WakeupChannel

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

# -- use cases -------------------------------------------------------------------------------


class _Executions(Protocol):
    async def get_execution(self, tenant_id: str, execution_id: str) -> Execution: ...


class _Workflows(Protocol):
    async def list_workflow_versions(self, tenant_id: str, name: str) -> Sequence[object]: ...


class NotificationService:
    """Channels, rules and the deliveries' history, for the gRPC servicer."""

    def __init__(
        self,
        store: NotificationRepository,
        executions: _Executions,
        workflows: _Workflows,
        *,
        clock: Callable[[], datetime],
        rules: RuleBook | None = None,
        wakeups: WakeupChannel | None = None,
        destinations: Destinations | None = None,
    ) -> None:
        self.store = store
        self._executions = executions
        self._workflows = workflows
        self._clock = clock
        self._rules = rules
        self._wakeups = wakeups
        self._destinations = destinations or Destinations()

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
            config=validate_channel(kind, config, self._destinations),
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
        await self._rules_changed(tenant_id)

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
        created = await self.store.create_rule(rule)
        await self._rules_changed(tenant_id)
        return created

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
        await self._rules_changed(tenant_id)

    async def _rules_changed(self, tenant_id: str) -> None:
        """Executions ending from now on see the change: here at once, on other replicas
        when the wake-up arrives (or the rule book's time to live passes)."""
        if self._rules is not None:
            self._rules.invalidate(tenant_id)
        if self._wakeups is not None:
            try:
                await self._wakeups.publish_wakeups([rules_key(tenant_id)])
            except TrellisError as exc:
                log.warning("could not tell other replicas that rules changed: %s", exc)

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
        limit = clamp_page_size(page_size)
        channel_id = None
        if channel_ref:
            channel_id = (await self.get_channel(tenant_id, channel_ref)).id
        rows = await self.store.list_deliveries(
            tenant_id,
            execution_id=execution_id,
            channel_id=channel_id,
            status=status,
            limit=limit + 1,
            before=decode_cursor(page_token) if page_token else None,
        )
        return page_of(rows, limit)


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
        store: NotificationRepository,
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
            refused = False
            try:
                notification = json.loads(delivery.payload)
                async with asyncio.timeout(self.settings.send_timeout.total_seconds()):
                    await self._sender.send(channel.kind, channel.config, delivery.id, notification)
            except TimeoutError:
                error = f"no answer within {self.settings.send_timeout.total_seconds():g}s"
            except DestinationRefused as exc:
                # Nothing was sent and waiting will not change it (only the operator's
                # allow settings can): fail at once, and leave the breaker alone, which
                # protects endpoints that answer badly.
                error, refused = str(exc), True
            except Exception as exc:
                error = str(exc) or type(exc).__name__
            finally:
                if refused:
                    self.breakers.release(channel.id)
                else:
                    self.breakers.record(channel.id, error is None)
            await self._record(delivery, error is None, error, give_up=refused)
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
