"""Circuit breakers per task type (pybreaker), with state in Redis when it is reachable
(shared by all replicas) and in process otherwise.

One breaker per (tenant, task type), named ``tenant/task_type``: a
``coordinator.breakers.Breaker`` (the primitive the notification channels use too)
configured from the type's limits on every use.

Shared state is the hash ``<namespace><tenant>/<task_type>`` {state, fail_counter,
success_counter, opened_at (epoch seconds)}. pybreaker's own ``CircuitRedisStorage`` is
not used: it swallows every Redis error (logging a traceback per call and answering
"closed, no failures"), so an outage would silently close breakers instead of falling
back to per-process state, and it keeps ``opened_at`` in whole seconds of pybreaker's
own clock. ``_RedisStorage`` lets connection errors through to ``RedisLink.call``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import pybreaker
import redis

from coordinator.breakers import Breaker, BreakerGate, MemoryStorage
from coordinator.dispatch._redis import RedisLink, RedisUnavailable
from coordinator.model import BreakerInfo, BreakerState, TaskTypeLimits

NAMESPACE = "trellis:breaker:"

R = TypeVar("R")


class _RedisStorage(pybreaker.CircuitBreakerStorage):
    """State in one Redis hash, through the synchronous client. Run only in a worker
    thread inside ``RedisLink.call``: connection errors propagate (the link degrades)."""

    def __init__(self, client: redis.Redis, key: str, clock: Callable[[], datetime]) -> None:
        super().__init__("redis")
        # redis-py's command annotations cover sync and async clients at once (Awaitable |
        # value); through Any the values are what the sync client returns.
        self._redis: Any = client
        self._key = key
        self._clock = clock

    def _get(self, field: str) -> str | None:
        value = cast(bytes | None, self._redis.hget(self._key, field))
        return value.decode() if value is not None else None

    def _set(self, field: str, value: str | int | float) -> None:
        self._redis.hset(self._key, field, value)

    @property
    def state(self) -> str:
        return self._get("state") or pybreaker.STATE_CLOSED

    @state.setter
    def state(self, state: str) -> None:
        self._set("state", str(state))

    def increment_counter(self) -> None:
        self._redis.hincrby(self._key, "fail_counter", 1)

    def reset_counter(self) -> None:
        self._set("fail_counter", 0)

    def increment_success_counter(self) -> None:
        self._redis.hincrby(self._key, "success_counter", 1)

    def reset_success_counter(self) -> None:
        self._set("success_counter", 0)

    @property
    def counter(self) -> int:
        return int(self._get("fail_counter") or 0)

    @property
    def success_counter(self) -> int:
        return int(self._get("success_counter") or 0)

    @property
    def opened_at(self) -> datetime | None:
        value = self._get("opened_at")
        return datetime.fromtimestamp(float(value), UTC) if value else None

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._set("opened_at", repr(self._clock().timestamp()))


class TaskBreakers:
    def __init__(
        self,
        link: RedisLink,
        *,
        clock: Callable[[], datetime],
        namespace: str = NAMESPACE,
    ) -> None:
        self._link = link
        self._clock = clock
        self._namespace = namespace
        self._local: dict[str, Breaker] = {}
        self._shared: dict[str, Breaker] = {}
        # The shared breakers are made and used in worker threads.
        self._shared_lock = threading.Lock()

    async def gate(self, tenant_id: str, limits: TaskTypeLimits) -> BreakerGate:
        """CLOSED: dispatch freely. OPEN: hold the type's tasks until ``until``. HALF_OPEN:
        the reset timeout has passed; the claim lets at most one task of the type be leased
        at a time (the probe)."""
        if limits.breaker_failure_threshold <= 0:
            return BreakerGate(BreakerState.CLOSED)
        return await self._run(tenant_id, limits, lambda b: b.gate(self._clock()))

    async def record(self, tenant_id: str, limits: TaskTypeLimits, ok: bool) -> None:
        """The outcome of one attempt of the type (success, or failed/timed out)."""
        if limits.breaker_failure_threshold <= 0:
            return
        await self._run(tenant_id, limits, lambda b: b.record(ok))

    async def info(self, tenant_id: str, limits: TaskTypeLimits) -> BreakerInfo:
        if limits.breaker_failure_threshold <= 0:
            return self._info(limits, BreakerState.CLOSED, 0, None)

        def info(b: Breaker) -> BreakerInfo:
            state = b.state
            opened_at = b.opened_at if state is not BreakerState.CLOSED else None
            return self._info(limits, state, b.failure_count, opened_at)

        return await self._run(tenant_id, limits, info)

    async def reset(self, tenant_id: str, limits: TaskTypeLimits) -> BreakerInfo:
        """Close the breaker and clear its count (operator override)."""
        # The per-process breaker too, so that a later fallback does not revive old state.
        local = self._local.get(_name(tenant_id, limits))
        if local is not None:
            local.reset()
        if limits.breaker_failure_threshold > 0:
            await self._run(tenant_id, limits, lambda b: b.reset())
        return await self.info(tenant_id, limits)

    # -- where the state lives -------------------------------------------------------

    def _info(
        self,
        limits: TaskTypeLimits,
        state: BreakerState,
        count: int,
        opened_at: datetime | None,
    ) -> BreakerInfo:
        return BreakerInfo(
            task_type=limits.task_type,
            state=state,
            failure_count=count,
            failure_threshold=limits.breaker_failure_threshold,
            reset_timeout=limits.breaker_reset_timeout,
            opened_at=opened_at,
            shared=self._link.shared,
        )

    async def _run(self, tenant_id: str, limits: TaskTypeLimits, fn: Callable[[Breaker], R]) -> R:
        """``fn`` on the shared breaker, or on the per-process one while Redis is unset or
        unreachable (the link logs that; nothing more to say here)."""
        name = _name(tenant_id, limits)

        def shared() -> R:
            # pybreaker's breaker and storage are synchronous: each step is a Redis round
            # trip. They run in a worker thread so that the event loop never waits on
            # Redis; the link's short socket timeouts bound how long the thread can hang.
            with self._shared_lock:
                b = self._shared.get(name)
                if b is None:
                    storage = _RedisStorage(
                        self._link.sync_client(), self._namespace + name, self._clock
                    )
                    b = self._shared[name] = _breaker(name, storage, limits)
            _configure(b, limits)
            return fn(b)

        async def in_thread(_client: object) -> R:
            return await asyncio.to_thread(shared)

        try:
            return await self._link.call(in_thread)
        except RedisUnavailable:
            pass
        b = self._local.get(name)
        if b is None:
            b = self._local[name] = _breaker(name, MemoryStorage(self._clock), limits)
        _configure(b, limits)
        return fn(b)


def _name(tenant_id: str, limits: TaskTypeLimits) -> str:
    return f"{tenant_id}/{limits.task_type}"


def _breaker(
    name: str, storage: pybreaker.CircuitBreakerStorage, limits: TaskTypeLimits
) -> Breaker:
    return Breaker(
        name,
        storage,
        failure_threshold=limits.breaker_failure_threshold,
        reset_timeout=limits.breaker_reset_timeout,
    )


def _configure(b: Breaker, limits: TaskTypeLimits) -> None:
    """Pick up the current limits (they may change while the breaker lives)."""
    b.configure(limits.breaker_failure_threshold, limits.breaker_reset_timeout)
