"""Group commit: concurrent transitions (worker results) share one database transaction.

On PostgreSQL a transition is a handful of statements, but each transaction also pays its
own BEGIN, COMMIT (a WAL flush) and pool checkout: round trips that cost more than the
statements. On SQLite the per-transaction work (begin, commit, SQLAlchemy's bookkeeping)
and the per-statement work are both paid once per group instead of once per result.
Results that arrive while a group is committing wait for it and go together in the next
one (``Store.transact_many``), so under load a commit serves many results and an idle
coordinator still commits each at once. A group that cannot commit as one (a
conflict, the database) is run again one by one, so nobody sees a difference but speed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from coordinator.errors import TrellisError
from coordinator.model import Execution, NodeRun
from coordinator.service._audit import PENDING_AUDIT
from coordinator.service.ports import Decision, ExecutionRepository

log = logging.getLogger(__name__)

T = TypeVar("T")

# Most transitions in one group (one transaction).
MAX_GROUP = 64


@dataclass
class _Item(Generic[T]):
    tenant_id: str
    execution_id: str
    decide: Callable[[Execution, Mapping[str, NodeRun]], Decision[T]]
    done: asyncio.Future[T]


class GroupCommit:
    """``transact`` with the ``Store.transact`` contract, grouped (see the module doc)."""

    def __init__(self, store: ExecutionRepository, max_group: int = MAX_GROUP) -> None:
        self._store = store
        self._max = max_group
        self._queue: list[_Item[Any]] = []
        self._runner: asyncio.Task[None] | None = None

    async def transact(
        self,
        tenant_id: str,
        execution_id: str,
        decide: Callable[[Execution, Mapping[str, NodeRun]], Decision[T]],
    ) -> T:
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(tenant_id, execution_id, decide, done))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="trellis-group-commit")
        return await done

    async def _run(self) -> None:
        # This task was started by one caller and carries its context: none of the group's
        # transactions is that caller's alone, so none takes its pending audit entry.
        PENDING_AUDIT.set(None)
        while self._queue:
            group, self._queue = self._queue[: self._max], self._queue[self._max :]
            live = [item for item in group if not item.done.done()]  # not cancelled
            try:
                await self._commit(live)
            except BaseException as exc:  # never leave a caller waiting
                for item in live:
                    if not item.done.done():
                        item.done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise

    async def _commit(self, group: list[_Item[Any]]) -> None:
        results: list[Any] | None = None
        if len(group) > 1:
            try:
                results = await self._store.transact_many(
                    [(i.tenant_id, i.execution_id, i.decide) for i in group]
                )
            except Exception:
                log.exception("group commit failed; committing one by one")
        if results is None:
            for item in group:
                await self._one(item)
            return
        for item, result in zip(group, results, strict=True):
            if item.done.done():
                continue
            if isinstance(result, TrellisError):
                item.done.set_exception(result)
            else:
                item.done.set_result(result)

    async def _one(self, item: _Item[Any]) -> None:
        try:
            result = await self._store.transact(item.tenant_id, item.execution_id, item.decide)
        except Exception as exc:
            if not item.done.done():
                item.done.set_exception(exc)
            return
        if not item.done.done():
            item.done.set_result(result)
