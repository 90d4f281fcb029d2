"""The circuit breaker primitive (pybreaker) behind the per-task-type breakers of
``coordinator.dispatch`` and the per-channel breakers of ``coordinator.notify``.

pybreaker counts the consecutive failures and makes the transitions (CLOSED → OPEN at the
threshold, HALF_OPEN → CLOSED on a success, HALF_OPEN → OPEN on a failure). The OPEN →
HALF_OPEN move is ours (``Breaker.gate``), decided with the injected clock and the stored
``opened_at``; pybreaker's own would use its clock. Outcomes that arrive while a breaker
is OPEN (of attempts let through before it opened) change nothing.

Where the state lives is the storage's business: ``MemoryStorage`` per process, or any
``pybreaker.CircuitBreakerStorage`` whose ``opened_at`` setter records our clock's time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import pybreaker

from coordinator.model import BreakerState


@dataclass(frozen=True)
class BreakerGate:
    """What a caller may do through a breaker now."""

    state: BreakerState
    # OPEN: when a probe may go (the caller's wait hint).
    until: datetime | None = None

    @property
    def blocked(self) -> bool:
        return self.state is BreakerState.OPEN


class MemoryStorage(pybreaker.CircuitMemoryStorage):
    """Per-process state; ``opened_at`` comes from our clock (pybreaker passes its own
    ``datetime.now``), so that tests can move time."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self._clock = clock

    @property
    def opened_at(self) -> datetime | None:
        return self._opened_at

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._opened_at = self._clock()


class _AttemptFailed(Exception):
    pass


def _fail() -> None:
    raise _AttemptFailed


def _ok() -> None:
    return None


class Breaker:
    """One circuit breaker: a pybreaker breaker over ``storage``, fed outcomes rather than
    wrapping calls."""

    reset_timeout: timedelta

    def __init__(
        self,
        name: str,
        storage: pybreaker.CircuitBreakerStorage,
        *,
        failure_threshold: int,
        reset_timeout: timedelta,
    ) -> None:
        self.storage = storage
        self._breaker = pybreaker.CircuitBreaker(state_storage=storage, name=name)
        self.configure(failure_threshold, reset_timeout)

    def configure(self, failure_threshold: int, reset_timeout: timedelta) -> None:
        """Pick up the current settings (they may change while the breaker lives)."""
        self._breaker.fail_max = failure_threshold
        self._breaker.reset_timeout = reset_timeout.total_seconds()
        self.reset_timeout = reset_timeout

    @property
    def state(self) -> BreakerState:
        return BreakerState(self.storage.state)

    @property
    def failure_count(self) -> int:
        return self.storage.counter

    @property
    def opened_at(self) -> datetime | None:
        return self.storage.opened_at

    def gate(self, now: datetime) -> BreakerGate:
        """CLOSED: go freely. OPEN: hold until ``until``. Once ``reset_timeout`` has passed
        since it opened the breaker moves to HALF_OPEN, where the caller lets one probe
        through (how it counts probes is its own)."""
        state = self.storage.state
        if state == pybreaker.STATE_CLOSED:
            return BreakerGate(BreakerState.CLOSED)
        if state == pybreaker.STATE_OPEN:
            opened_at = self.storage.opened_at
            # Without opened_at (state written by hand) the timeout counts as passed.
            if opened_at is not None:
                until = opened_at + self.reset_timeout
                if now < until:
                    return BreakerGate(BreakerState.OPEN, until)
            self._breaker.half_open()
        return BreakerGate(BreakerState.HALF_OPEN)

    def record(self, ok: bool) -> None:
        """The outcome of one attempt (success, or failed/timed out)."""
        # OPEN: outcomes of attempts let through before it opened change nothing (the
        # move to HALF_OPEN is gate's, on our clock; pybreaker's open state would use its
        # own).
        state = self.storage.state
        if state == pybreaker.STATE_OPEN:
            return
        if self._breaker._state.name != state:
            # Another process moved shared state: adopt it without pybreaker's
            # notification, whose "entered closed" would reset the shared count.
            self._breaker._state = self._breaker._create_new_state(state, notify=False)
        # pybreaker counts the calls it wraps: wrap one that fails or succeeds.
        with contextlib.suppress(_AttemptFailed, pybreaker.CircuitBreakerError):
            self._breaker.call(_ok if ok else _fail)

    def reset(self) -> None:
        """Close the breaker and clear its count (operator override)."""
        self._breaker.close()
        self.storage.reset_counter()
