"""The secret store in SQL, and the re-encryption of every sealed column.

``SqlSecrets`` is the ``SecretRepository`` port over the ``secrets`` table (migration
0008); values are sealed per (tenant, name) with the store's ``Sealer``. ``reseal`` walks
every sealed column — ``secrets.value``, ``webhook_triggers.secret``,
``notification_channels.config`` — in primary-key order, a batch per transaction, and
writes each value sealed under the current key (``rotate_key``: every value;
``seal_plaintext``: only values written before encryption existed, done at start).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from coordinator import errors
from coordinator.model import MAX_SECRETS_PER_TENANT, SecretEntry
from coordinator.sealing import DERIVED_KID, PREFIX
from coordinator.store._db import Database
from coordinator.store._rows import from_ms, to_ms
from coordinator.store._tables import notification_channels, secrets, webhook_triggers


@dataclass(frozen=True)
class _Sealed:
    """A sealed column: its table, the primary key, and what names a row in the AAD."""

    table: sa.Table
    key: tuple[str, ...]
    row: str  # the column whose value names the row in the associated data
    column: str


SEALED = (
    _Sealed(secrets, ("tenant_id", "name"), "name", "value"),
    _Sealed(webhook_triggers, ("tenant_id", "path"), "path", "secret"),
    _Sealed(notification_channels, ("id",), "id", "config"),
)


def _entry_from_row(db: Database, r: Any) -> SecretEntry:
    return SecretEntry(
        tenant_id=r["tenant_id"],
        name=r["name"],
        value=db.unseal(r["value"], r["tenant_id"], "secrets", r["name"], "value"),
        created_at=from_ms(r["created_at"]),
        updated_at=from_ms(r["updated_at"]),
    )


class SqlSecrets:
    """The ``SecretRepository`` port."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @property
    def key_configured(self) -> bool:
        return self._db.sealer is not None and not self._db.sealer.derived

    async def put_secret(self, entry: SecretEntry) -> bool:
        s = secrets
        sealed = self._db.seal(entry.value, entry.tenant_id, "secrets", entry.name, "value")
        where = (s.c.tenant_id == entry.tenant_id, s.c.name == entry.name)
        async with self._db.tx(write=True) as conn:
            updated = await conn.execute(
                sa.update(s).where(*where).values(value=sealed, updated_at=to_ms(entry.updated_at))
            )
            if updated.rowcount:
                return False
            count = await conn.scalar(
                sa.select(sa.func.count()).select_from(s).where(s.c.tenant_id == entry.tenant_id)
            )
            if (count or 0) >= MAX_SECRETS_PER_TENANT:
                raise errors.ResourceExhausted(
                    f"tenant {entry.tenant_id!r} has {count} secrets, the most it may have; "
                    "delete one it no longer needs"
                )
            try:
                await conn.execute(
                    sa.insert(s).values(
                        tenant_id=entry.tenant_id,
                        name=entry.name,
                        value=sealed,
                        created_at=to_ms(entry.created_at),
                        updated_at=to_ms(entry.updated_at),
                    )
                )
            except sa_exc.IntegrityError as exc:
                raise errors.Conflict(f"secret {entry.name!r} was set concurrently; retry") from exc
        return True

    async def list_secrets(self, tenant_id: str) -> list[SecretEntry]:
        s = secrets
        query = sa.select(s).where(s.c.tenant_id == tenant_id).order_by(s.c.name)
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_entry_from_row(self._db, r) for r in rows]

    async def get_secrets(self, tenant_id: str, names: Sequence[str]) -> dict[str, str]:
        if not names:
            return {}
        s = secrets
        query = sa.select(s).where(s.c.tenant_id == tenant_id, s.c.name.in_(list(names)))
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return {r["name"]: _entry_from_row(self._db, r).value for r in rows}

    async def delete_secret(self, tenant_id: str, name: str) -> None:
        s = secrets
        async with self._db.tx(write=True) as conn:
            deleted = await conn.execute(
                sa.delete(s).where(s.c.tenant_id == tenant_id, s.c.name == name)
            )
        if not deleted.rowcount:
            raise errors.NotFound(
                f"secret {name!r} not found in tenant {tenant_id!r}; "
                "`trellis secrets list` shows its secrets"
            )

    async def rotate_key(self, batch_size: int) -> tuple[str, dict[str, int]]:
        counts = await reseal(self._db, batch_size, only_plaintext=False)
        sealer = self._db.sealer
        return ("" if sealer is None else sealer.current_kid), counts


async def reseal(
    db: Database, batch_size: int, *, only_plaintext: bool, also_derived: bool = False
) -> dict[str, int]:
    """Seal every value of every sealed column under the current key (``only_plaintext``:
    only those stored before encryption existed, and with ``also_derived`` those sealed
    under the key derived from the database). The count of values written, per table."""
    counts: dict[str, int] = {}
    for sealed in SEALED:
        counts[sealed.table.name] = await _reseal_column(
            db, sealed, batch_size, only_plaintext, also_derived
        )
    return counts


async def _reseal_column(
    db: Database, sealed: _Sealed, batch_size: int, only_plaintext: bool, also_derived: bool
) -> int:
    t = sealed.table
    keys = [t.c[k] for k in sealed.key]
    value = t.c[sealed.column]
    after: tuple[Any, ...] | None = None
    written = 0
    while True:
        wanted = dict.fromkeys([*sealed.key, "tenant_id", sealed.row, sealed.column])
        query = sa.select(*(t.c[name] for name in wanted))
        if only_plaintext:
            stale = sa.not_(value.startswith(PREFIX, autoescape=True))
            if also_derived:
                derived = value.startswith(f"{PREFIX}{DERIVED_KID}:", autoescape=True)
                stale = sa.or_(stale, derived)
            query = query.where(stale)
        if after is not None:
            query = query.where(sa.tuple_(*keys) > sa.tuple_(*after))
        query = query.order_by(*keys).limit(batch_size)
        async with db.tx(write=True, audit=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
            for r in rows:
                where = [k == r[k.name] for k in keys]
                args = (r["tenant_id"], t.name, r[sealed.row], sealed.column)
                plain = db.unseal(r[sealed.column], *args, plaintext_ok=True)
                # Compare-and-swap: a value written since the read (a new secret, a trigger
                # recreated at the same path) is newer than ours and is left alone.
                done = await conn.execute(
                    sa.update(t)
                    .where(*where, value == r[sealed.column])
                    .values({sealed.column: db.seal(plain, *args)})
                )
                written += done.rowcount
        if len(rows) < batch_size:
            return written
        last = rows[-1]
        after = tuple(last[k] for k in sealed.key)
