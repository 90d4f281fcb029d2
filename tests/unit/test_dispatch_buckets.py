"""Per-process token buckets and circuit breakers (no Redis: the link is not configured)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from coordinator.dispatch import (
    BreakerGate,
    Grant,
    RedisLink,
    RedisUnavailable,
    TaskBreakers,
    TokenBuckets,
)
from coordinator.model import BreakerState, TaskTypeLimits


class Clock:
    def __init__(self) -> None:
        self.seconds = 1000.0
        self.at = datetime(2030, 1, 1, tzinfo=UTC)

    def monotonic(self) -> float:
        return self.seconds

    def now(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.seconds += seconds
        self.at += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def buckets(clock: Clock) -> TokenBuckets:
    return TokenBuckets(RedisLink(), clock=clock.monotonic)


@pytest.fixture
def breakers(clock: Clock) -> TaskBreakers:
    return TaskBreakers(RedisLink(), clock=clock.now)


# -- the link without a URL ----------------------------------------------------------------


async def test_unconfigured_link_is_per_process() -> None:
    link = RedisLink()
    await link.start()
    assert not link.configured
    assert not link.shared
    assert link.detail() == "per process: TRELLIS_REDIS_URL is not set"
    with pytest.raises(RedisUnavailable):
        await link.call(lambda client: client.ping())
    await link.close()


# -- token buckets -------------------------------------------------------------------------


async def test_a_bucket_starts_full_and_then_hints_the_wait(buckets: TokenBuckets) -> None:
    assert await buckets.take("b", rate=2.0, size=3, n=5) == Grant(3, 0.5)
    assert await buckets.take("b", rate=2.0, size=3, n=1) == Grant(0, 0.5)


async def test_a_bucket_refills_at_its_rate(buckets: TokenBuckets, clock: Clock) -> None:
    assert (await buckets.take("b", rate=4.0, size=4, n=4)).granted == 4
    clock.advance(0.5)
    assert (await buckets.take("b", rate=4.0, size=4, n=4)).granted == 2


async def test_a_refill_never_exceeds_the_burst(buckets: TokenBuckets, clock: Clock) -> None:
    assert (await buckets.take("b", rate=10.0, size=5, n=5)).granted == 5
    clock.advance(3600)
    assert (await buckets.take("b", rate=10.0, size=5, n=100)).granted == 5


async def test_fractional_tokens_carry_over(buckets: TokenBuckets, clock: Clock) -> None:
    assert (await buckets.take("b", rate=0.5, size=1, n=1)).granted == 1
    clock.advance(1)
    # Half a token: none granted, the other half comes in one more second.
    assert await buckets.take("b", rate=0.5, size=1, n=1) == Grant(0, pytest.approx(1.0))
    clock.advance(1)
    assert (await buckets.take("b", rate=0.5, size=1, n=1)).granted == 1


async def test_the_wait_counts_the_partial_token(buckets: TokenBuckets, clock: Clock) -> None:
    await buckets.take("b", rate=2.0, size=3, n=3)
    clock.advance(0.25)
    grant = await buckets.take("b", rate=2.0, size=3, n=1)
    assert grant.granted == 0
    assert grant.wait == pytest.approx(0.25)


async def test_a_refund_is_capped_at_the_size(buckets: TokenBuckets) -> None:
    assert (await buckets.take("b", rate=1.0, size=5, n=2)).granted == 2
    await buckets.refund("b", rate=1.0, size=5, n=10)
    assert (await buckets.take("b", rate=1.0, size=5, n=10)).granted == 5


async def test_a_refund_gives_tokens_back(buckets: TokenBuckets) -> None:
    assert (await buckets.take("b", rate=1.0, size=3, n=3)).granted == 3
    await buckets.refund("b", rate=1.0, size=3, n=2)
    assert (await buckets.take("b", rate=1.0, size=3, n=3)).granted == 2


async def test_buckets_are_separate(buckets: TokenBuckets) -> None:
    assert (await buckets.take("a", rate=1.0, size=1, n=1)).granted == 1
    assert (await buckets.take("b", rate=1.0, size=1, n=1)).granted == 1
    assert (await buckets.take("a", rate=1.0, size=1, n=1)).granted == 0


async def test_no_rate_means_no_limit(buckets: TokenBuckets) -> None:
    assert await buckets.take("b", rate=0.0, size=0, n=1000) == Grant(1000)


# -- breakers on per-process state ---------------------------------------------------------

LIMITS = TaskTypeLimits(
    task_type="charge",
    breaker_failure_threshold=3,
    breaker_reset_timeout=timedelta(seconds=30),
)


async def _fail(breakers: TaskBreakers, times: int, limits: TaskTypeLimits = LIMITS) -> None:
    for _ in range(times):
        await breakers.record("t", limits, ok=False)


async def test_consecutive_failures_open_the_breaker(breakers: TaskBreakers, clock: Clock) -> None:
    await _fail(breakers, 2)
    assert await breakers.gate("t", LIMITS) == BreakerGate(BreakerState.CLOSED)
    await _fail(breakers, 1)
    gate = await breakers.gate("t", LIMITS)
    assert gate == BreakerGate(BreakerState.OPEN, clock.now() + timedelta(seconds=30))
    assert gate.blocked
    info = await breakers.info("t", LIMITS)
    assert (info.state, info.failure_count, info.opened_at) == (
        BreakerState.OPEN,
        3,
        clock.now(),
    )
    assert not info.shared


async def test_a_success_resets_the_count(breakers: TaskBreakers) -> None:
    await _fail(breakers, 2)
    await breakers.record("t", LIMITS, ok=True)
    await _fail(breakers, 2)
    assert (await breakers.gate("t", LIMITS)).state is BreakerState.CLOSED
    assert (await breakers.info("t", LIMITS)).failure_count == 2


async def test_after_the_reset_timeout_a_probe_success_closes_it(
    breakers: TaskBreakers, clock: Clock
) -> None:
    await _fail(breakers, 3)
    clock.advance(29)
    assert (await breakers.gate("t", LIMITS)).state is BreakerState.OPEN
    clock.advance(1)
    gate = await breakers.gate("t", LIMITS)
    assert gate == BreakerGate(BreakerState.HALF_OPEN)
    assert not gate.blocked
    assert (await breakers.gate("t", LIMITS)).state is BreakerState.HALF_OPEN
    await breakers.record("t", LIMITS, ok=True)
    assert (await breakers.gate("t", LIMITS)).state is BreakerState.CLOSED
    info = await breakers.info("t", LIMITS)
    assert (info.failure_count, info.opened_at) == (0, None)


async def test_a_probe_failure_opens_it_for_another_timeout(
    breakers: TaskBreakers, clock: Clock
) -> None:
    await _fail(breakers, 3)
    clock.advance(31)
    assert (await breakers.gate("t", LIMITS)).state is BreakerState.HALF_OPEN
    await _fail(breakers, 1)
    assert await breakers.gate("t", LIMITS) == BreakerGate(
        BreakerState.OPEN, clock.now() + timedelta(seconds=30)
    )


async def test_late_outcomes_while_open_change_nothing(
    breakers: TaskBreakers, clock: Clock
) -> None:
    await _fail(breakers, 3)
    opened = clock.now()
    clock.advance(10)
    await breakers.record("t", LIMITS, ok=True)
    await _fail(breakers, 1)
    assert await breakers.gate("t", LIMITS) == BreakerGate(
        BreakerState.OPEN, opened + timedelta(seconds=30)
    )
    # Even once the timeout has passed a late outcome is not taken as the probe's.
    clock.advance(25)
    await breakers.record("t", LIMITS, ok=True)
    assert (await breakers.info("t", LIMITS)).state is BreakerState.OPEN


async def test_changed_limits_apply_to_a_live_breaker(breakers: TaskBreakers, clock: Clock) -> None:
    await _fail(breakers, 2)
    lower = replace(LIMITS, breaker_failure_threshold=2)
    await _fail(breakers, 1, lower)
    assert (await breakers.gate("t", lower)).state is BreakerState.OPEN
    shorter = replace(lower, breaker_reset_timeout=timedelta(seconds=5))
    clock.advance(5)
    assert (await breakers.gate("t", shorter)).state is BreakerState.HALF_OPEN


async def test_no_threshold_means_no_breaker(breakers: TaskBreakers) -> None:
    none = replace(LIMITS, breaker_failure_threshold=0)
    await _fail(breakers, 10, none)
    assert await breakers.gate("t", none) == BreakerGate(BreakerState.CLOSED)
    info = await breakers.info("t", none)
    assert (info.state, info.failure_count) == (BreakerState.CLOSED, 0)


async def test_breakers_are_per_tenant_and_type(breakers: TaskBreakers) -> None:
    await _fail(breakers, 3)
    other_type = replace(LIMITS, task_type="refund")
    assert (await breakers.gate("t", other_type)).state is BreakerState.CLOSED
    assert (await breakers.gate("u", LIMITS)).state is BreakerState.CLOSED
    assert (await breakers.gate("t", LIMITS)).state is BreakerState.OPEN


async def test_reset_closes_and_clears_the_count(breakers: TaskBreakers) -> None:
    await _fail(breakers, 3)
    info = await breakers.reset("t", LIMITS)
    assert (info.state, info.failure_count, info.opened_at) == (BreakerState.CLOSED, 0, None)
    assert (await breakers.gate("t", LIMITS)).state is BreakerState.CLOSED
    await _fail(breakers, 2)
    assert (await breakers.gate("t", LIMITS)).state is BreakerState.CLOSED
