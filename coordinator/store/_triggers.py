"""Triggers in SQL: webhook and event triggers, schedules and their fires.

``SqlTriggers`` is the ``TriggerRepository`` port; rows of the trigger tables become domain
objects here (and back), the only module that reads or writes them. The executions a
schedule starts are written by its ``SqlExecutions`` collaborator.

A scheduler step (``fire_schedule``) locks the schedule row with ``FOR UPDATE SKIP LOCKED``
on PostgreSQL, so replicas stepping at once never act on one schedule twice; on SQLite the
single writer serializes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator import errors
from coordinator.model import (
    CatchupPolicy,
    EventTrigger,
    Execution,
    FireOutcome,
    FiringResult,
    OverlapPolicy,
    Schedule,
    ScheduleFire,
    Transition,
    WebhookAuth,
    WebhookTrigger,
)
from coordinator.store import _rows
from coordinator.store._db import Database
from coordinator.store._executions import SqlExecutions
from coordinator.store._tables import (
    event_triggers,
    schedule_fires,
    schedules,
    webhook_replays,
    webhook_triggers,
)

# -- rows ---------------------------------------------------------------------------------


def _webhook_values(db: Database, trigger: WebhookTrigger) -> dict[str, Any]:
    secret = db.seal(trigger.secret, trigger.tenant_id, "webhook_triggers", trigger.path, "secret")
    return {
        "tenant_id": trigger.tenant_id,
        "path": trigger.path,
        "workflow_name": trigger.workflow_name,
        "workflow_version": trigger.workflow_version,
        "auth": trigger.auth.value,
        "secret": secret,
        "tolerance_ms": _rows.duration_ms(trigger.signature_tolerance),
        "idempotency_expr": trigger.idempotency_expr,
        "input_expr": trigger.input_expr,
        "created_at": _rows.to_ms(trigger.created_at),
    }


def _webhook_from_row(db: Database, r: Any) -> WebhookTrigger:
    secret = db.unseal(r["secret"], r["tenant_id"], "webhook_triggers", r["path"], "secret")
    return WebhookTrigger(
        path=r["path"],
        workflow_name=r["workflow_name"],
        workflow_version=r["workflow_version"],
        auth=WebhookAuth(r["auth"]),
        secret=secret,
        created_at=_rows.from_ms(r["created_at"]),
        signature_tolerance=timedelta(milliseconds=r["tolerance_ms"]),
        idempotency_expr=r["idempotency_expr"],
        input_expr=r["input_expr"],
        tenant_id=r["tenant_id"],
    )


def _event_values(trigger: EventTrigger) -> dict[str, Any]:
    return {
        "id": trigger.id,
        "tenant_id": trigger.tenant_id,
        "event_name": trigger.event_name,
        "workflow_name": trigger.workflow_name,
        "workflow_version": trigger.workflow_version,
        "filter_expr": trigger.filter_expr,
        "input_expr": trigger.input_expr,
        "created_at": _rows.to_ms(trigger.created_at),
    }


def _event_from_row(r: Any) -> EventTrigger:
    return EventTrigger(
        id=r["id"],
        event_name=r["event_name"],
        workflow_name=r["workflow_name"],
        workflow_version=r["workflow_version"],
        created_at=_rows.from_ms(r["created_at"]),
        filter_expr=r["filter_expr"],
        input_expr=r["input_expr"],
        tenant_id=r["tenant_id"],
    )


def _schedule_values(s: Schedule) -> dict[str, Any]:
    return {
        "tenant_id": s.tenant_id,
        "id": s.id,
        "cron": s.cron,
        "timezone": s.timezone,
        "workflow_name": s.workflow_name,
        "workflow_version": s.workflow_version,
        "input": s.input,
        "overlap": s.overlap.value,
        "catchup": s.catchup.value,
        "max_catchup": s.max_catchup,
        "paused": s.paused,
        "next_fire_at": _rows.opt_to_ms(s.next_fire_at),
        "last_fire_at": _rows.opt_to_ms(s.last_fire_at),
        "last_execution_id": s.last_execution_id,
        "buffered_fire_at": _rows.opt_to_ms(s.buffered_fire_at),
        "started_fires": s.started_fires,
        "skipped_fires": s.skipped_fires,
        "missed_fires": s.missed_fires,
        "created_at": _rows.to_ms(s.created_at),
        "updated_at": _rows.to_ms(s.updated_at),
    }


def _schedule_from_row(r: Any) -> Schedule:
    return Schedule(
        id=r["id"],
        cron=r["cron"],
        timezone=r["timezone"],
        workflow_name=r["workflow_name"],
        workflow_version=r["workflow_version"],
        input=bytes(r["input"]),
        overlap=OverlapPolicy(r["overlap"]),
        catchup=CatchupPolicy(r["catchup"]),
        max_catchup=r["max_catchup"],
        created_at=_rows.from_ms(r["created_at"]),
        updated_at=_rows.from_ms(r["updated_at"]),
        paused=bool(r["paused"]),
        next_fire_at=_rows.opt_from_ms(r["next_fire_at"]),
        last_fire_at=_rows.opt_from_ms(r["last_fire_at"]),
        last_execution_id=r["last_execution_id"],
        buffered_fire_at=_rows.opt_from_ms(r["buffered_fire_at"]),
        started_fires=r["started_fires"],
        skipped_fires=r["skipped_fires"],
        missed_fires=r["missed_fires"],
        tenant_id=r["tenant_id"],
    )


def _fire_from_row(r: Any) -> ScheduleFire:
    return ScheduleFire(
        schedule_id=r["schedule_id"],
        fire_at=_rows.from_ms(r["fire_at"]),
        outcome=FireOutcome(r["outcome"]),
        recorded_at=_rows.from_ms(r["recorded_at"]),
        execution_id=r["execution_id"],
        tenant_id=r["tenant_id"],
    )


_NOT_PAUSED = schedules.c.paused == sa.literal_column("false", sa.Boolean)


class SqlTriggers:
    """The ``TriggerRepository`` port, with the executions repository that writes the
    executions a schedule starts."""

    def __init__(self, db: Database, executions: SqlExecutions) -> None:
        self._db = db
        self._executions = executions

    # -- webhooks -------------------------------------------------------------------------

    async def create_webhook_trigger(self, trigger: WebhookTrigger) -> None:
        values = _webhook_values(self._db, trigger)
        try:
            async with self._db.tx(write=True) as conn:
                await conn.execute(sa.insert(webhook_triggers).values(values))
        except sa_exc.IntegrityError as exc:
            raise errors.AlreadyExists(
                f"a webhook trigger at path {trigger.path!r} exists; delete it first or "
                "choose another path"
            ) from exc

    async def get_webhook_trigger(self, tenant_id: str, path: str) -> WebhookTrigger:
        t = webhook_triggers
        query = sa.select(t).where(t.c.tenant_id == tenant_id, t.c.path == path)
        async with self._db.tx(write=False) as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise errors.NotFound(f"webhook trigger {path!r} not found")
        return _webhook_from_row(self._db, row)

    async def list_webhook_triggers(self, tenant_id: str) -> list[WebhookTrigger]:
        t = webhook_triggers
        query = sa.select(t).where(t.c.tenant_id == tenant_id).order_by(t.c.path)
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_webhook_from_row(self._db, r) for r in rows]

    async def delete_webhook_trigger(self, tenant_id: str, path: str) -> None:
        t = webhook_triggers
        async with self._db.tx(write=True) as conn:
            result = await conn.execute(
                sa.delete(t).where(t.c.tenant_id == tenant_id, t.c.path == path)
            )
            if result.rowcount == 0:
                raise errors.NotFound(f"webhook trigger {path!r} not found")

    # -- webhook replays -------------------------------------------------------------------

    async def record_webhook_delivery(
        self, tenant_id: str, digest: str, expires_at: datetime, now: datetime
    ) -> bool:
        # Insert if absent; a row already there is taken over only once it has expired.
        # Concurrent inserts of one key wait for the first on PostgreSQL (and SQLite has a
        # single writer), so exactly one of them inserts.
        r = webhook_replays
        insert = (postgresql.insert if self._db.postgres else sqlite.insert)(r)
        values = {"tenant_id": tenant_id, "digest": digest, "expires_at": _rows.to_ms(expires_at)}
        async with self._db.tx(write=True, audit=False) as conn:
            inserted = await conn.scalar(
                insert.values(values)
                .on_conflict_do_nothing(index_elements=[r.c.tenant_id, r.c.digest])
                .returning(r.c.digest)
            )
            if inserted is not None:
                return True
            result = await conn.execute(
                sa.update(r)
                .where(
                    r.c.tenant_id == tenant_id,
                    r.c.digest == digest,
                    r.c.expires_at <= _rows.to_ms(now),
                )
                .values(expires_at=values["expires_at"])
            )
            return bool(result.rowcount == 1)

    async def forget_webhook_delivery(self, tenant_id: str, digest: str) -> None:
        r = webhook_replays
        async with self._db.tx(write=True, audit=False) as conn:
            await conn.execute(sa.delete(r).where(r.c.tenant_id == tenant_id, r.c.digest == digest))

    async def delete_expired_webhook_deliveries(self, now: datetime, limit: int) -> int:
        r = webhook_replays
        expired = (
            sa.select(r.c.tenant_id, r.c.digest)
            .where(r.c.expires_at <= _rows.to_ms(now))
            .order_by(r.c.expires_at)
            .limit(limit)
        )
        async with self._db.tx(write=True, audit=False) as conn:
            rows = (await conn.execute(expired)).all()
            for tenant_id, digest in rows:
                await conn.execute(
                    sa.delete(r).where(
                        r.c.tenant_id == tenant_id,
                        r.c.digest == digest,
                        r.c.expires_at <= _rows.to_ms(now),
                    )
                )
        return len(rows)

    # -- events ---------------------------------------------------------------------------

    async def create_event_trigger(self, trigger: EventTrigger) -> None:
        async with self._db.tx(write=True) as conn:
            await conn.execute(sa.insert(event_triggers).values(_event_values(trigger)))

    async def list_event_triggers(
        self, tenant_id: str, event_name: str | None
    ) -> list[EventTrigger]:
        t = event_triggers
        query = (
            sa.select(t)
            .where(t.c.tenant_id == tenant_id)
            .order_by(t.c.event_name, t.c.created_at, t.c.id)
        )
        if event_name is not None:
            query = query.where(t.c.event_name == event_name)
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_event_from_row(r) for r in rows]

    async def delete_event_trigger(self, tenant_id: str, trigger_id: str) -> None:
        t = event_triggers
        async with self._db.tx(write=True) as conn:
            result = await conn.execute(
                sa.delete(t).where(t.c.tenant_id == tenant_id, t.c.id == trigger_id)
            )
            if result.rowcount == 0:
                raise errors.NotFound(f"event trigger {trigger_id!r} not found")

    # -- schedules ------------------------------------------------------------------------

    async def create_schedule(self, schedule: Schedule) -> None:
        try:
            async with self._db.tx(write=True) as conn:
                await conn.execute(sa.insert(schedules).values(_schedule_values(schedule)))
        except sa_exc.IntegrityError as exc:
            raise errors.AlreadyExists(
                f"schedule {schedule.id!r} exists; delete it first or choose another id"
            ) from exc

    async def get_schedule(self, tenant_id: str, schedule_id: str) -> Schedule:
        async with self._db.tx(write=False) as conn:
            found = await self._load_schedule(conn, tenant_id, schedule_id)
        if found is None:
            raise errors.NotFound(f"schedule {schedule_id!r} not found")
        return found

    async def _load_schedule(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        schedule_id: str,
        *,
        lock: bool = False,
        skip_locked: bool = False,
    ) -> Schedule | None:
        s = schedules
        query = sa.select(s).where(s.c.tenant_id == tenant_id, s.c.id == schedule_id)
        if lock and self._db.postgres:
            query = query.with_for_update(skip_locked=skip_locked)
        row = (await conn.execute(query)).mappings().first()
        return None if row is None else _schedule_from_row(row)

    async def list_schedules(self, tenant_id: str) -> list[Schedule]:
        s = schedules
        query = sa.select(s).where(s.c.tenant_id == tenant_id).order_by(s.c.id)
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_schedule_from_row(r) for r in rows]

    async def update_schedule(
        self, tenant_id: str, schedule_id: str, change: Callable[[Schedule], Schedule]
    ) -> Schedule:
        async with self._db.tx(write=True) as conn:
            found = await self._load_schedule(conn, tenant_id, schedule_id, lock=True)
            if found is None:
                raise errors.NotFound(f"schedule {schedule_id!r} not found")
            changed = change(found)
            if changed != found:
                await self._write_schedule(conn, changed)
        return changed

    async def _write_schedule(self, conn: AsyncConnection, schedule: Schedule) -> None:
        s = schedules
        values = _schedule_values(schedule)
        for key in ("tenant_id", "id", "created_at"):
            values.pop(key)
        await conn.execute(
            sa.update(s)
            .where(s.c.tenant_id == schedule.tenant_id, s.c.id == schedule.id)
            .values(values)
        )

    async def delete_schedule(self, tenant_id: str, schedule_id: str) -> None:
        s, f = schedules, schedule_fires
        async with self._db.tx(write=True) as conn:
            result = await conn.execute(
                sa.delete(s).where(s.c.tenant_id == tenant_id, s.c.id == schedule_id)
            )
            if result.rowcount == 0:
                raise errors.NotFound(f"schedule {schedule_id!r} not found")
            await conn.execute(
                sa.delete(f).where(f.c.tenant_id == tenant_id, f.c.schedule_id == schedule_id)
            )

    async def list_schedule_fires(
        self, tenant_id: str, schedule_id: str, limit: int
    ) -> list[ScheduleFire]:
        f = schedule_fires
        query = (
            sa.select(f)
            .where(f.c.tenant_id == tenant_id, f.c.schedule_id == schedule_id)
            .order_by(f.c.fire_at.desc())
            .limit(limit)
        )
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_fire_from_row(r) for r in rows]

    async def find_due_schedules(self, now: datetime, limit: int) -> list[Schedule]:
        s = schedules
        query = (
            sa.select(s)
            .where(
                _NOT_PAUSED,
                sa.or_(s.c.next_fire_at <= _rows.to_ms(now), s.c.buffered_fire_at.is_not(None)),
            )
            .order_by(s.c.next_fire_at, s.c.tenant_id, s.c.id)
            .limit(limit)
        )
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_schedule_from_row(r) for r in rows]

    async def next_schedule_fire_at(self) -> datetime | None:
        s = schedules
        query = sa.select(sa.func.min(s.c.next_fire_at)).where(_NOT_PAUSED)
        async with self._db.tx(write=False) as conn:
            value = await conn.scalar(query)
        return _rows.opt_from_ms(value)

    async def has_buffered_fires(self) -> bool:
        s = schedules
        query = sa.select(s.c.id).where(_NOT_PAUSED, s.c.buffered_fire_at.is_not(None)).limit(1)
        async with self._db.tx(write=False) as conn:
            return (await conn.scalar(query)) is not None

    async def fire_schedule(
        self,
        tenant_id: str,
        schedule_id: str,
        decide: Callable[[Schedule, Execution | None], FiringResult | None],
    ) -> FiringResult | None:
        async with self._db.tx(write=True) as conn:
            found = await self._load_schedule(
                conn, tenant_id, schedule_id, lock=True, skip_locked=True
            )
            if found is None:
                return None  # deleted, or another replica is stepping it right now
            last = None
            if found.last_execution_id is not None:
                with contextlib.suppress(errors.NotFound):
                    last = await self._executions.load_execution(
                        conn, tenant_id, found.last_execution_id
                    )
            result = decide(found, last)
            if result is None:
                return None
            inserted: list[Transition] = []
            for transition in result.starts:
                if await self._insert_start(conn, transition):
                    inserted.append(transition)
            for fire in result.fires:
                await self._record_fire(conn, fire)
            await self._write_schedule(conn, result.schedule)
        return FiringResult(result.schedule, tuple(inserted), result.fires)

    async def _insert_start(self, conn: AsyncConnection, transition: Transition) -> bool:
        """Insert a start of the schedule, unless its idempotency key is taken (at any age)."""
        execution = transition.execution
        key = execution.idempotency_key
        if key is not None:
            holder = await self._executions.by_idempotency_key(conn, execution.tenant_id, key)
            if holder is not None:
                return False
        await self._executions.insert_execution(conn, transition)
        return True

    async def _record_fire(self, conn: AsyncConnection, fire: ScheduleFire) -> None:
        f = schedule_fires
        values = {
            "outcome": fire.outcome.value,
            "execution_id": fire.execution_id,
            "recorded_at": _rows.to_ms(fire.recorded_at),
        }
        at = _rows.to_ms(fire.fire_at)
        result = await conn.execute(
            sa.update(f)
            .where(
                f.c.tenant_id == fire.tenant_id,
                f.c.schedule_id == fire.schedule_id,
                f.c.fire_at == at,
            )
            .values(values)
        )
        if result.rowcount == 0:
            await conn.execute(
                sa.insert(f).values(
                    tenant_id=fire.tenant_id, schedule_id=fire.schedule_id, fire_at=at, **values
                )
            )
