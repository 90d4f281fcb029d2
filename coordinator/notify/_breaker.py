"""A circuit breaker per channel (pybreaker), deciding which deliveries to attempt.

After ``threshold`` consecutive failed attempts on a channel its breaker opens: deliveries
to it are deferred (not attempted, no attempt counted) until ``reset`` has passed. Then one
delivery is let through as a probe; its success closes the breaker, its failure opens it
for another ``reset``. The state is per coordinator process (each replica learns on its
own that an endpoint is down).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pybreaker

from coordinator.dispatch._breakers import record_outcome


class _Opened(pybreaker.CircuitBreakerListener):
    """Remembers when a breaker opened (pybreaker keeps it in private storage)."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.at: datetime | None = None
        self._clock = clock

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        if new_state.name == pybreaker.STATE_OPEN:
            self.at = self._clock()


class ChannelBreakers:
    def __init__(
        self,
        threshold: int = 5,
        reset: timedelta = timedelta(seconds=30),
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._threshold = threshold
        self._reset = reset
        self._clock = clock
        self._breakers: dict[str, tuple[pybreaker.CircuitBreaker, _Opened]] = {}
        self._probing: set[str] = set()

    def _get(self, channel_id: str) -> tuple[pybreaker.CircuitBreaker, _Opened]:
        found = self._breakers.get(channel_id)
        if found is None:
            opened = _Opened(self._clock)
            breaker = pybreaker.CircuitBreaker(
                fail_max=self._threshold,
                reset_timeout=self._reset.total_seconds(),
                listeners=[opened],
                name=channel_id,
            )
            found = self._breakers[channel_id] = (breaker, opened)
        return found

    def state(self, channel_id: str) -> str:
        """``closed``, ``open`` or ``half-open``."""
        return str(self._get(channel_id)[0].current_state)

    def admit(self, channel_id: str) -> datetime | None:
        """None when an attempt on this channel may go ahead now (call ``record`` after
        it); otherwise the time until which its deliveries should wait."""
        breaker, opened = self._get(channel_id)
        state = breaker.current_state
        if state == pybreaker.STATE_CLOSED:
            return None
        if channel_id in self._probing:
            return self._clock() + min(self._reset, timedelta(seconds=1))
        if state == pybreaker.STATE_OPEN:
            until = (opened.at or self._clock()) + self._reset
            if self._clock() < until:
                return until
            breaker.half_open()
        self._probing.add(channel_id)  # the one probe
        return None

    def record(self, channel_id: str, ok: bool) -> None:
        """The outcome of an admitted attempt."""
        breaker, _opened = self._get(channel_id)
        self._probing.discard(channel_id)
        record_outcome(breaker, ok)
