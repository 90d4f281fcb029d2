"""Executions as clients and operators see them: read, list, watch; cancel, pause and
resume an execution or one node; dead letters listed and redriven."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from coordinator import engine
from coordinator.errors import FailedPrecondition, InvalidArgument, Unavailable
from coordinator.model import (
    DeadLetter,
    Event,
    Execution,
    ExecutionFilter,
    NodeRun,
)
from coordinator.service._backpressure import WatchSlots
from coordinator.service._common import Draining, clamp_page_size, decode_cursor, page_of
from coordinator.service._definitions import Definitions
from coordinator.service._notifier import Notifier, execution_key
from coordinator.service._transactions import Transactions, TransitionStep
from coordinator.service.ports import DeadLetterRepository, ExecutionRepository

log = logging.getLogger(__name__)

R = TypeVar("R")

# Most events one WatchExecution message carries (and one store read returns).
WATCH_PAGE = 100


@dataclass(frozen=True)
class ExecutionView:
    execution: Execution
    nodes: tuple[NodeRun, ...]


class Executions:
    def __init__(
        self,
        store: ExecutionRepository,
        definitions: Definitions,
        notifier: Notifier,
        draining: Draining,
        *,
        watch_slots: WatchSlots | None = None,
    ) -> None:
        self._store = store
        self._watch_slots = watch_slots
        # One read at a time by all the watches of this replica, each followed by a turn of
        # the event loop: many watches of long histories take turns with each other and with
        # every other call (a SQLite read runs on the loop's own thread).
        self._watch_turn = asyncio.Lock()
        self._definitions = definitions
        self._notifier = notifier
        self._draining = draining

    async def get_execution(self, tenant_id: str, execution_id: str) -> ExecutionView:
        execution = await self._store.get_execution(tenant_id, execution_id)
        nodes = await self._store.list_node_runs(tenant_id, execution_id)
        defn = await self._definitions.of(execution)
        order = {n.id: i for i, n in enumerate(engine.effective_definition(defn, execution).nodes)}
        nodes.sort(key=lambda n: order.get(n.node_id, len(order)))
        return ExecutionView(execution, tuple(nodes))

    async def list_executions(
        self,
        tenant_id: str,
        where: ExecutionFilter,
        *,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Execution], str]:
        problems = where.problems()
        if problems:
            raise InvalidArgument("; ".join(problems))
        limit = clamp_page_size(page_size)
        before = decode_cursor(page_token) if page_token else None
        rows = await self._store.list_executions(tenant_id, where, limit=limit + 1, before=before)
        return page_of(rows, limit)

    async def watch_execution(
        self,
        tenant_id: str,
        execution_id: str,
        after_sequence: int,
        *,
        caller: str = "",
        fallback: float = 2.0,
    ) -> AsyncGenerator[list[Event] | Execution, None]:
        """Yield the events after ``after_sequence`` in pages of at most ``WATCH_PAGE`` (in
        sequence order); end with the execution once it is terminal.

        Woken by in-process notifications; ``fallback`` bounds the wait so events written
        by another replica are seen too. The caller consumes each page before the next is
        read, so a slow reader holds one page, not the history. ``caller`` (who watches)
        counts against the watch slots, when the coordinator has them.
        """
        if self._watch_slots is None:
            async for item in self._watch(tenant_id, execution_id, after_sequence, fallback):
                yield item
            return
        with self._watch_slots.admit(caller or tenant_id):
            async for item in self._watch(tenant_id, execution_id, after_sequence, fallback):
                yield item

    async def _watch(
        self, tenant_id: str, execution_id: str, after_sequence: int, fallback: float
    ) -> AsyncGenerator[list[Event] | Execution, None]:
        execution = await self._execution(tenant_id, execution_id)  # NotFound early
        after = after_sequence
        # Sequences are assigned at insert and become visible at commit, so an event of a
        # concurrent claim may appear below one already sent: once the execution has ended
        # (nothing more can commit), such stragglers are sent. A watch that starts on an
        # ended execution cannot miss any: it keeps no record of what it sent.
        seen: set[int] | None = None if execution.status.terminal else set()
        with self._notifier.listen([execution_key(execution_id)]) as wake:
            while True:
                wake.clear()
                events = await self._history(tenant_id, execution_id, after)
                if events:
                    after = max(after, *(event.sequence for event in events))
                    if seen is not None:
                        seen.update(event.sequence for event in events)
                    yield events
                if len(events) == WATCH_PAGE:
                    continue
                execution = await self._execution(tenant_id, execution_id)
                if execution.status.terminal:
                    if seen is not None:
                        async for missed in self._stragglers(
                            tenant_id, execution_id, after_sequence, seen
                        ):
                            yield missed
                    yield execution
                    return
                if self._draining():
                    raise Unavailable("coordinator is shutting down; watch again to resume")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), fallback)

    async def _history(self, tenant_id: str, execution_id: str, after: int) -> list[Event]:
        return await self._in_turn(
            lambda: self._store.list_events(tenant_id, execution_id, after, WATCH_PAGE)
        )

    async def _execution(self, tenant_id: str, execution_id: str) -> Execution:
        return await self._in_turn(lambda: self._store.get_execution(tenant_id, execution_id))

    async def _in_turn(self, read: Callable[[], Awaitable[R]]) -> R:
        """``read()`` in the watches' turn, then a turn of the event loop for the others."""
        async with self._watch_turn:
            result = await read()
            await asyncio.sleep(0)
        return result

    async def _stragglers(
        self, tenant_id: str, execution_id: str, after: int, seen: set[int]
    ) -> AsyncGenerator[list[Event], None]:
        """The events after ``after`` not in ``seen``, read and sent a page at a time."""
        while True:
            page = await self._history(tenant_id, execution_id, after)
            missed = [event for event in page if event.sequence not in seen]
            if missed:
                yield missed
            if len(page) < WATCH_PAGE:
                return
            after = max(event.sequence for event in page)


