"""Task-type limits in SQL (docs/dispatch.md): one row per (tenant, task type).

``SqlLimits`` is the ``LimitsRepository`` port over the ``task_type_limits`` table
(migration 0006), whose rows become ``TaskTypeLimits`` here, the only module that reads
them. A set is an upsert (``INSERT ... ON CONFLICT DO UPDATE``, which SQLite and PostgreSQL
both have), so concurrent sets of one type never fail; the last one wins.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from coordinator import errors
from coordinator.model import TaskTypeLimits
from coordinator.store import _rows
from coordinator.store._db import Database
from coordinator.store._tables import task_type_limits

_KEY = ("tenant_id", "task_type")


def limits_values(limits: TaskTypeLimits, now: datetime) -> dict[str, Any]:
    return {
        "tenant_id": limits.tenant_id,
        "task_type": limits.task_type,
        "rate_per_second": limits.rate_per_second,
        "burst": limits.burst,
        "rate_key": limits.rate_key,
        "max_concurrency": limits.max_concurrency,
        "concurrency_key": limits.concurrency_key,
        "concurrency_key_limit": limits.concurrency_key_limit,
        "breaker_failure_threshold": limits.breaker_failure_threshold,
        "breaker_reset_ms": _rows.duration_ms(limits.breaker_reset_timeout),
        "updated_at": _rows.to_ms(now),
    }


def limits_from_row(r: Any) -> TaskTypeLimits:
    return TaskTypeLimits(
        task_type=r["task_type"],
        tenant_id=r["tenant_id"],
        rate_per_second=float(r["rate_per_second"]),
        burst=r["burst"],
        rate_key=r["rate_key"],
        max_concurrency=r["max_concurrency"],
        concurrency_key=r["concurrency_key"],
        concurrency_key_limit=r["concurrency_key_limit"],
        breaker_failure_threshold=r["breaker_failure_threshold"],
        breaker_reset_timeout=timedelta(milliseconds=r["breaker_reset_ms"]),
        updated_at=_rows.from_ms(r["updated_at"]),
    )


def _not_found(task_type: str) -> errors.NotFound:
    return errors.NotFound(
        f"no limits for task type {task_type!r}; set them with `trellis limits set {task_type} ...`"
    )


class SqlLimits:
    """The ``LimitsRepository`` port."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def set_task_type_limits(self, limits: TaskTypeLimits, now: datetime) -> TaskTypeLimits:
        values = limits_values(limits, now)
        insert = (postgresql.insert if self._db.postgres else sqlite.insert)(task_type_limits)
        t = task_type_limits
        stmt = insert.values(values).on_conflict_do_update(
            index_elements=[t.c.tenant_id, t.c.task_type],
            set_={k: v for k, v in values.items() if k not in _KEY},
        )
        async with self._db.tx(write=True) as conn:
            await conn.execute(stmt)
        # What a later read returns (updated_at truncated to the millisecond).
        return limits_from_row(values)

    async def get_task_type_limits(self, tenant_id: str, task_type: str) -> TaskTypeLimits:
        t = task_type_limits
        query = sa.select(t).where(t.c.tenant_id == tenant_id, t.c.task_type == task_type)
        async with self._db.tx(write=False) as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise _not_found(task_type)
        return limits_from_row(row)

    async def list_task_type_limits(self, tenant_id: str | None) -> list[TaskTypeLimits]:
        t = task_type_limits
        query = sa.select(t).order_by(t.c.tenant_id, t.c.task_type)
        if tenant_id is not None:
            query = query.where(t.c.tenant_id == tenant_id)
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [limits_from_row(r) for r in rows]

    async def delete_task_type_limits(self, tenant_id: str, task_type: str) -> None:
        t = task_type_limits
        async with self._db.tx(write=True) as conn:
            result = await conn.execute(
                sa.delete(t).where(t.c.tenant_id == tenant_id, t.c.task_type == task_type)
            )
            if result.rowcount == 0:
                raise _not_found(task_type)
