"""Dispatch control (docs/dispatch.md): rate limits, concurrency limits and circuit breakers
per task type, applied by the store's claim through a ClaimPolicy built here."""

from coordinator.breakers import BreakerGate
from coordinator.dispatch._breakers import TaskBreakers
from coordinator.dispatch._buckets import Grant, TokenBuckets
from coordinator.dispatch._control import DispatchControl
from coordinator.dispatch._redis import RedisLink, RedisUnavailable

__all__ = [
    "BreakerGate",
    "DispatchControl",
    "Grant",
    "RedisLink",
    "RedisUnavailable",
    "TaskBreakers",
    "TokenBuckets",
]
