"""Persistent state on SQLAlchemy: SQLite (embedded default) and PostgreSQL (production).

The only package of the coordinator that imports SQLAlchemy. ``open_store(url)`` returns a
``SqlStore`` implementing ``coordinator.service.ports.Store``; Alembic migrations in
``migrations/`` own the schema.
"""

from coordinator.store._lock import StoreLockedError
from coordinator.store._memory import MemoryStore
from coordinator.store._open import migrate, open_store
from coordinator.store._sql import SqlStore
from coordinator.store._url import normalize_database_url

__all__ = [
    "MemoryStore",
    "SqlStore",
    "StoreLockedError",
    "migrate",
    "normalize_database_url",
    "open_store",
]
