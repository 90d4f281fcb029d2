"""Cross-replica wake-ups over PostgreSQL LISTEN/NOTIFY: ``SqlWakeups``.

A replica that makes work ready publishes the notifier keys (``task:<type>``,
``exec:<id>``) on one channel (``Database.notify``, with the transaction that made the work
ready, or ``publish_wakeups``); every replica listens on a dedicated connection and hands
the keys to its in-process notifier, so a long-poll on one replica is woken by work made
ready on another without polling the database. After (re)connecting the listener wakes
everyone once, since notifications sent while it was away are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import psycopg

from coordinator.store._db import CHANNEL, WAKE_ALL, Database

log = logging.getLogger(__name__)


class SqlWakeups:
    """The ``WakeupChannel`` port: NOTIFY to publish, a ``PgListener`` to listen (PostgreSQL);
    nothing to do on SQLite, which serves one process."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._listener: PgListener | None = None

    async def publish_wakeups(self, keys: Sequence[str]) -> None:
        if not self._db.postgres or not keys:
            return  # SQLite serves one process: the in-process notifier is enough
        async with self._db.tx(write=True) as conn:
            await self._db.notify(conn, keys)

    @property
    def listening(self) -> bool:
        """True while the cross-replica wake-up listener is connected (PostgreSQL)."""
        return self._listener is not None and self._listener.connected.is_set()

    async def listen_wakeups(self, on_keys: Callable[[list[str]], None]) -> None:
        if not self._db.postgres or self._listener is not None:
            return
        url = self._db.engine.url.set(drivername="postgresql")
        self._listener = PgListener(url.render_as_string(hide_password=False))
        self._listener.start(on_keys)

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()


class PgListener:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self, on_keys: Callable[[list[str]], None]) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(on_keys), name="trellis-wakeups")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, on_keys: Callable[[list[str]], None]) -> None:
        delay = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.1
                    self.connected.set()
                    on_keys([WAKE_ALL])
                    async for note in conn.notifies():
                        on_keys(note.payload.split("\n"))
            except (psycopg.Error, OSError) as exc:
                self.connected.clear()
                log.warning("wake-up listener lost its connection (%s); reconnecting", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
