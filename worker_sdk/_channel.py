"""Connecting to the coordinator: the default address, channel options, retry policy."""

from __future__ import annotations

import random
from typing import Any

import grpc

DEFAULT_ADDRESS = "127.0.0.1:7400"
"""Where the SDK looks for the coordinator unless told otherwise."""

# Reconnect quickly after a coordinator restart (gRPC's default backoff grows to 120 s),
# and accept large batches of tasks.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def open_channel(address: str) -> grpc.aio.Channel:
    """An insecure channel to ``address`` with the SDK's options (call inside the event loop)."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


# Failures that say "not now" rather than "never": retried with backoff.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


class Backoff:
    """Delays of ``uniform(0, min(maximum, initial * 2**n))`` for the n-th consecutive failure."""

    def __init__(self, initial: float = 0.1, maximum: float = 10.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** min(self.failures, 30))
        self.failures += 1
        return random.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.failures = 0
