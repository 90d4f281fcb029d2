"""Opening a store: URL → engine (with SQLite pragmas and the process lock) → migrations."""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from coordinator import errors
from coordinator.sealing import DERIVED_KID, Sealer, SealingError, derived_key, parse_keys
from coordinator.store._lock import ProcessLock
from coordinator.store._memory import MemoryStore
from coordinator.store._secrets import reseal
from coordinator.store._sql import SqlStore
from coordinator.store._url import (
    ACCEPTED_FORMS,
    display_url,
    is_memory_sqlite,
    parse_database_url,
)

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

SQLITE_BUSY_TIMEOUT_MS = 5000
POSTGRES_POOL_SIZE = 10
POSTGRES_MAX_OVERFLOW = 10
POSTGRES_CONNECT_TIMEOUT_S = 10
_MIGRATION_LOCK = 7310294841716090196  # pg_advisory_xact_lock key: "trellis migrate"
# The in-memory store's URL (tests, trying things out: nothing is kept).
MEMORY_URL = "memory://"


async def open_store(
    url: str,
    *,
    migrate: bool = True,
    priority_aging: timedelta | None = None,
    encryption_keys: str = "",
) -> SqlStore | MemoryStore:
    """Open the database at ``url`` (see ``normalize_database_url`` for the accepted forms),
    upgrading its schema to the newest revision when ``migrate``; ``memory://`` is a
    ``MemoryStore`` (nothing kept past the process).

    Secret columns are sealed with ``encryption_keys`` (``kid:base64key,...``, first =
    current; see ``coordinator.sealing``); without keys, with a key derived from the server
    secret kept in the database (``store.db.sealer.derived`` is then True). Values written
    before encryption existed are sealed now.

    A SQLite file is locked for this process until ``close()``: a second coordinator
    process on the same file gets ``StoreLockedError`` (a ``FailedPrecondition``).
    """
    if url.strip() == MEMORY_URL:
        memory = MemoryStore()
        if priority_aging is not None:
            memory.priority_aging_ms = int(priority_aging.total_seconds() * 1000)
        return memory
    sa_url = parse_database_url(url)
    backend = sa_url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise errors.InvalidArgument(
            f"unsupported database {display_url(sa_url)!r}: Trellis stores its state in "
            f"SQLite or PostgreSQL; expected {ACCEPTED_FORMS}"
        )
    process_lock: ProcessLock | None = None
    if backend == "sqlite" and not is_memory_sqlite(sa_url):
        path = _sqlite_path(sa_url)
        process_lock = ProcessLock.acquire(path)
        sa_url = sa_url.set(database=str(path))
    try:
        engine = _create_engine(sa_url)
        on_loop = _sqlite_on_loop_engine(sa_url) if process_lock is not None else None
    except BaseException:
        if process_lock is not None:
            process_lock.release()
        raise
    store = SqlStore(engine, process_lock=process_lock, on_loop=on_loop)
    if priority_aging is not None:
        store.priority_aging_ms = int(priority_aging.total_seconds() * 1000)
    try:
        if migrate:
            await store.run_sync(upgrade_to_head, write=True)
        else:
            problem = await store.run_sync(schema_problem, write=False)
            if problem is not None:
                raise errors.FailedPrecondition(problem)
        store.db.sealer = sealer = await _sealer(store, encryption_keys)
        # With keys configured, what was sealed under the key derived from the database is
        # re-sealed now, and that key is then forgotten: whoever can write the database
        # (and so read the server secret it derives from) cannot plant a sealed value.
        await reseal(store.db, _RESEAL_BATCH, only_plaintext=True, also_derived=not sealer.derived)
        sealer.accept_plaintext = False
        if not sealer.derived:
            sealer.forget(DERIVED_KID)
    except BaseException:
        await store.close()
        raise
    return store


_RESEAL_BATCH = 500


async def _sealer(store: SqlStore, encryption_keys: str) -> Sealer:
    """The configured keys (the first seals), then the key derived from the database's
    server secret: it seals when no key is configured; otherwise it opens only what the
    opening store re-seals under the configured key, and is then forgotten."""
    try:
        configured = parse_keys(encryption_keys) if encryption_keys.strip() else []
    except SealingError as exc:
        raise errors.InvalidArgument(f"TRELLIS_ENCRYPTION_KEYS: {exc}") from exc
    if any(kid == DERIVED_KID for kid, _ in configured):
        raise errors.InvalidArgument(
            f"TRELLIS_ENCRYPTION_KEYS: key id {DERIVED_KID!r} is reserved for the key derived "
            "from the database; name the key otherwise"
        )
    server_secret = await store.identity.server_secret(
        secrets.token_urlsafe(32), secret_id="encryption"
    )
    derived = (DERIVED_KID, derived_key(server_secret))
    return Sealer([*configured, derived], derived=not configured)


