"""Retry delays of notification deliveries: exponential, capped, with jitter."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Backoff:
    """Delay before the retry that follows failed attempt ``n`` (1-based):
    ``min(maximum, initial * multiplier ** (n - 1))``, moved by up to ``jitter`` of itself
    either way (so replicas retrying a shared endpoint spread out), never past ``maximum``."""

    initial: timedelta = timedelta(seconds=1)
    maximum: timedelta = timedelta(minutes=5)
    multiplier: float = 2.0
    jitter: float = 0.2

    def delay(self, failed_attempt: int, rand: Callable[[], float] = random.random) -> timedelta:
        exponent = max(failed_attempt - 1, 0)
        cap = self.maximum.total_seconds()
        try:
            base = min(cap, self.initial.total_seconds() * self.multiplier**exponent)
        except OverflowError:
            base = cap
        moved = base * (1.0 + self.jitter * (2.0 * rand() - 1.0))
        return timedelta(seconds=min(max(moved, 0.0), cap))
