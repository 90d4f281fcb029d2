"""A circuit breaker per channel, deciding which deliveries to attempt.

After ``threshold`` consecutive failed attempts on a channel its breaker opens: deliveries
to it are deferred (not attempted, no attempt counted) until ``reset`` has passed. Then one
delivery is let through as a probe; its success closes the breaker, its failure opens it
for another ``reset``. The state is per coordinator process (each replica learns on its
own that an endpoint is down). Each is a ``coordinator.breakers.Breaker`` (the primitive
the task types' breakers use too); counting the one probe is ours.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from coordinator.breakers import Breaker, MemoryStorage
from coordinator.model import BreakerState


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
        self._breakers: dict[str, Breaker] = {}
        self._probing: set[str] = set()

    def _get(self, channel_id: str) -> Breaker:
        found = self._breakers.get(channel_id)
        if found is None:
            found = self._breakers[channel_id] = Breaker(
                channel_id,
                MemoryStorage(self._clock),
                failure_threshold=self._threshold,
                reset_timeout=self._reset,
            )
        return found

    def state(self, channel_id: str) -> str:
        """``closed``, ``open`` or ``half-open``."""
        return str(self._get(channel_id).state)

    def admit(self, channel_id: str) -> datetime | None:
        """None when an attempt on this channel may go ahead now (call ``record`` after
        it); otherwise the time until which its deliveries should wait."""
        breaker = self._get(channel_id)
        if breaker.state is BreakerState.CLOSED:
            return None
        if channel_id in self._probing:
            return self._clock() + min(self._reset, timedelta(seconds=1))
        gate = breaker.gate(self._clock())
        if gate.blocked:
            return gate.until
        self._probing.add(channel_id)  # the one probe
        return None

    def record(self, channel_id: str, ok: bool) -> None:
        """The outcome of an admitted attempt."""
        self._probing.discard(channel_id)
        self._get(channel_id).record(ok)

    def release(self, channel_id: str) -> None:
        """An admitted attempt that never reached the endpoint (its destination was
        refused): no outcome for the breaker, and the next delivery may be the probe."""
        self._probing.discard(channel_id)
