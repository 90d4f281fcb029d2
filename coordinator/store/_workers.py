"""Registered worker processes: ``SqlWorkers``, and ``touch_worker``, which a claim also runs
on its own transaction (a worker handed tasks is alive)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator import errors
from coordinator.model import WorkerInfo
from coordinator.store import _rows
from coordinator.store._db import Database
from coordinator.store._tables import workers

_TOUCH_NOW = sa.bindparam("b_now_ms", type_=sa.BigInteger)
# last_seen = now for a registered worker; never moves it back (replicas' clocks).
_TOUCH_WORKER = (
    sa.update(workers)
    .where(
        workers.c.tenant_id == sa.bindparam("b_tenant_id"),
        workers.c.id == sa.bindparam("b_worker_id"),
        workers.c.last_seen < _TOUCH_NOW,
    )
    .values(last_seen=_TOUCH_NOW)
)


async def touch_worker(conn: AsyncConnection, tenant_id: str, worker_id: str, now_ms: int) -> None:
    """last_seen = now for a registered worker; never moves it back (replicas' clocks)."""
    await conn.execute(
        _TOUCH_WORKER, {"b_tenant_id": tenant_id, "b_worker_id": worker_id, "b_now_ms": now_ms}
    )


class SqlWorkers:
    """The ``WorkerRepository`` port."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def upsert_worker(self, worker: WorkerInfo) -> None:
        values = _rows.worker_values(worker)
        insert = (postgresql.insert if self._db.postgres else sqlite.insert)(workers)
        stmt = insert.values(values).on_conflict_do_update(
            index_elements=[workers.c.tenant_id, workers.c.id],
            set_={k: v for k, v in values.items() if k not in ("tenant_id", "id")},
        )
        async with self._db.tx(write=True) as conn:
            await conn.execute(stmt)

    async def touch_worker(self, tenant_id: str, worker_id: str, now: datetime) -> None:
        async with self._db.tx(write=True) as conn:
            await touch_worker(conn, tenant_id, worker_id, _rows.to_ms(now))

    async def get_worker(self, tenant_id: str, worker_id: str) -> WorkerInfo:
        """The registered worker. Raises ``NotFound``."""
        query = sa.select(workers).where(
            workers.c.tenant_id == tenant_id, workers.c.id == worker_id
        )
        async with self._db.tx(write=False) as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise errors.NotFound(f"worker {worker_id!r} not found")
        return _rows.worker_from_row(row)
