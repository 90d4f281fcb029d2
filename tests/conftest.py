"""Fixtures shared by every test directory: databases for the store.

- ``postgres_url``: the admin URL of a reachable PostgreSQL (TRELLIS_TEST_POSTGRES_URL);
  skips when there is none, fails instead when CI=true.
- ``db_url``: a fresh, empty database per test, once on SQLite and once on PostgreSQL,
  as a user-facing URL (``sqlite:///...``, ``postgresql://...``) that can also be handed
  to a coordinator process through TRELLIS_DATABASE_URL.
- ``store``: the store contract's subject, once per store: ``open_store`` on a fresh SQLite
  file and PostgreSQL database, and a ``MemoryStore``; closed after the test. A test about
  the SQL store itself (its schema, transactions, SQLite's lock, PostgreSQL's concurrency
  across connections) is marked ``sql_only("why")`` and skipped on the memory store.
  Its SQLite file starts as a copy of one migrated once per session (``migrated_sqlite``):
  migrating a new file costs more than most tests that use it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql
from sqlalchemy.engine import make_url

from coordinator.dispatch._redis import display_url
from coordinator.service import Store
from coordinator.store import MemoryStore, migrate, open_store
from tests.support.procs import ADMIN_KEY

# Clients the tests build in this process (the SDK's Worker and Client, the CLI's main)
# send the test coordinators' admin key unless a test says otherwise.
os.environ["TRELLIS_API_KEY"] = ADMIN_KEY

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


def _libpq_url(url: str, *, database: str | None = None) -> str:
    """``url`` in the form libpq and TRELLIS_DATABASE_URL accept (no ``+driver``)."""
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """Admin URL of the test PostgreSQL server (a database we may CREATE DATABASE from)."""
    url = _libpq_url(os.environ.get("TRELLIS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL))
    try:
        with psycopg.connect(url, connect_timeout=5):
            pass
    except psycopg.Error as exc:
        shown = make_url(url).render_as_string(hide_password=True)
        message = (
            f"PostgreSQL not reachable at {shown} ({exc}): start it "
            "(pg_ctlcluster <version> main start) or set TRELLIS_TEST_POSTGRES_URL; "
            "CI=true makes these tests mandatory"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"trellis_t_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _libpq_url(postgres_url, database=name)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


_SQL = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _fresh_db_url(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'trellis.db'}"
    url: str = request.getfixturevalue("fresh_postgres_url")
    return url


@pytest.fixture(params=_SQL)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL to a fresh, empty database: a SQLite file, then a new PostgreSQL database."""
    return _fresh_db_url(request, tmp_path, request.param)


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite database at the newest schema, made once per session."""
    path = tmp_path_factory.mktemp("migrated") / "trellis.db"
    # On a thread of its own: the first async test that asks for it runs on the event loop.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, migrate(f"sqlite:///{path}")).result()
    assert not path.with_name(path.name + "-wal").exists()  # all of it is in the one file
    return path


@pytest.fixture(params=[*_SQL, "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh store: on SQLite, on PostgreSQL, and in memory (``sql_only`` tests skip it)."""
    if request.param == "memory":
        marker = request.node.get_closest_marker("sql_only")
        if marker is not None:
            pytest.skip(f"SQL store only: {marker.kwargs.get('reason') or marker.args[0]}")
        opened: Store = MemoryStore()
    else:
        url = _fresh_db_url(request, tmp_path, request.param)
        if request.param == "sqlite":
            template: Path = request.getfixturevalue("migrated_sqlite")
            shutil.copyfile(template, tmp_path / "trellis.db")
        opened = await open_store(url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the test Redis (TRELLIS_TEST_REDIS_URL); shared with others: tests use their
    own key prefixes and never flush it. Skips when unreachable, fails instead when CI=true."""
    url = os.environ.get("TRELLIS_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        message = (
            f"Redis not reachable at {display_url(url)} ({exc}): start it "
            "(redis-server --daemonize yes) or set TRELLIS_TEST_REDIS_URL; "
            "CI=true makes these tests mandatory"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    finally:
        client.close()
    return url
