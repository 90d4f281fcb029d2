"""Rate-limit buckets and breakers shared through a real Redis, and the fall back to
per-process state while Redis is down (on a redis-server of our own)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from coordinator.dispatch import BreakerGate, RedisLink, TaskBreakers, TokenBuckets
from coordinator.dispatch._redis import display_url
from coordinator.model import BreakerState, TaskTypeLimits
from tests.support.wait import wait_for, wait_for_sync

pytestmark = pytest.mark.redis

RETRY = timedelta(milliseconds=100)


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"trellis-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def links(redis_url: str) -> AsyncIterator[tuple[RedisLink, RedisLink]]:
    """Two links to the same Redis: two replicas."""
    a, b = RedisLink(redis_url, retry_interval=RETRY), RedisLink(redis_url, retry_interval=RETRY)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_the_link_is_shared(links: tuple[RedisLink, RedisLink], redis_url: str) -> None:
    link, _ = links
    assert link.configured
    assert link.shared
    assert link.detail() == f"shared through {display_url(redis_url)}"


# -- buckets ---------------------------------------------------------------------------------


async def test_replicas_share_a_bucket(links: tuple[RedisLink, RedisLink], prefix: str) -> None:
    one = TokenBuckets(links[0], key_prefix=prefix)
    two = TokenBuckets(links[1], key_prefix=prefix)
    # A very slow refill, so that no token comes back during the test.
    assert (await one.take("b", rate=0.01, size=3, n=2)).granted == 2
    assert (await two.take("b", rate=0.01, size=3, n=2)).granted == 1
    grant = await one.take("b", rate=0.01, size=3, n=1)
    assert grant.granted == 0
    assert 0 < grant.wait <= 100
    await two.refund("b", rate=0.01, size=3, n=10)
    assert (await one.take("b", rate=0.01, size=3, n=10)).granted == 3


async def test_concurrent_takes_never_over_grant(
    links: tuple[RedisLink, RedisLink], prefix: str
) -> None:
    replicas = [TokenBuckets(link, key_prefix=prefix) for link in links]
    grants = await asyncio.gather(
        *(replicas[i % 2].take("b", rate=0.01, size=7, n=1) for i in range(20))
    )
    assert sum(g.granted for g in grants) == 7
    assert all(g.wait > 0 for g in grants if g.granted == 0)


async def test_a_shared_bucket_refills_on_redis_time(
    links: tuple[RedisLink, RedisLink], prefix: str
) -> None:
    buckets = TokenBuckets(links[0], key_prefix=prefix)
    assert (await buckets.take("b", rate=50.0, size=2, n=2)).granted == 2
    granted = 0

    async def refilled() -> bool:
        nonlocal granted
        granted += (await buckets.take("b", rate=50.0, size=2, n=1)).granted
        return granted >= 2

    await wait_for(refilled, timeout=5, interval=0.01)
    assert granted == 2


async def test_a_bucket_key_expires(
    links: tuple[RedisLink, RedisLink], prefix: str, redis_url: str
) -> None:
    await TokenBuckets(links[0], key_prefix=prefix).take("b", rate=10.0, size=5, n=1)
    client = redis.Redis.from_url(redis_url)
    try:
        ttl = client.pttl(prefix + "b")
    finally:
        client.close()
    # One token to refill (100 ms) plus the margin.
    assert 0 < ttl <= 1100


# -- breakers --------------------------------------------------------------------------------

LIMITS = TaskTypeLimits(
    task_type="charge",
    breaker_failure_threshold=3,
    breaker_reset_timeout=timedelta(seconds=30),
)


class Clock:
    def __init__(self) -> None:
        self.at = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.at


async def test_replicas_share_a_breaker(links: tuple[RedisLink, RedisLink], prefix: str) -> None:
    clock = Clock()
    one = TaskBreakers(links[0], clock=clock, namespace=prefix)
    two = TaskBreakers(links[1], clock=clock, namespace=prefix)
    # Failures on both replicas count together.
    await one.record("t", LIMITS, ok=False)
    await two.record("t", LIMITS, ok=False)
    assert (await one.gate("t", LIMITS)).state is BreakerState.CLOSED
    await one.record("t", LIMITS, ok=False)
    until = clock.at + timedelta(seconds=30)
    assert await two.gate("t", LIMITS) == BreakerGate(BreakerState.OPEN, until)
    info = await two.info("t", LIMITS)
    assert (info.state, info.failure_count, info.opened_at, info.shared) == (
        BreakerState.OPEN,
        3,
        clock.at,
        True,
    )
    clock.at = until
    assert (await two.gate("t", LIMITS)).state is BreakerState.HALF_OPEN
    assert (await one.gate("t", LIMITS)).state is BreakerState.HALF_OPEN
    await one.record("t", LIMITS, ok=True)
    assert (await two.gate("t", LIMITS)).state is BreakerState.CLOSED
    # An operator reset on one replica is seen by the other.
    for _ in range(3):
        await two.record("t", LIMITS, ok=False)
    assert (await one.gate("t", LIMITS)).blocked
    assert (await one.reset("t", LIMITS)).state is BreakerState.CLOSED
    assert (await two.gate("t", LIMITS)).state is BreakerState.CLOSED


async def test_a_replica_catching_up_keeps_the_shared_failure_count(
    links: tuple[RedisLink, RedisLink], prefix: str
) -> None:
    clock = Clock()
    one = TaskBreakers(links[0], clock=clock, namespace=prefix)
    two = TaskBreakers(links[1], clock=clock, namespace=prefix)
    for _ in range(3):
        await one.record("t", LIMITS, ok=False)  # one's breaker object is now OPEN
    clock.at += LIMITS.breaker_reset_timeout
    assert (await two.gate("t", LIMITS)).state is BreakerState.HALF_OPEN
    await two.record("t", LIMITS, ok=True)  # closed by two; one has not seen it yet
    await two.record("t", LIMITS, ok=False)
    await two.record("t", LIMITS, ok=False)
    # one adopts the closed state without resetting the count two has built up.
    await one.record("t", LIMITS, ok=False)
    assert (await two.gate("t", LIMITS)).blocked


# -- Redis going away and coming back --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class OwnRedis:
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.process = subprocess.Popen(
            [
                *(binary, "--port", str(self.port), "--save", "", "--appendonly", "no"),
                *("--bind", "127.0.0.1", "--dir", str(self.workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        process = self.process

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                if process.poll() is not None:
                    raise
                return False

        try:
            wait_for_sync(answers, timeout=10, message="redis-server answering PING")
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(_free_port(), tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def test_redis_down_falls_back_per_process_and_recovers(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coordinator.dispatch")
    link = RedisLink(own_redis.url, retry_interval=RETRY)
    changes: list[bool] = []
    recovered = asyncio.Event()

    def changed(shared: bool) -> None:
        changes.append(shared)
        if shared:
            recovered.set()

    link.on_change(changed)
    await link.start()
    try:
        buckets = TokenBuckets(link)
        breakers = TaskBreakers(link, clock=Clock())
        assert link.shared
        assert link.detail() == f"shared through {own_redis.url}"
        assert (await buckets.take("b", rate=0.01, size=3, n=2)).granted == 2

        own_redis.stop()
        # The per-process bucket starts full: all 3 (Redis had only 1 left).
        assert (await buckets.take("b", rate=0.01, size=3, n=3)).granted == 3
        assert not link.shared
        assert link.detail().startswith("per process: redis unreachable since ")
        assert changes == [False]
        assert (await buckets.take("b", rate=0.01, size=3, n=3)).granted == 0
        for _ in range(3):
            await breakers.record("t", LIMITS, ok=False)
        assert (await breakers.gate("t", LIMITS)).blocked
        assert not (await breakers.info("t", LIMITS)).shared
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert f"redis unreachable at {own_redis.url}" in warnings[0].getMessage()

        own_redis.start()
        async with asyncio.timeout(10):
            await recovered.wait()
        assert link.shared
        assert changes == [False, True]
        assert link.detail() == f"shared through {own_redis.url}"
        assert any("redis reachable again" in r.getMessage() for r in caplog.records)
        # Shared again: the bucket and the breaker live in the new (empty) Redis.
        assert (await buckets.take("b", rate=0.01, size=3, n=3)).granted == 3
        assert (await breakers.gate("t", LIMITS)).state is BreakerState.CLOSED
        await breakers.record("t", LIMITS, ok=False)
        info = await breakers.info("t", LIMITS)
        assert (info.state, info.failure_count, info.shared) == (BreakerState.CLOSED, 1, True)
        client = redis.Redis(port=own_redis.port)
        try:
            assert client.exists("trellis:bucket:b")
            assert client.exists("trellis:breaker:t/charge")
        finally:
            client.close()
    finally:
        await link.close()


async def test_an_unreachable_redis_at_start_is_not_fatal_and_hides_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="coordinator.dispatch")
    url = f"redis://:s3cret@127.0.0.1:{_free_port()}/2"
    link = RedisLink(url, retry_interval=RETRY)
    await link.start()
    try:
        assert link.configured
        assert not link.shared
        grant = await TokenBuckets(link).take("b", rate=1.0, size=2, n=5)
        assert (grant.granted, grant.wait) == (2, pytest.approx(1.0))
        detail = link.detail()
        assert detail.startswith("per process: redis unreachable since ")
        assert "s3cret" not in detail
        assert all("s3cret" not in r.getMessage() for r in caplog.records)
        assert any(
            f"redis unreachable at redis://127.0.0.1:{url.rsplit(':', 1)[1]}" in r.getMessage()
            for r in caplog.records
        )
    finally:
        await link.close()
