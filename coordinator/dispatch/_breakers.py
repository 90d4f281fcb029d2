"""Circuit breakers per task type (pybreaker), with state in Redis when it is reachable
(shared by all replicas) and in process otherwise.

One breaker per (tenant, task type), named ``tenant/task_type``. pybreaker counts the
consecutive failures and makes the transitions (CLOSED → OPEN at the threshold,
HALF_OPEN → CLOSED on a success, HALF_OPEN → OPEN on a failure); the OPEN → HALF_OPEN
move is ours (``gate``), decided with the injected clock and the stored ``opened_at``.

Shared state is the hash ``<namespace><tenant>/<task_type>`` {state, fail_counter,
success_counter, opened_at (epoch seconds)}. pybreaker's own ``CircuitRedisStorage`` is
not used: it swallows every Redis error (logging a traceback per call and answering
"closed, no failures"), so an outage would silently close breakers instead of falling
back to per-process state, and it keeps ``opened_at`` in whole seconds of pybreaker's
own clock. ``_RedisStorage`` lets connection errors through to ``RedisLink.call``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import pybreaker
import redis

from coordinator.dispatch._redis import RedisLink, RedisUnavailable
from coordinator.model import BreakerInfo, BreakerState, TaskTypeLimits

NAMESPACE = "trellis:breaker:"

R = TypeVar("R")


@dataclass(frozen=True)
class BreakerGate:
    """What the claim may do with a task type now."""

    state: BreakerState
    # OPEN: when a probe may go (the claim's wait hint).
    until: datetime | None = None

    @property
    def blocked(self) -> bool:
        return self.state is BreakerState.OPEN


class _AttemptFailed(Exception):
    pass


def _fail() -> None:
    raise _AttemptFailed


def _ok() -> None:
    return None


def record_outcome(breaker: pybreaker.CircuitBreaker, ok: bool) -> None:
    """Feed one attempt's outcome to a pybreaker breaker (which counts calls it wraps);
    while it is open the outcome is dropped."""
    with contextlib.suppress(_AttemptFailed, pybreaker.CircuitBreakerError):
        breaker.call(_ok if ok else _fail)


class _MemoryStorage(pybreaker.CircuitMemoryStorage):
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


@dataclass(frozen=True)
class _Breaker:
    breaker: pybreaker.CircuitBreaker
    storage: pybreaker.CircuitBreakerStorage

    def configure(self, limits: TaskTypeLimits) -> None:
        """Pick up the current limits (they may change while the breaker lives)."""
        self.breaker.fail_max = limits.breaker_failure_threshold
        self.breaker.reset_timeout = limits.breaker_reset_timeout.total_seconds()


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
        self._local: dict[str, _Breaker] = {}
        self._shared: dict[str, _Breaker] = {}
        # The shared breakers are made and used in worker threads.
        self._shared_lock = threading.Lock()

    async def gate(self, tenant_id: str, limits: TaskTypeLimits) -> BreakerGate:
        """CLOSED: dispatch freely. OPEN: hold the type's tasks until ``until``. HALF_OPEN:
        the reset timeout has passed; the claim lets at most one task of the type be leased
        at a time (the probe)."""
        if limits.breaker_failure_threshold <= 0:
            return BreakerGate(BreakerState.CLOSED)

        def gate(b: _Breaker) -> BreakerGate:
            state = b.storage.state
            if state == pybreaker.STATE_CLOSED:
                return BreakerGate(BreakerState.CLOSED)
            if state == pybreaker.STATE_OPEN:
                opened_at = b.storage.opened_at
                # Without opened_at (state written by hand) the timeout counts as passed.
                if opened_at is not None:
                    until = opened_at + limits.breaker_reset_timeout
                    if self._clock() < until:
                        return BreakerGate(BreakerState.OPEN, until)
                b.breaker.half_open()
            return BreakerGate(BreakerState.HALF_OPEN)

        return await self._run(tenant_id, limits, gate)

    async def record(self, tenant_id: str, limits: TaskTypeLimits, ok: bool) -> None:
        """The outcome of one attempt of the type (success, or failed/timed out)."""
        if limits.breaker_failure_threshold <= 0:
            return

        def record(b: _Breaker) -> None:
            # OPEN: outcomes of tasks leased before it opened change nothing (the move to
            # HALF_OPEN is gate's, on our clock; pybreaker's open state would use its own).
            state = b.storage.state
            if state == pybreaker.STATE_OPEN:
                return
            if b.breaker._state.name != state:
                # Another replica moved the shared state: adopt it without pybreaker's
                # notification, whose "entered closed" would reset the shared count.
                b.breaker._state = b.breaker._create_new_state(state, notify=False)
            record_outcome(b.breaker, ok)

        await self._run(tenant_id, limits, record)

    async def info(self, tenant_id: str, limits: TaskTypeLimits) -> BreakerInfo:
        if limits.breaker_failure_threshold <= 0:
            return self._info(limits, BreakerState.CLOSED, 0, None)

        def info(b: _Breaker) -> BreakerInfo:
            state = BreakerState(b.storage.state)
            opened_at = b.storage.opened_at if state is not BreakerState.CLOSED else None
            return self._info(limits, state, b.storage.counter, opened_at)

        return await self._run(tenant_id, limits, info)

    async def reset(self, tenant_id: str, limits: TaskTypeLimits) -> BreakerInfo:
        """Close the breaker and clear its count (operator override)."""

        def reset(b: _Breaker) -> None:
            b.breaker.close()
            b.storage.reset_counter()

        # The per-process breaker too, so that a later fallback does not revive old state.
        local = self._local.get(_name(tenant_id, limits))
        if local is not None:
            reset(local)
        if limits.breaker_failure_threshold > 0:
            await self._run(tenant_id, limits, reset)
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

    async def _run(self, tenant_id: str, limits: TaskTypeLimits, fn: Callable[[_Breaker], R]) -> R:
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
                    breaker = pybreaker.CircuitBreaker(state_storage=storage, name=name)
                    b = self._shared[name] = _Breaker(breaker, storage)
            b.configure(limits)
            return fn(b)

        async def in_thread(_client: object) -> R:
            return await asyncio.to_thread(shared)

        try:
            return await self._link.call(in_thread)
        except RedisUnavailable:
            pass
        b = self._local.get(name)
        if b is None:
            storage = _MemoryStorage(self._clock)
            breaker = pybreaker.CircuitBreaker(state_storage=storage, name=name)
            b = self._local[name] = _Breaker(breaker, storage)
        b.configure(limits)
        return fn(b)


def _name(tenant_id: str, limits: TaskTypeLimits) -> str:
    return f"{tenant_id}/{limits.task_type}"
