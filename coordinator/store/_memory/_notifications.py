"""``MemoryNotifications``: the ``NotificationRepository`` port in memory — channels, rules,
and the delivery outbox with its attempts.

Deliveries are inserted by the transitions that end executions (``_aggregate``, from
``Transition.deliveries``). The dispatcher claims due ones with a ``claimed_until`` lease
and a ``claim_seq`` fence, as on the SQL store: a claim whose lease lapsed may be taken
over, and then only the current claim reschedules or fails the delivery.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from coordinator import errors
from coordinator.model import (
    Channel,
    ClaimedDelivery,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    NotificationRule,
)
from coordinator.store._memory import _copies
from coordinator.store._memory._state import DeliveryRow, State, newest_first


class MemoryNotifications:
    """The ``NotificationRepository`` port."""

    def __init__(self, state: State) -> None:
        self._state = state

    # -- channels -------------------------------------------------------------------------

    async def create_channel(self, channel: Channel) -> Channel:
        stored = _copies.channel(channel)
        state = self._state
        async with state.write():
            taken = channel.id in state.channels or any(
                c.tenant_id == channel.tenant_id and c.name == channel.name
                for c in state.channels.values()
            )
            if taken:
                raise errors.Conflict(
                    f"a channel named {channel.name!r} already exists; pick another name or "
                    "delete that channel first"
                )
            state.channels.put(channel.id, stored)
        return _copies.channel_copy(stored)

    async def get_channel(self, tenant_id: str, ref: str) -> Channel:
        async with self._state.read():
            found = self._channel(tenant_id, ref)
        if found is None:
            raise errors.NotFound(f"notification channel {ref!r} not found (by id or name)")
        return _copies.channel_copy(found)

    def _channel(self, tenant_id: str, ref: str) -> Channel | None:
        by_id = self._state.channels.get(ref)
        if by_id is not None and by_id.tenant_id == tenant_id:
            return by_id
        for c in self._state.channels.values():
            if c.tenant_id == tenant_id and c.name == ref:
                return c
        return None

    async def list_channels(self, tenant_id: str) -> list[Channel]:
        async with self._state.read():
            found = [c for c in self._state.channels.values() if c.tenant_id == tenant_id]
        return [_copies.channel_copy(c) for c in sorted(found, key=lambda c: c.name)]

    async def delete_channel(self, tenant_id: str, channel_id: str, now: datetime) -> None:
        state = self._state
        at = _copies.ms(now)
        async with state.write():
            found = state.channels.get(channel_id)
            if found is None or found.tenant_id != tenant_id:
                raise errors.NotFound(f"notification channel {channel_id!r} not found")
            # Its rules go with it, and its pending deliveries fail (this tenant's: a
            # channel id belongs to one tenant).
            for rule in state.rules.values():
                if rule.channel_id == channel_id and rule.tenant_id == tenant_id:
                    state.rules.delete(rule.id)
            for row in state.deliveries.values():
                d = row.delivery
                if (
                    d.channel_id == channel_id
                    and d.tenant_id == tenant_id
                    and d.status is DeliveryStatus.PENDING
                ):
                    failed = dataclasses.replace(
                        d, status=DeliveryStatus.FAILED, last_error="its channel was deleted"
                    )
                    state.deliveries.put(d.id, DeliveryRow(failed, updated_at=at))
            state.channels.delete(channel_id)

    # -- rules ----------------------------------------------------------------------------

    async def create_rule(self, rule: NotificationRule) -> NotificationRule:
        stored = _copies.truncated(rule)
        state = self._state
        async with state.write():
            missing = (
                rule.id in state.rules
                or rule.channel_id not in state.channels
                or (rule.execution_id is not None and rule.execution_id not in state.executions)
            )
            if missing:
                # The channel (or execution) was deleted meanwhile.
                raise errors.NotFound(
                    f"notification channel {rule.channel_id!r} or execution no longer exists"
                )
            state.rules.put(rule.id, stored)
        return stored

    async def list_rules(
        self,
        tenant_id: str,
        *,
        channel_id: str | None,
        workflow_name: str | None,
        execution_id: str | None,
    ) -> list[NotificationRule]:
        async with self._state.read():
            found = [
                r
                for r in self._state.rules.values()
                if r.tenant_id == tenant_id
                and (channel_id is None or r.channel_id == channel_id)
                and (workflow_name is None or r.workflow_name == workflow_name)
                and (execution_id is None or r.execution_id == execution_id)
            ]
        return sorted(found, key=lambda r: (r.created_at, r.id))

    async def delete_rule(self, tenant_id: str, rule_id: str) -> None:
        async with self._state.write():
            found = self._state.rules.get(rule_id)
            if found is None or found.tenant_id != tenant_id:
                raise errors.NotFound(f"notification rule {rule_id!r} not found")
            self._state.rules.delete(rule_id)

    # -- deliveries -----------------------------------------------------------------------

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
        async with self._state.read():
            found = [
                d
                for row in self._state.deliveries.values()
                if (d := row.delivery).tenant_id == tenant_id
                and (execution_id is None or d.execution_id == execution_id)
                and (channel_id is None or d.channel_id == channel_id)
                and (status is None or d.status is status)
            ]
        return newest_first(found, before, limit)

    async def claim_deliveries(
        self, now: datetime, limit: int, lease: timedelta
    ) -> list[ClaimedDelivery]:
        at = _copies.ms(now)
        until = _copies.add_ms(at, timedelta(milliseconds=int(lease.total_seconds() * 1000)))
        state = self._state
        async with state.write():
            due = [
                row
                for row in state.deliveries.values()
                if row.delivery.status is DeliveryStatus.PENDING
                and row.delivery.next_attempt_at <= at
                and (row.claimed_until is None or row.claimed_until < at)
            ]
            due.sort(key=lambda r: (r.delivery.next_attempt_at, r.delivery.id))
            claimed: list[ClaimedDelivery] = []
            for row in due[:limit]:
                d = dataclasses.replace(row.delivery, claim_seq=row.delivery.claim_seq + 1)
                state.deliveries.put(d.id, DeliveryRow(d, updated_at=at, claimed_until=until))
                channel = state.channels.get(d.channel_id)
                claimed.append(
                    ClaimedDelivery(
                        # As the SQL store's claim returns it: without its attempts.
                        dataclasses.replace(d, history=()),
                        None if channel is None else _copies.channel_copy(channel),
                    )
                )
        return claimed

    async def defer_delivery(
        self, delivery_id: str, claim_seq: int, until: datetime, now: datetime
    ) -> None:
        state = self._state
        async with state.write():
            row = state.deliveries.get(delivery_id)
            if (
                row is not None
                and row.delivery.status is DeliveryStatus.PENDING
                and row.delivery.claim_seq == claim_seq
            ):
                d = dataclasses.replace(row.delivery, next_attempt_at=_copies.ms(until))
                state.deliveries.put(delivery_id, DeliveryRow(d, updated_at=_copies.ms(now)))

    async def record_attempt(
        self,
        delivery_id: str,
        claim_seq: int,
        attempt: DeliveryAttempt,
        *,
        retry_at: datetime | None,
    ) -> int:
        state = self._state
        at = _copies.ms(attempt.time)
        async with state.write():
            row = state.deliveries.get(delivery_id)
            if row is None:
                raise errors.NotFound(f"notification delivery {delivery_id!r} not found")
            d = row.delivery
            # Numbered from the row, so a lapsed claim and the one that took it over get
            # distinct numbers.
            number = d.attempts + 1
            recorded = DeliveryAttempt(number, at, attempt.ok, attempt.error)
            d = dataclasses.replace(
                d,
                attempts=number,
                last_error=d.last_error if attempt.ok else attempt.error,
                history=(*d.history, recorded),
            )
            claimed_until = row.claimed_until
            if attempt.ok:
                if d.status is DeliveryStatus.PENDING:
                    # Marked delivered once, whoever sent it.
                    d = dataclasses.replace(d, status=DeliveryStatus.DELIVERED, delivered_at=at)
                    claimed_until = None
            elif d.status is DeliveryStatus.PENDING and d.claim_seq == claim_seq:
                # Only the current claim reschedules (a lapsed one lost the delivery).
                claimed_until = None
                if retry_at is None:
                    d = dataclasses.replace(d, status=DeliveryStatus.FAILED)
                else:
                    d = dataclasses.replace(d, next_attempt_at=_copies.ms(retry_at))
            state.deliveries.put(delivery_id, DeliveryRow(d, at, claimed_until))
        return number
