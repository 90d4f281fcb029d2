"""Notifications in the store: channels, rules, the delivery outbox and its attempts.

- ``SqlNotifications`` is the ``NotificationRepository`` port. Rows of the notification
  tables become domain objects here (and back), the only module that reads or writes them.
- ``insert_deliveries`` runs inside a transition's transaction: it inserts the deliveries
  the service decided for an execution that the transition ends (``Transition.deliveries``),
  so a notification exists exactly when the terminal state was committed.
- The dispatcher claims due deliveries with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (the
  single writer on SQLite) and a ``claimed_until`` lease, so several replicas share the
  outbox and a crashed replica's claims come back once their lease has passed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator import errors
from coordinator.model import (
    Channel,
    ChannelKind,
    ClaimedDelivery,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    ExecutionStatus,
    NotificationRule,
)
from coordinator.store._db import Database
from coordinator.store._rows import from_ms, opt_from_ms, to_ms
from coordinator.store._tables import (
    notification_attempts,
    notification_channels,
    notification_deliveries,
    notification_rules,
)

log = logging.getLogger(__name__)

# The dispatcher's scan spells the status as this literal so the planners match the
# partial index ix_notification_deliveries_due.
_PENDING: sa.ColumnClause[str] = sa.literal_column("'PENDING'", sa.Text)

# -- rows ------------------------------------------------------------------------------------


def _channel_values(db: Database, channel: Channel) -> dict[str, Any]:
    # The whole settings document is sealed: secrets, tokens, header values, recipients.
    config = json.dumps(dict(channel.config), sort_keys=True)
    return {
        "id": channel.id,
        "tenant_id": channel.tenant_id,
        "name": channel.name,
        "kind": channel.kind.value,
        "config": db.seal(config, channel.tenant_id, "notification_channels", channel.id, "config"),
        "created_at": to_ms(channel.created_at),
    }


def _channel_from_row(db: Database, row: Any) -> Channel:
    config = db.unseal(
        row["config"], row["tenant_id"], "notification_channels", row["id"], "config"
    )
    return Channel(
        id=row["id"],
        name=row["name"],
        kind=ChannelKind(row["kind"]),
        config=json.loads(config),
        created_at=from_ms(row["created_at"]),
        tenant_id=row["tenant_id"],
    )


def _rule_values(rule: NotificationRule) -> dict[str, Any]:
    return {
        "id": rule.id,
        "tenant_id": rule.tenant_id,
        "channel_id": rule.channel_id,
        "workflow_name": rule.workflow_name,
        "execution_id": rule.execution_id,
        "statuses": json.dumps([s.value for s in rule.statuses]),
        "created_at": to_ms(rule.created_at),
    }


def _rule_from_row(row: Any) -> NotificationRule:
    return NotificationRule(
        id=row["id"],
        channel_id=row["channel_id"],
        statuses=tuple(ExecutionStatus(s) for s in json.loads(row["statuses"])),
        created_at=from_ms(row["created_at"]),
        tenant_id=row["tenant_id"],
        workflow_name=row["workflow_name"],
        execution_id=row["execution_id"],
    )


def _delivery_values(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "tenant_id": d.tenant_id,
        "execution_id": d.execution_id,
        "workflow_name": d.workflow_name,
        "execution_status": d.execution_status.value,
        "channel_id": d.channel_id,
        "rule_id": d.rule_id,
        "status": d.status.value,
        "payload": d.payload,
        "attempts": d.attempts,
        "created_at": to_ms(d.created_at),
        "updated_at": to_ms(d.created_at),
        "next_attempt_at": to_ms(d.next_attempt_at),
        "claimed_until": None,
        "claim_seq": d.claim_seq,
        "delivered_at": None,
        "last_error": d.last_error,
    }


def _delivery_from_row(row: Any, history: Sequence[DeliveryAttempt] = ()) -> Delivery:
    return Delivery(
        id=row["id"],
        tenant_id=row["tenant_id"],
        execution_id=row["execution_id"],
        workflow_name=row["workflow_name"],
        execution_status=ExecutionStatus(row["execution_status"]),
        channel_id=row["channel_id"],
        rule_id=row["rule_id"],
        status=DeliveryStatus(row["status"]),
        payload=bytes(row["payload"]),
        attempts=row["attempts"],
        created_at=from_ms(row["created_at"]),
        next_attempt_at=from_ms(row["next_attempt_at"]),
        delivered_at=opt_from_ms(row["delivered_at"]),
        last_error=row["last_error"],
        claim_seq=row["claim_seq"],
        history=tuple(history),
    )


def _attempt_from_row(row: Any) -> DeliveryAttempt:
    return DeliveryAttempt(
        attempt=row["attempt"], time=from_ms(row["time"]), ok=bool(row["ok"]), error=row["error"]
    )


# -- inside a transition ---------------------------------------------------------------------


async def insert_deliveries(conn: AsyncConnection, deliveries: Sequence[Delivery]) -> None:
    """Insert the deliveries a transition carries (``Transition.deliveries``: decided by the
    service when the transition ends an execution), in the transition's transaction. Never
    fails the transition: a problem here is logged and it commits without them."""
    if not deliveries:
        return
    try:
        async with conn.begin_nested():
            await conn.execute(
                sa.insert(notification_deliveries), [_delivery_values(d) for d in deliveries]
            )
    except sa_exc.OperationalError:
        raise  # the connection itself failed: the transition cannot commit anyway
    except Exception:
        log.exception(
            "could not queue the notifications of an execution; it goes on without them",
            extra={"execution_id": deliveries[0].execution_id},
        )


# -- the repository --------------------------------------------------------------------------


class SqlNotifications:
    """The ``NotificationRepository`` port."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- channels ------------------------------------------------------------------------

    async def create_channel(self, channel: Channel) -> Channel:
        values = _channel_values(self._db, channel)
        try:
            async with self._db.tx(write=True) as conn:
                await conn.execute(sa.insert(notification_channels).values(values))
        except sa_exc.IntegrityError as exc:
            raise errors.Conflict(
                f"a channel named {channel.name!r} already exists; pick another name or "
                "delete that channel first"
            ) from exc
        return _channel_from_row(self._db, values)

    async def get_channel(self, tenant_id: str, ref: str) -> Channel:
        c = notification_channels
        query = sa.select(c).where(
            c.c.tenant_id == tenant_id, sa.or_(c.c.id == ref, c.c.name == ref)
        )
        async with self._db.tx(write=False) as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise errors.NotFound(f"notification channel {ref!r} not found (by id or name)")
        return _channel_from_row(self._db, row)

    async def list_channels(self, tenant_id: str) -> list[Channel]:
        c = notification_channels
        query = sa.select(c).where(c.c.tenant_id == tenant_id).order_by(c.c.name)
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_channel_from_row(self._db, r) for r in rows]

    async def delete_channel(self, tenant_id: str, channel_id: str, now: datetime) -> None:
        c, r, d = notification_channels, notification_rules, notification_deliveries
        async with self._db.tx(write=True) as conn:
            await conn.execute(
                sa.delete(r).where(r.c.tenant_id == tenant_id, r.c.channel_id == channel_id)
            )
            await conn.execute(
                sa.update(d)
                .where(
                    d.c.tenant_id == tenant_id,
                    d.c.channel_id == channel_id,
                    d.c.status == _PENDING,
                )
                .values(
                    status=DeliveryStatus.FAILED.value,
                    last_error="its channel was deleted",
                    claimed_until=None,
                    updated_at=to_ms(now),
                )
            )
            result = await conn.execute(
                sa.delete(c).where(c.c.tenant_id == tenant_id, c.c.id == channel_id)
            )
            if result.rowcount != 1:
                raise errors.NotFound(f"notification channel {channel_id!r} not found")

    # -- rules ---------------------------------------------------------------------------

    async def create_rule(self, rule: NotificationRule) -> NotificationRule:
        values = _rule_values(rule)
        try:
            async with self._db.tx(write=True) as conn:
                await conn.execute(sa.insert(notification_rules).values(values))
        except sa_exc.IntegrityError as exc:
            # The channel (or execution) was deleted meanwhile.
            raise errors.NotFound(
                f"notification channel {rule.channel_id!r} or execution no longer exists"
            ) from exc
        return _rule_from_row(values)

    async def list_rules(
        self,
        tenant_id: str,
        *,
        channel_id: str | None,
        workflow_name: str | None,
        execution_id: str | None,
    ) -> list[NotificationRule]:
        r = notification_rules
        query = sa.select(r).where(r.c.tenant_id == tenant_id).order_by(r.c.created_at, r.c.id)
        if channel_id is not None:
            query = query.where(r.c.channel_id == channel_id)
        if workflow_name is not None:
            query = query.where(r.c.workflow_name == workflow_name)
        if execution_id is not None:
            query = query.where(r.c.execution_id == execution_id)
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rule_from_row(row) for row in rows]

    async def delete_rule(self, tenant_id: str, rule_id: str) -> None:
        r = notification_rules
        async with self._db.tx(write=True) as conn:
            result = await conn.execute(
                sa.delete(r).where(r.c.tenant_id == tenant_id, r.c.id == rule_id)
            )
            if result.rowcount != 1:
                raise errors.NotFound(f"notification rule {rule_id!r} not found")

    # -- deliveries ----------------------------------------------------------------------

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
        d, a = notification_deliveries, notification_attempts
        query = (
            sa.select(d)
            .where(d.c.tenant_id == tenant_id)
            .order_by(d.c.created_at.desc(), d.c.id.desc())
            .limit(limit)
        )
        if execution_id is not None:
            query = query.where(d.c.execution_id == execution_id)
        if channel_id is not None:
            query = query.where(d.c.channel_id == channel_id)
        if status is not None:
            query = query.where(d.c.status == status.value)
        if before is not None:
            at, last_id = to_ms(before[0]), before[1]
            query = query.where(sa.tuple_(d.c.created_at, d.c.id) < sa.tuple_(at, last_id))
        # The page and its attempts in one statement, so in one snapshot: two reads in a READ
        # COMMITTED transaction (PostgreSQL) could see an attempt committed between them
        # without the delivery state it set (its count, last_error, status).
        page = query.subquery("page")
        query = (
            sa.select(page, a.c.attempt, a.c.time, a.c.ok, a.c.error)
            .select_from(page.outerjoin(a, a.c.delivery_id == page.c.id))
            .order_by(page.c.created_at.desc(), page.c.id.desc(), a.c.attempt)
        )
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        listed: dict[str, tuple[Any, list[DeliveryAttempt]]] = {}
        for row in rows:
            _, history = listed.setdefault(row["id"], (row, []))
            if row["attempt"] is not None:
                history.append(_attempt_from_row(row))
        return [_delivery_from_row(row, history) for row, history in listed.values()]

    async def claim_deliveries(
        self, now: datetime, limit: int, lease: timedelta
    ) -> list[ClaimedDelivery]:
        d, c = notification_deliveries, notification_channels
        now_ms = to_ms(now)
        due = sa.and_(
            d.c.status == _PENDING,
            d.c.next_attempt_at <= now_ms,
            sa.or_(d.c.claimed_until.is_(None), d.c.claimed_until < now_ms),
        )
        # A read first: the usual answer is "nothing due", found without a write.
        async with self._db.tx(write=False) as conn:
            if await conn.scalar(sa.select(sa.literal(1)).where(due).limit(1)) is None:
                return []
        picked = (
            sa.select(d.c.id)
            .where(due)
            .order_by(d.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("picked")
        )
        if self._db.postgres:
            # Run once: as a subquery joined to the UPDATE the planner may rescan the pick
            # per outer row, and each rescan locks (and claims) further rows past ``limit``.
            picked = picked.prefix_with("MATERIALIZED")
        claim = (
            sa.update(d)
            .where(d.c.id == picked.c.id)
            .values(
                claimed_until=now_ms + int(lease.total_seconds() * 1000),
                claim_seq=d.c.claim_seq + 1,
                updated_at=now_ms,
            )
            .returning(*d.c)
        )
        async with self._db.tx(write=True) as conn:
            rows = (await conn.execute(claim)).mappings().all()
            channel_ids = sorted({row["channel_id"] for row in rows})
            channels = {}
            if channel_ids:
                found = await conn.execute(sa.select(c).where(c.c.id.in_(channel_ids)))
                channels = {row["id"]: _channel_from_row(self._db, row) for row in found.mappings()}
        claimed = [
            ClaimedDelivery(_delivery_from_row(row), channels.get(row["channel_id"]))
            for row in rows
        ]
        claimed.sort(key=lambda x: x.delivery.next_attempt_at)
        return claimed

    async def defer_delivery(
        self, delivery_id: str, claim_seq: int, until: datetime, now: datetime
    ) -> None:
        d = notification_deliveries
        async with self._db.tx(write=True) as conn:
            await conn.execute(
                sa.update(d)
                .where(d.c.id == delivery_id, d.c.status == _PENDING, d.c.claim_seq == claim_seq)
                .values(next_attempt_at=to_ms(until), claimed_until=None, updated_at=to_ms(now))
            )

    async def record_attempt(
        self,
        delivery_id: str,
        claim_seq: int,
        attempt: DeliveryAttempt,
        *,
        retry_at: datetime | None,
    ) -> int:
        d, a = notification_deliveries, notification_attempts
        now_ms = to_ms(attempt.time)
        counted: dict[str, Any] = {"attempts": d.c.attempts + 1, "updated_at": now_ms}
        if not attempt.ok:
            counted["last_error"] = attempt.error
        async with self._db.tx(write=True) as conn:
            # Numbered from the row (locked by this update), so concurrent recorders of one
            # delivery — a replica whose lease lapsed and the one that took it over — get
            # distinct numbers.
            row = (
                (
                    await conn.execute(
                        sa.update(d)
                        .where(d.c.id == delivery_id)
                        .values(**counted)
                        .returning(d.c.attempts, d.c.tenant_id)
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                raise errors.NotFound(f"notification delivery {delivery_id!r} not found")
            number = int(row["attempts"])
            await conn.execute(
                sa.insert(a).values(
                    delivery_id=delivery_id,
                    attempt=number,
                    tenant_id=row["tenant_id"],
                    time=now_ms,
                    ok=attempt.ok,
                    error=attempt.error,
                )
            )
            if attempt.ok:
                # Marked delivered once, whoever sent it.
                settle = (
                    sa.update(d)
                    .where(d.c.id == delivery_id, d.c.status == _PENDING)
                    .values(
                        status=DeliveryStatus.DELIVERED.value,
                        delivered_at=now_ms,
                        claimed_until=None,
                    )
                )
            else:
                values: dict[str, Any] = {"claimed_until": None}
                if retry_at is None:
                    values["status"] = DeliveryStatus.FAILED.value
                else:
                    values["next_attempt_at"] = to_ms(retry_at)
                # Only the current claim reschedules (a lapsed one lost the delivery).
                settle = (
                    sa.update(d)
                    .where(
                        d.c.id == delivery_id, d.c.status == _PENDING, d.c.claim_seq == claim_seq
                    )
                    .values(**values)
                )
            await conn.execute(settle)
        return number