async def migrate(url: str, *, encryption_keys: str = "") -> None:
    """Upgrade the schema of the database at ``url`` to the newest revision (and seal the
    secret values written before encryption existed)."""
    store = await open_store(url, migrate=True, encryption_keys=encryption_keys)
    await store.close()


def alembic_config() -> Config:
    """Alembic's configuration, built in code: no alembic.ini is needed at run time."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    return config


def upgrade_to_head(connection: sa.Connection) -> None:
    """Run Alembic's upgrade on ``connection`` (inside the caller's transaction).

    On PostgreSQL a transaction-scoped advisory lock serializes replicas that start (and
    migrate) at the same time; the later ones find the schema already at head.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def schema_problem(connection: sa.Connection) -> str | None:
    """Why this code cannot run on the schema at ``connection``, or None.

    A schema behind this code's head revision is refused; one at a revision this code does
    not know (migrated by a newer release) is accepted, since migrations keep the previous
    release working during a rolling upgrade.
    """
    current = MigrationContext.configure(connection).get_current_revision()
    scripts = ScriptDirectory.from_config(alembic_config())
    head = scripts.get_current_head()
    if current == head:
        return None
    known = current is None or any(s.revision == current for s in scripts.walk_revisions())
    if not known:
        logger.warning(
            "database schema is at a revision this release does not know",
            extra={"revision": current, "head": head},
        )
        return None
    return (
        f"the database schema is at revision {current or '(none)'} but this coordinator "
        f"needs {head}: run `trellis migrate`, or start it with TRELLIS_AUTO_MIGRATE=true"
    )


def _sqlite_path(url: URL) -> Path:
    database = url.database or ""
    try:
        path = Path(database).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise errors.Unavailable(
            f"database unavailable: cannot create the directory for {database}: {exc}"
        ) from exc
    return path


def _create_engine(url: URL) -> AsyncEngine:
    try:
        if url.get_backend_name() == "sqlite":
            memory = is_memory_sqlite(url)
            engine = (
                create_async_engine(url, poolclass=StaticPool)
                if memory
                else create_async_engine(url)
            )
            _install_sqlite_hooks(engine.sync_engine, memory=memory)
            return engine
        return create_async_engine(
            url,
            pool_size=POSTGRES_POOL_SIZE,
            max_overflow=POSTGRES_MAX_OVERFLOW,
            pool_pre_ping=True,
            # A database host that drops packets fails a connect in seconds, not minutes.
            connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S},
        )
    except (sa_exc.ArgumentError, sa_exc.InvalidRequestError, ImportError) as exc:
        raise errors.InvalidArgument(
            f"cannot use the database URL {display_url(url)!r} ({exc}); expected {ACCEPTED_FORMS}"
        ) from exc


def _sqlite_on_loop_engine(url: URL) -> sa.Engine:
    """The synchronous engine a SQLite file's transactions run on, on the event loop's own
    thread (see ``Database``): a statement then costs tens of microseconds, where aiosqlite
    hands every statement to its thread and back (~0.45 ms each, measured in bench/).

    ``max_overflow=-1``: the pool never makes the loop wait for a connection (a wait would
    block the very loop the holders need to give theirs back)."""
    engine = sa.create_engine(
        url.set(drivername="sqlite+pysqlite"),
        pool_size=5,
        max_overflow=-1,
        connect_args={"check_same_thread": False},
    )
    _install_sqlite_hooks(engine, memory=False)
    return engine


def _install_sqlite_hooks(engine: sa.Engine, *, memory: bool) -> None:
    """Per-connection pragmas, and transactions begun by SQLAlchemy rather than the driver.

    The sqlite3 driver only opens a transaction before DML, so a read-then-write would not
    be atomic; with the driver in autocommit mode we emit BEGIN ourselves (the pattern the
    SQLAlchemy docs give for aiosqlite).
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                mode = cursor.fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    logger.warning("SQLite did not switch to WAL mode", extra={"mode": mode})
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN")