class Operations:
    """What an operator does to a running execution; each returns the execution after."""

    def __init__(self, transactions: Transactions, executions: Executions) -> None:
        self._tx = transactions
        self._executions = executions

    async def _apply(
        self, tenant_id: str, execution_id: str, step: TransitionStep
    ) -> ExecutionView:
        await self._tx.run_step(tenant_id, execution_id, step)
        return await self._executions.get_execution(tenant_id, execution_id)

    async def cancel_execution(
        self, tenant_id: str, execution_id: str, reason: str
    ) -> ExecutionView:
        why = reason or "cancelled by request"
        return await self._apply(
            tenant_id, execution_id, lambda d, e, n, now: engine.cancel_execution(d, e, n, why, now)
        )

    async def cancel_node(
        self, tenant_id: str, execution_id: str, node_id: str, reason: str
    ) -> ExecutionView:
        why = reason or "cancelled by request"
        return await self._apply(
            tenant_id,
            execution_id,
            lambda d, e, n, now: engine.cancel_node(d, e, n, node_id, why, now),
        )

    async def pause_execution(self, tenant_id: str, execution_id: str) -> ExecutionView:
        return await self._apply(tenant_id, execution_id, engine.pause_execution)

    async def resume_execution(self, tenant_id: str, execution_id: str) -> ExecutionView:
        return await self._apply(tenant_id, execution_id, engine.resume_execution)

    async def pause_node(self, tenant_id: str, execution_id: str, node_id: str) -> ExecutionView:
        return await self._apply(
            tenant_id, execution_id, lambda d, e, n, now: engine.pause_node(d, e, n, node_id, now)
        )

    async def resume_node(self, tenant_id: str, execution_id: str, node_id: str) -> ExecutionView:
        return await self._apply(
            tenant_id, execution_id, lambda d, e, n, now: engine.resume_node(d, e, n, node_id, now)
        )


class DeadLetters:
    def __init__(
        self, store: DeadLetterRepository, transactions: Transactions, executions: Executions
    ) -> None:
        self._store = store
        self._tx = transactions
        self._executions = executions

    async def list_dead_letters(
        self,
        tenant_id: str,
        *,
        workflow_name: str | None,
        task_type: str | None,
        include_redriven: bool,
        page_size: int,
        page_token: str,
    ) -> tuple[list[DeadLetter], str]:
        limit = clamp_page_size(page_size)
        rows = await self._store.list_dead_letters(
            tenant_id,
            workflow_name=workflow_name,
            task_type=task_type,
            include_redriven=include_redriven,
            limit=limit + 1,
            before=decode_cursor(page_token) if page_token else None,
        )
        return page_of(rows, limit)

    async def get_dead_letter(self, tenant_id: str, dead_letter_id: str) -> DeadLetter:
        return await self._store.get_dead_letter(tenant_id, dead_letter_id)

    async def redrive_dead_letter(self, tenant_id: str, dead_letter_id: str) -> ExecutionView:
        """Run the dead-lettered node again with a fresh attempt budget; the execution rolls
        forward from there (finished nodes are not run again)."""
        letter = await self._store.get_dead_letter(tenant_id, dead_letter_id)
        if letter.redriven_at is not None:
            raise FailedPrecondition(
                f"dead letter '{dead_letter_id}' was already redriven at "
                f"{letter.redriven_at.isoformat()}"
            )
        await self._tx.run_step(
            tenant_id,
            letter.execution_id,
            lambda d, e, n, now: engine.redrive(d, e, n, letter.node_id, letter.id, now),
        )
        log.info(
            "dead letter redriven",
            extra={"execution_id": letter.execution_id, "node_id": letter.node_id},
        )
        return await self._executions.get_execution(tenant_id, letter.execution_id)
