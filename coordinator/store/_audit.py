"""The audit trail in SQL: one hash chain per tenant (docs/security.md).

- ``append_audit`` appends one entry on the caller's transaction: it locks the tenant's
  chain head (``audit_heads``; ``FOR UPDATE`` on PostgreSQL, SQLite's single writer
  already serializes writes), numbers the record ``head.seq + 1``, chains its hash to the
  head's, inserts it and moves the head. Appends of one tenant therefore queue on its head
  row, and the head lock is taken last and held only until the commit.
- ``Database.tx`` runs it just before a write transaction commits when the call being
  served has an unwritten audit entry (``PENDING_AUDIT``), so the record commits, or rolls
  back, with the call's effect; ``SqlAudit.append`` runs it in a transaction of its own.
- ``SqlAudit`` is the ``AuditRepository`` port: ``append``, ``list_records`` and
  ``verify``, which rereads one tenant's chain in one snapshot and checks it
  (``_rows.AuditChainCheck``).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator import errors
from coordinator.model import AuditEntry, AuditRecord
from coordinator.store import _rows
from coordinator.store._tables import audit_heads, audit_records

if TYPE_CHECKING:
    from coordinator.store._db import Database

_TENANT = sa.bindparam("b_tenant_id", type_=sa.Text)
_HEAD = sa.select(audit_heads.c.seq, audit_heads.c.hash).where(audit_heads.c.tenant_id == _TENANT)
# The chain head locked for the appending transaction (PostgreSQL), or read (SQLite).
_LOCK_HEAD = {True: _HEAD.with_for_update(), False: _HEAD}
# A tenant's first append: its head row (seq 0), unless a concurrent first append made it.
_NEW_HEAD = {
    postgres: (postgresql.insert if postgres else sqlite.insert)(audit_heads)
    .values(tenant_id=_TENANT, seq=0, hash="")
    .on_conflict_do_nothing(index_elements=[audit_heads.c.tenant_id])
    for postgres in (True, False)
}
_MOVE_HEAD = (
    sa.update(audit_heads)
    .where(audit_heads.c.tenant_id == _TENANT, audit_heads.c.seq == sa.bindparam("b_prev_seq"))
    .values(seq=sa.bindparam("b_seq"), hash=sa.bindparam("b_hash"))
)
# verify reads the head and every record in one snapshot (SQLite: one read transaction).
_SNAPSHOT = sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
_VERIFY_PAGE = 1000


async def append_audit(
    conn: AsyncConnection, db: Database, entry: AuditEntry, now_ms: int
) -> AuditRecord:
    """Append ``entry`` to its tenant's chain on ``conn``'s write transaction (which must
    be one: the head stays locked until it ends), stamped ``now_ms``."""
    params = {"b_tenant_id": entry.tenant_id}
    lock = _LOCK_HEAD[db.postgres]
    head = (await conn.execute(lock, params)).first()
    if head is None:
        await conn.execute(_NEW_HEAD[db.postgres], params)
        head = (await conn.execute(lock, params)).one()
    prev_seq, prev_hash = int(head.seq), str(head.hash)
    record = _rows.audit_record(entry, seq=prev_seq + 1, prev_hash=prev_hash, at_ms=now_ms)
    await conn.execute(sa.insert(audit_records).values(_rows.audit_record_values(record)))
    moved = await conn.execute(
        _MOVE_HEAD,
        {**params, "b_prev_seq": prev_seq, "b_seq": record.seq, "b_hash": record.hash},
    )
    if moved.rowcount != 1:  # the head lock rules this out; never write a forked chain
        raise errors.Conflict(
            f"the audit chain of tenant {entry.tenant_id!r} moved during an append; retry"
        )
    return record


class SqlAudit:
    """The ``AuditRepository`` port."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def append(self, entry: AuditEntry, now: datetime) -> None:
        # audit=False: this transaction appends ``entry`` itself, never the pending one.
        async with self._db.tx(write=True, audit=False) as conn:
            await append_audit(conn, self._db, entry, _rows.to_ms(now))
        entry.written = True

    async def list_records(
        self,
        tenant_id: str,
        *,
        since: datetime | None = None,
        actor: str | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[AuditRecord]:
        r = audit_records
        query = (
            sa.select(r)
            .where(r.c.tenant_id == tenant_id, r.c.seq > after_seq)
            .order_by(r.c.seq)
            .limit(limit)
        )
        if since is not None:
            query = query.where(r.c.at >= _rows.to_ms(since))
        if actor is not None:
            query = query.where(r.c.actor == actor)
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.audit_record_from_row(row) for row in rows]

    async def verify(self, tenant_id: str) -> tuple[int, str | None]:
        r = audit_records
        page = (
            sa.select(r)
            .where(r.c.tenant_id == tenant_id, r.c.seq > sa.bindparam("b_after"))
            .order_by(r.c.seq)
            .limit(_VERIFY_PAGE)
        )
        check = _rows.AuditChainCheck()
        async with self._db.tx(write=False) as conn:
            if self._db.postgres:
                await conn.execute(_SNAPSHOT)
            found = (await conn.execute(_HEAD, {"b_tenant_id": tenant_id})).first()
            head = None if found is None else (int(found.seq), str(found.hash))
            after = 0
            while True:
                rows = (await conn.execute(page, {"b_after": after})).mappings().all()
                for row in rows:
                    problem = check.add(_rows.audit_record_from_row(row))
                    if problem is not None:
                        return problem
                if len(rows) < _VERIFY_PAGE:
                    break
                after = rows[-1]["seq"]
                await asyncio.sleep(0)  # a long chain: let the loop serve others between pages
        return check.finish(head)
