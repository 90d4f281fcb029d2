"""``OnLoopConnection``: an ``AsyncConnection`` over a synchronous SQLite connection, whose
statements run right on the event loop's thread.

The store is written once against ``AsyncConnection``. For a SQLite file that costs a thread
hand-off per statement through aiosqlite: ~0.45 ms, against ~0.03 ms for the statement itself
(measured in bench/, docs/performance.md). SQLite is in-process and answers in microseconds,
and one process owns the file (``ProcessLock``), so running it on the loop blocks nothing
that matters. This class keeps the async interface and skips the hand-off.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncConnection


class OnLoopConnection(AsyncConnection):
    """``execute``/``scalar`` call the synchronous connection directly (AsyncConnection's own
    would insist on an async driver); the rest (``rollback``, ``begin_nested``, ``run_sync``)
    goes through a greenlet that pysqlite never suspends, so it completes on the spot."""

    async def execute(
        self,
        statement: Any,
        parameters: Any = None,
        *,
        execution_options: Any = None,
    ) -> CursorResult[Any]:
        return self._proxied.execute(statement, parameters, execution_options=execution_options)

    async def scalar(
        self,
        statement: Any,
        parameters: Any = None,
        *,
        execution_options: Any = None,
    ) -> Any:
        return self._proxied.scalar(statement, parameters, execution_options=execution_options)
