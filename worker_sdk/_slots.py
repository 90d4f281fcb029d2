"""The worker's capacity: one count of slots, which its poller and its runner share."""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    """``capacity`` slots, one per leased task.

    A task takes a slot the moment it is leased (``claim``) and gives it back
    (``Slot.release``) once its result is delivered and its handler's thread, if any, has
    returned. That one count answers every capacity question:

    - how many tasks the next poll asks for (``free``), and when a full worker polls
      again (``wait_free``);
    - how many handlers run at once: a claim beyond ``capacity`` (the coordinator sent
      more than asked for) waits in line (``Slot.ready``) until an older one is given back.

    Make one per ``Worker.serve()`` run, inside the event loop.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held = 0
        self._queue: deque[Slot] = deque()  # claims beyond capacity, oldest first
        self._freed = asyncio.Event()

    @property
    def held(self) -> int:
        """Slots claimed and not given back (may exceed ``capacity``)."""
        return self._held

    @property
    def free(self) -> int:
        return max(self.capacity - self._held, 0)

    def claim(self) -> Slot:
        """A slot for a task just leased; ``ready()`` says when its handler may run."""
        slot = Slot(self)
        self._held += 1
        if self._held <= self.capacity:
            slot._admit()
        else:
            self._queue.append(slot)
        return slot

    async def wait_free(self) -> int:
        """Waits until at least one slot is free; returns how many are."""
        while self.free <= 0:
            self._freed.clear()
            await self._freed.wait()
        return self.free

    def _give_back(self, slot: Slot) -> None:
        self._held -= 1
        if not slot.admitted:
            self._queue.remove(slot)  # it never ran
        elif self._queue:
            self._queue.popleft()._admit()
        self._freed.set()


class Slot:
    """One leased task's claim on a slot (see ``Slots``)."""

    __slots__ = ("_released", "_slots", "_turn", "admitted")

    def __init__(self, slots: Slots) -> None:
        self._slots = slots
        self._turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._released = False
        self.admitted = False  # False while it waits in line behind older claims

    async def ready(self) -> None:
        """Waits for this claim's turn to run a handler."""
        await asyncio.shield(self._turn)

    def release(self) -> None:
        """Gives the slot back; later calls do nothing."""
        if self._released:
            return
        self._released = True
        self._slots._give_back(self)

    def _admit(self) -> None:
        self.admitted = True
        self._turn.set_result(None)
