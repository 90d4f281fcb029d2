"""Retry delays of notification deliveries: exponential, capped, with jitter."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from coordinator.engine import exponential_delay


@dataclass(frozen=True)
class Backoff:
    """Delay before the retry that follows failed attempt ``n`` (1-based):
    ``min(maximum, initial * multiplier ** (n - 1))``, moved by up to ``jitter`` of itself
    either way (so replicas retrying a shared endpoint spread out), never past ``maximum``.
    The computation is the engine's, as for node retries; only the jitter's source differs
    (random here, a hash of the attempt there, where it must be reproducible)."""

    initial: timedelta = timedelta(seconds=1)
    maximum: timedelta = timedelta(minutes=5)
    multiplier: float = 2.0
    jitter: float = 0.2

    def delay(self, failed_attempt: int, rand: Callable[[], float] = random.random) -> timedelta:
        fraction = 2.0 * rand() - 1.0
        return exponential_delay(
            self.initial, self.multiplier, self.maximum, failed_attempt, self.jitter, fraction
        )
