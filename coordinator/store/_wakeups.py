"""Cross-replica wake-ups over PostgreSQL LISTEN/NOTIFY.

A replica that makes work ready publishes the notifier keys (``task:<type>``,
``exec:<id>``) on one channel; every replica listens on a dedicated connection and hands
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

log = logging.getLogger(__name__)

CHANNEL = "trellis_wakeups"
WAKE_ALL = "*"
# PostgreSQL caps a NOTIFY payload below 8000 bytes; larger key sets wake everyone.
_MAX_PAYLOAD = 7000


def payload_for(keys: Sequence[str]) -> str:
    text = "\n".join(dict.fromkeys(keys))
    return text if len(text.encode()) <= _MAX_PAYLOAD else WAKE_ALL


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
