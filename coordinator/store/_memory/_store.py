"""``MemoryStore``: the ``Store`` port in memory, one process, nothing persisted."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from coordinator.store import _rows
from coordinator.store._memory._executions import MemoryExecutions
from coordinator.store._memory._identity import MemoryAudit, MemoryIdentity
from coordinator.store._memory._leases import MemoryLeases
from coordinator.store._memory._notifications import MemoryNotifications
from coordinator.store._memory._queue import MemoryQueue
from coordinator.store._memory._records import (
    MemoryDeadLetters,
    MemoryLimits,
    MemoryWorkers,
    MemoryWorkflows,
)
from coordinator.store._memory._secrets import MemorySecrets
from coordinator.store._memory._state import State
from coordinator.store._memory._triggers import MemoryTriggers


class MemoryWakeups:
    """The ``WakeupChannel`` port for one process: the in-process notifier is enough."""

    async def publish_wakeups(self, keys: Sequence[str]) -> None:
        return None

    async def listen_wakeups(self, on_keys: Callable[[list[str]], None]) -> None:
        return None


class MemoryStore:
    """The ``Store`` port in memory: the repositories over one shared ``State``, each method
    atomic under its lock. For tests and embedding (``open_store("memory://")``); it keeps
    nothing past the process and serves one coordinator.

    Reads return what the SQL store would (times truncated to the millisecond); rows are
    frozen copies, so a caller cannot change the state behind the store's back.
    """

    def __init__(self, *, priority_aging_ms: int = _rows.DEFAULT_PRIORITY_AGING_MS) -> None:
        self._state = State(priority_aging_ms)
        self._wakeups = MemoryWakeups()
        self._workflows = MemoryWorkflows(self._state)
        self._executions = MemoryExecutions(self._state)
        self._leases = MemoryLeases(self._state)
        self._dead_letters = MemoryDeadLetters(self._state)
        self._workers = MemoryWorkers(self._state)
        self._limits = MemoryLimits(self._state)
        self._queue = MemoryQueue(self._state)
        self._triggers = MemoryTriggers(self._state)
        self._notifications = MemoryNotifications(self._state)
        self._identity = MemoryIdentity(self._state)
        self._audit = MemoryAudit(self._state)
        self._secrets = MemorySecrets(self._state)

    @property
    def priority_aging_ms(self) -> int:
        """Dispatch order with ageing: one priority step is worth this much waiting (ms),
        applied to the rows written from now on (as on the SQL store)."""
        return self._state.priority_aging_ms

    @priority_aging_ms.setter
    def priority_aging_ms(self, value: int) -> None:
        self._state.priority_aging_ms = value

    @property
    def wakeups(self) -> MemoryWakeups:
        return self._wakeups

    @property
    def workflows(self) -> MemoryWorkflows:
        return self._workflows

    @property
    def executions(self) -> MemoryExecutions:
        return self._executions

    @property
    def leases(self) -> MemoryLeases:
        return self._leases

    @property
    def dead_letters(self) -> MemoryDeadLetters:
        return self._dead_letters

    @property
    def workers(self) -> MemoryWorkers:
        return self._workers

    @property
    def limits(self) -> MemoryLimits:
        return self._limits

    @property
    def queue(self) -> MemoryQueue:
        return self._queue

    @property
    def triggers(self) -> MemoryTriggers:
        return self._triggers

    @property
    def notifications(self) -> MemoryNotifications:
        return self._notifications

    @property
    def identity(self) -> MemoryIdentity:
        return self._identity

    @property
    def audit(self) -> MemoryAudit:
        return self._audit

    @property
    def secrets(self) -> MemorySecrets:
        return self._secrets

    @property
    def group_commit(self) -> bool:
        """No: a transition here costs no round trip that sharing would save."""
        return False

    async def close(self) -> None:
        return None
