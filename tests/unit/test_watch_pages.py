"""WatchExecution in the service layer (in-memory store): history in bounded pages, every
event once, and the bound on open watches (WatchSlots)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest

from coordinator.errors import ResourceExhausted
from coordinator.model import Event, EventType, Execution, ExecutionStatus, Transition
from coordinator.service import Coordinator, WatchSlots
from coordinator.service._executions import WATCH_PAGE
from coordinator.service.ports import Decision
from coordinator.store import MemoryStore
from tests.support.store_builders import NOW, T, make_execution
from tests.support.wait import wait_for


def _events(execution: Execution, count: int) -> tuple[Event, ...]:
    return tuple(
        Event(execution.id, EventType.NODE_READY, NOW, tenant_id=T, node_id=f"n{i}")
        for i in range(count)
    )


async def _create(c: Coordinator, status: ExecutionStatus, events: int) -> Execution:
    execution = make_execution(f"e-{status.name.lower()}", status=status)
    created, _ = await c.store.executions.create_execution(
        Transition(execution=execution, events=_events(execution, events))
    )
    return created


async def test_an_ended_execution_is_sent_in_pages_then_the_execution() -> None:
    c = Coordinator(MemoryStore())
    execution = await _create(c, ExecutionStatus.SUCCEEDED, 2 * WATCH_PAGE + 34)
    items = [item async for item in c.executions.watch_execution(T, execution.id, 0)]
    *pages, last = items
    assert isinstance(last, Execution) and last.status is ExecutionStatus.SUCCEEDED
    assert [len(page) for page in pages] == [WATCH_PAGE, WATCH_PAGE, 34]
    sequences = [event.sequence for page in pages for event in page]  # type: ignore[union-attr]
    assert sequences == sorted(set(sequences))


async def test_a_running_execution_is_followed_to_its_end_with_every_event_once() -> None:
    c = Coordinator(MemoryStore())
    execution = await _create(c, ExecutionStatus.RUNNING, WATCH_PAGE + 100)
    got: list[Event | Execution] = []

    async def watch() -> None:
        async for item in c.executions.watch_execution(T, execution.id, 0, fallback=0.05):
            got.extend(item if isinstance(item, list) else [item])

    watcher = asyncio.create_task(watch())
    await wait_for(lambda: len(got) == WATCH_PAGE + 100)

    def finish(loaded: Execution, nodes: object) -> Decision[None]:
        ended = dataclasses.replace(loaded, status=ExecutionStatus.SUCCEEDED)
        done = Event(execution.id, EventType.EXECUTION_SUCCEEDED, NOW, tenant_id=T)
        return Decision(Transition(execution=ended, events=(done,)), None)

    await c.store.executions.transact(T, execution.id, finish)
    await asyncio.wait_for(watcher, 10)
    events = [item for item in got if isinstance(item, Event)]
    assert len(events) == WATCH_PAGE + 101
    assert len({e.sequence for e in events}) == len(events)
    assert events[-1].type is EventType.EXECUTION_SUCCEEDED
    assert isinstance(got[-1], Execution)


async def test_watches_past_the_caps_are_refused_and_their_slots_come_back() -> None:
    c = Coordinator(MemoryStore(), watch_slots=WatchSlots(total=3, per_caller=2))
    execution = await _create(c, ExecutionStatus.RUNNING, 1)

    async def hold(caller: str) -> None:
        async for _ in c.executions.watch_execution(T, execution.id, 0, caller=caller):
            pass

    a1, a2, b1 = (asyncio.create_task(hold(who)) for who in ("a", "a", "b"))
    slots = c.executions._watch_slots
    assert slots is not None
    await wait_for(lambda: slots.open == 3)
    with pytest.raises(ResourceExhausted, match="for this caller \\(2, TRELLIS_MAX_WATCHES_PER"):
        await anext(c.executions.watch_execution(T, execution.id, 0, caller="a"))
    with pytest.raises(ResourceExhausted, match="on this replica \\(3, TRELLIS_MAX_WATCHES\\)"):
        await anext(c.executions.watch_execution(T, execution.id, 0, caller="c"))
    for task in (a1, a2, b1):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert slots.open == 0
    again = c.executions.watch_execution(T, execution.id, 0, caller="a")
    first = await anext(again)
    assert isinstance(first, list) and len(first) == 1
    await again.aclose()
    assert slots.open == 0


def test_watch_slots_need_positive_limits() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        WatchSlots(0, 1)
