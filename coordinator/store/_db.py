"""``Database``: the one database handle the store's repositories share.

It owns the engine, the dialect, the process lock, the transaction helper ``tx`` (which
converts database failures into coordinator errors), the PostgreSQL NOTIFY sent with a
transaction (its channel and payload; ``_wakeups`` listens on the other end), and the
settings every repository writes with (``priority_aging_ms``).

Concurrency model:

- PostgreSQL: many replicas share the database. Execution rows are guarded by optimistic
  concurrency (``version``); a transition also re-checks the ``(status, lease_seq)`` of every
  node run it replaces, so a claim that slipped in between load and write makes the
  transition reload and decide again instead of overwriting the lease. Claims take rows with
  ``FOR UPDATE SKIP LOCKED`` in one statement.
- SQLite: one coordinator process per file (see ``ProcessLock``), and inside it one writer: an
  ``asyncio.Lock`` is held around every write transaction. WAL lets reads run beside it.
  An in-memory database has a single connection, so every transaction takes the lock.
  A SQLite file's transactions run on a synchronous engine on the event loop's thread
  (``on_loop``), wrapped as an ``AsyncConnection`` so the store's code is the same for both
  stores: SQLite answers in microseconds, and aiosqlite's thread hand-off per statement
  cost ten times the statement itself. Only a busy database (another process writing the
  file, which the process lock rules out) could block the loop, for at most busy_timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import StaticPool

from coordinator import errors
from coordinator.model import AuditEntry
from coordinator.sealing import Sealer, SealingError
from coordinator.service.ports import PENDING_AUDIT, take_pending_audit
from coordinator.store import _rows
from coordinator.store._audit import append_audit
from coordinator.store._lock import ProcessLock
from coordinator.store._on_loop import OnLoopConnection

R = TypeVar("R")

_UNAVAILABLE_ERRORS = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    OSError,
)

# Wake-ups across replicas: notifier keys (``task:<type>``, ``exec:<id>``) on one channel,
# one per line; ``WAKE_ALL`` wakes every listener.
CHANNEL = "trellis_wakeups"
WAKE_ALL = "*"
# PostgreSQL caps a NOTIFY payload below 8000 bytes; larger key sets wake everyone.
_MAX_PAYLOAD = 7000
_NOTIFY = sa.text("SELECT pg_notify(:channel, :payload)")


def payload_for(keys: Sequence[str]) -> str:
    text = "\n".join(dict.fromkeys(keys))
    return text if len(text.encode()) <= _MAX_PAYLOAD else WAKE_ALL


class LostRace(errors.Conflict):
    """PostgreSQL aborted the transaction (deadlock, serialization failure): retryable."""


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _missing_table(exc: sa_exc.DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate == "42P01" or "no such table" in str(exc.orig)


def _convert(exc: BaseException) -> errors.TrellisError:
    """A foreign database exception as the coordinator error it means."""
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith("40"):
        # Serialization failure or deadlock: the transaction lost a race, retrying is right.
        return LostRace(f"concurrent update, retry: {_describe(exc)}")
    return errors.Unavailable(f"database unavailable: {_describe(exc)}; retry")


class Database:
    """An async engine (and, for a SQLite file, its on-loop twin) with the locks and
    settings of one store. Built by ``open_store``; closed by ``SqlStore.close``."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        process_lock: ProcessLock | None = None,
        priority_aging_ms: int = _rows.DEFAULT_PRIORITY_AGING_MS,
        on_loop: sa.Engine | None = None,
    ) -> None:
        self.engine = engine
        # SQLite file: a synchronous engine run on the loop's thread (see the module doc).
        self._on_loop = on_loop
        # Dispatch order with ageing (see node_runs.dispatch_rank).
        self.priority_aging_ms = priority_aging_ms
        self._process_lock = process_lock
        self.dialect = engine.dialect.name
        self.postgres = self.dialect == "postgresql"
        memory = self.dialect == "sqlite" and isinstance(engine.pool, StaticPool)
        self._writer = asyncio.Lock() if self.dialect == "sqlite" else None
        self._reader = self._writer if memory else None
        # Encryption at rest of secret columns; installed by ``open_store``.
        self.sealer: Sealer | None = None

    def seal(self, value: str, tenant: str, table: str, row: str, column: str) -> str:
        """``value`` encrypted for that cell (see ``coordinator.sealing``)."""
        return self._sealer().seal(value, tenant, table, row, column)

    def unseal(
        self,
        stored: str,
        tenant: str,
        table: str,
        row: str,
        column: str,
        *,
        plaintext_ok: bool = False,
    ) -> str:
        """The plaintext of a sealed cell (see ``Sealer.open`` for unsealed values)."""
        try:
            return self._sealer().open(
                stored, tenant, table, row, column, plaintext_ok=plaintext_ok
            )
        except SealingError as exc:
            raise errors.FailedPrecondition(str(exc)) from exc

    def _sealer(self) -> Sealer:
        if self.sealer is None:
            raise errors.FailedPrecondition(
                "the store has no encryption key; open it with open_store"
            )
        return self.sealer

    @contextlib.asynccontextmanager
    async def tx(self, *, write: bool, audit: bool = True) -> AsyncIterator[AsyncConnection]:
        """A transaction, committed when the block ends; database failures converted.

        A write transaction also appends the served call's pending audit entry
        (``PENDING_AUDIT``, see ``AuditRepository``) just before it commits, so the record
        commits with the call's effect. Should the transaction then fail, the entry is
        marked unwritten again, for the call's next write transaction (a retry) or the gRPC
        layer's own ``append``. ``audit=False``: leave it to another transaction (an
        append of its own, bookkeeping that is not the call's effect).
        """
        lock = self._writer if write else self._reader
        guard: contextlib.AbstractAsyncContextManager[Any] = (
            lock if lock is not None else contextlib.nullcontext()
        )
        taken: AuditEntry | None = None
        try:
            if self._on_loop is not None:
                async with guard:
                    with self._on_loop.begin() as sync_conn:
                        on_loop = OnLoopConnection(self.engine, sync_conn)
                        yield on_loop
                        # One ContextVar lookup when no call is being audited.
                        if write and audit and PENDING_AUDIT.get() is not None:
                            taken = await self._append_pending(on_loop)
            else:
                async with guard, self.engine.begin() as conn:
                    yield conn
                    if write and audit and PENDING_AUDIT.get() is not None:
                        taken = await self._append_pending(conn)
            taken = None  # committed
        except sa_exc.DataError as exc:
            # e.g. a NUL character, which PostgreSQL text cannot hold: the caller's input.
            raise errors.InvalidArgument(
                f"the database refused a value ({_describe(exc)}); "
                "remove NUL characters and out-of-range numbers from the request"
            ) from exc
        except (sa_exc.OperationalError, sa_exc.ProgrammingError) as exc:
            if _missing_table(exc):
                raise errors.FailedPrecondition(
                    f"the database has no Trellis schema ({_describe(exc)}): run "
                    "`trellis migrate`, or start the coordinator with TRELLIS_AUTO_MIGRATE=true"
                ) from exc
            if isinstance(exc, sa_exc.ProgrammingError):
                raise
            raise _convert(exc) from exc
        except _UNAVAILABLE_ERRORS as exc:
            raise _convert(exc) from exc
        finally:
            if taken is not None:
                # Appended, then not committed: the record is gone with the transaction.
                taken.written = False

    async def _append_pending(self, conn: AsyncConnection) -> AuditEntry | None:
        """Append the call's pending audit entry on ``conn``, whose block ended without an
        exception, and return it; None when there is none, or when the block rolled its
        transaction back itself (it wrote nothing; the entry waits for the next one)."""
        if not conn.in_transaction():
            return None
        entry = take_pending_audit()
        if entry is None:
            return None
        try:
            await append_audit(conn, self, entry, time.time_ns() // 1_000_000)
        except BaseException:
            entry.written = False
            raise
        return entry

    async def run_sync(self, fn: Callable[[sa.Connection], R], *, write: bool) -> R:
        """Run ``fn`` (e.g. an Alembic upgrade) on a synchronous view of one connection, in
        one transaction."""
        async with self.tx(write=write) as conn:
            return await conn.run_sync(fn)

    async def notify(self, conn: AsyncConnection, keys: Sequence[str]) -> None:
        """Wake-ups for the other replicas, sent when ``conn``'s transaction commits."""
        if self.postgres and keys:
            await conn.execute(_NOTIFY, {"channel": CHANNEL, "payload": payload_for(keys)})

    async def close(self) -> None:
        """Dispose of the engines and release the process lock (even when disposing fails)."""
        try:
            await self.engine.dispose()
            if self._on_loop is not None:
                self._on_loop.dispose()
        finally:
            if self._process_lock is not None:
                self._process_lock.release()
