"""Backpressure on one replica: a bound on waiting long polls, a token bucket on starts,
bounds on open WatchExecution streams.

All refuse with ``ResourceExhausted`` carrying ``retry_after`` (seconds), which the gRPC
layer sends as the ``retry-after-ms`` trailer. They are per process: with N replicas the
cluster admits N times as much, and a refused client may go to another replica.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from coordinator.errors import ResourceExhausted

# Tokens are floats: this much short of a whole token counts as a whole one.
_EPSILON = 1e-9

# A refused poll is told to come back after this long (a waiting slot frees when any
# poll ends, which with the default 30 s poll wait happens often under load).
POLL_RETRY_AFTER = 1.0
# A refused watch is told to come back after this long.
WATCH_RETRY_AFTER = 1.0


def _seconds(value: float) -> str:
    return f"{value:.3g}"


class PollWaiters:
    """At most ``limit`` long polls waiting at once on this replica::

        with waiters.admit():
            await ...  # wait for work

    ``admit()`` raises ResourceExhausted when ``limit`` polls are waiting already.
    Single event loop: no lock needed.
    """

    def __init__(self, limit: int, *, retry_after: float = POLL_RETRY_AFTER) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.retry_after = retry_after
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """How many polls are waiting now."""
        return self._waiting

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self._waiting >= self.limit:
            raise ResourceExhausted(
                f"too many waiting polls on this replica ({self.limit}); retry after "
                f"{_seconds(self.retry_after)} s or connect to another replica",
                retry_after=self.retry_after,
            )
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1


class StartRate:
    """A token bucket: ``rate`` starts per second on average, bursts of up to ``burst``.

    ``rate`` 0 means unlimited. ``take(n)`` takes ``n`` tokens or raises ResourceExhausted
    with the time until enough have accrued. A batch larger than ``burst`` is admitted
    when the bucket is full and leaves it in debt, so it is slowed, never refused for ever.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate >= 0 or math.isinf(rate):
            raise ValueError(f"rate must be a finite number, at least 0, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, n: int = 1) -> None:
        """Takes ``n`` tokens (``n`` starts) or raises ResourceExhausted with a retry hint."""
        if self.unlimited or n <= 0:
            return
        self._refill()
        needed = min(float(n), float(self.burst))
        if self._tokens + _EPSILON >= needed:
            self._tokens -= n
            return
        wait = (needed - self._tokens) / self.rate
        what = "a start" if n == 1 else f"{n} starts"
        raise ResourceExhausted(
            f"start rate limit of this replica ({self.rate:g}/s, burst {self.burst}) reached; "
            f"{what} can go in {_seconds(wait)} s: retry after that or connect to another "
            "replica",
            retry_after=wait,
        )


class WatchSlots:
    """At most ``total`` WatchExecution streams open at once on this replica, and at most
    ``per_caller`` of them for one caller (its credential)::

        with slots.admit(credential):
            ...  # stream the events

    ``admit`` raises ResourceExhausted past either bound. Single event loop: no lock.
    """

    def __init__(
        self, total: int, per_caller: int, *, retry_after: float = WATCH_RETRY_AFTER
    ) -> None:
        if total < 1 or per_caller < 1:
            raise ValueError(f"watch limits must be at least 1, got {total} and {per_caller}")
        self.total = total
        self.per_caller = per_caller
        self.retry_after = retry_after
        self._open: dict[str, int] = {}
        self._count = 0

    @property
    def open(self) -> int:
        """How many watches are open now."""
        return self._count

    @contextmanager
    def admit(self, caller: str) -> Iterator[None]:
        held = self._open.get(caller, 0)
        if held >= self.per_caller:
            raise ResourceExhausted(
                f"too many open WatchExecution streams for this caller ({self.per_caller}, "
                "TRELLIS_MAX_WATCHES_PER_CALLER); close some (or use GetExecution) and retry "
                f"after {_seconds(self.retry_after)} s",
                retry_after=self.retry_after,
            )
        if self._count >= self.total:
            raise ResourceExhausted(
                f"too many open WatchExecution streams on this replica ({self.total}, "
                f"TRELLIS_MAX_WATCHES); retry after {_seconds(self.retry_after)} s or connect "
                "to another replica",
                retry_after=self.retry_after,
            )
        self._open[caller] = held + 1
        self._count += 1
        try:
            yield
        finally:
            self._count -= 1
            left = self._open[caller] - 1
            if left:
                self._open[caller] = left
            else:
                del self._open[caller]


__all__ = ["POLL_RETRY_AFTER", "WATCH_RETRY_AFTER", "PollWaiters", "StartRate", "WatchSlots"]
