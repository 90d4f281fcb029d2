"""Dispatch control end to end (issue 5 acceptance): rate limits across two replicas, a
concurrency-key mutex, a circuit breaker, Redis going away and coming back, priorities.

Real coordinator processes on PostgreSQL with Redis, real SDK worker processes; every
verdict is computed from the event history in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration

from tests.support.grpc_api import channel_to
from tests.support.procs import ROOT, Proc, free_port, spawn_coordinator, spawn_worker
from tests.support.wait import wait_for, wait_for_sync
from trellis.v1 import dispatch_service_pb2 as pb
from trellis.v1 import dispatch_service_pb2_grpc
from worker_sdk import Client, Workflow

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(240)]

WORKER = ROOT / "tests/support/dispatch_worker.py"
WAIT = 120.0
LIMITS_REFRESH = 0.2


@dataclass
class Cluster:
    url: str
    addresses: list[str]
    coordinators: list[Proc]
    workers: list[Proc]

    async def set_limits(self, limits: pb.TaskTypeLimits) -> None:
        async with channel_to(self.addresses[0]) as channel:
            stub = dispatch_service_pb2_grpc.DispatchServiceStub(channel)
            await stub.SetTaskTypeLimits(pb.SetTaskTypeLimitsRequest(limits=limits), timeout=10)
        # Other replicas re-read the limits every TRELLIS_LIMITS_REFRESH (LIMITS_REFRESH here).
        # Not a wait for a state: no replica reports which limits it holds, so this waits
        # out the refresh period itself.
        await asyncio.sleep(3 * LIMITS_REFRESH)

    async def dispatch_status(self, index: int = 0) -> pb.GetDispatchStatusResponse:
        async with channel_to(self.addresses[index]) as channel:
            stub = dispatch_service_pb2_grpc.DispatchServiceStub(channel)
            reply: pb.GetDispatchStatusResponse = await stub.GetDispatchStatus(
                pb.GetDispatchStatusRequest(), timeout=10
            )
            return reply

    async def breaker(self, task_type: str) -> pb.Breaker:
        async with channel_to(self.addresses[-1]) as channel:
            stub = dispatch_service_pb2_grpc.DispatchServiceStub(channel)
            reply = await stub.ListBreakers(pb.ListBreakersRequest(), timeout=10)
        return next(b for b in reply.breakers if b.task_type == task_type)

    def events(self, *types: str) -> list[tuple[str, str, str, int]]:
        """(execution_id, node_id, type, time ms), in time order."""
        with psycopg.connect(self.url) as conn:
            return [
                (e, n, t, ms)
                for e, n, t, ms in conn.execute(
                    "SELECT execution_id, node_id, type, time FROM events "
                    "WHERE type = ANY(%s) ORDER BY time, sequence",
                    (list(types),),
                ).fetchall()
            ]


@contextlib.asynccontextmanager
async def cluster(
    url: str,
    tmp_path: Path,
    *,
    replicas: int = 1,
    workers: int = 1,
    worker_env: dict[str, str] | None = None,
    **settings: str,
) -> AsyncIterator[Cluster]:
    coordinators: list[Proc] = []
    addresses: list[str] = []
    procs: list[Proc] = []
    settings.setdefault("limits_refresh", f"{int(LIMITS_REFRESH * 1000)}ms")
    try:
        for _ in range(replicas):
            proc, address = spawn_coordinator(url, tmp_path, **settings)
            coordinators.append(proc)
            addresses.append(address)
        procs = [
            spawn_worker(
                WORKER, addresses[i % replicas], tmp_path, f"worker-{i}", **(worker_env or {})
            )
            for i in range(workers)
        ]
        yield Cluster(url, addresses, coordinators, procs)
    finally:
        worker_exits = [w.stop() for w in procs]
        coordinator_exits = [c.stop() for c in coordinators]
    assert worker_exits == [0] * len(procs), [w.output()[-3000:] for w in procs]
    assert coordinator_exits == [0] * len(coordinators), [c.output()[-3000:] for c in coordinators]


async def one_node_workflow(client: Client, name: str, task_type: str, **node: object) -> None:
    wf = Workflow(name)
    wf.node("only", task_type, **node)  # type: ignore[arg-type]
    await client.register_workflow(wf)


async def wait_all(c: Cluster, count: int, within: float = WAIT) -> None:
    """Until ``count`` executions have SUCCEEDED (read from the database: a thousand watch
    streams would load the coordinator more than the work itself)."""
    statuses: dict[str, int] = {}

    def all_succeeded() -> bool:
        nonlocal statuses
        with psycopg.connect(c.url) as conn:
            statuses = dict(
                conn.execute("SELECT status, count(*) FROM executions GROUP BY status").fetchall()
            )
        assert not {"FAILED", "CANCELLED", "TIMED_OUT"} & statuses.keys(), statuses
        return statuses.get("SUCCEEDED", 0) >= count

    await wait_for(
        all_succeeded,
        timeout=within,
        interval=0.25,
        message=lambda: f"not all {count} executions succeeded: {statuses}",
    )


def leased(c: Cluster) -> int:
    """Tasks leased so far."""
    return len(c.events("NODE_LEASED"))


def succeeded_once(c: Cluster, count: int) -> None:
    succeeded = c.events("NODE_SUCCEEDED")
    per_node = {(e, n) for e, n, _, _ in succeeded}
    assert len(succeeded) == len(per_node) == count


def max_in_window(times_ms: Sequence[int], window_ms: int = 1000) -> int:
    """Most events in any window [t, t + window) that starts at an event."""
    best, j = 0, 0
    for i, start in enumerate(times_ms):
        j = max(j, i)
        while j < len(times_ms) and times_ms[j] < start + window_ms:
            j += 1
        best = max(best, j - i)
    return best


# -- rate limit --------------------------------------------------------------------------------


async def test_rate_limit_holds_across_two_replicas(
    fresh_postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    rate, burst, total = 50, 10, 1000
    async with cluster(
        fresh_postgres_url, tmp_path, replicas=2, workers=4, redis_url=redis_url
    ) as c:
        task_type = "tick"
        await c.set_limits(
            pb.TaskTypeLimits(task_type=task_type, rate_per_second=rate, burst=burst)
        )
        status = await c.dispatch_status()
        assert status.shared, status.detail
        async with Client(c.addresses[1], timeout=60) as client:
            await one_node_workflow(client, "ticks", task_type)
            started = await client.start_many("ticks", [{"i": i} for i in range(total)])
            assert len(started) == total
            await wait_all(c, total)
    leases = sorted(ms for _, _, _, ms in c.events("NODE_LEASED"))
    assert len(leases) == total
    worst = max_in_window(leases)
    elapsed = (leases[-1] - leases[0]) / 1000
    throughput = (total - burst) / elapsed
    print(f"\nrate limit {rate}/s burst {burst}: worst 1-s window {worst}, {throughput:.1f}/s")
    assert worst <= rate + burst
    assert rate * 0.9 <= throughput <= rate * 1.1
    succeeded_once(c, total)


# -- concurrency key ---------------------------------------------------------------------------


async def test_concurrency_key_is_a_mutex_per_key(
    fresh_postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    total, keys = 200, 5
    async with cluster(
        fresh_postgres_url, tmp_path, replicas=2, workers=4, redis_url=redis_url
    ) as c:
        await c.set_limits(
            pb.TaskTypeLimits(
                task_type="keyed", concurrency_key="input.account", concurrency_key_limit=1
            )
        )
        async with Client(c.addresses[0], timeout=60) as client:
            await one_node_workflow(client, "keyed", "keyed")
            inputs = [{"account": f"acct-{i % keys}"} for i in range(total)]
            started = await client.start_many("keyed", inputs)
            assert len(started) == total
            await wait_all(c, total)
            account = {r.id: inp["account"] for r, inp in zip(started, inputs, strict=True)}
    spans: dict[str, dict[str, list[int]]] = {}
    for execution_id, _node, _kind, ms in c.events("NODE_LEASED", "NODE_SUCCEEDED"):
        spans.setdefault(account[execution_id], {}).setdefault(execution_id, []).append(ms)
    overlapping = []
    for key, by_execution in spans.items():
        intervals = sorted((s[0], s[-1]) for s in by_execution.values())
        overlapping += [(key, a, b) for a, b in itertools.pairwise(intervals) if b[0] < a[1]]
    assert overlapping == []
    # Different keys did run at the same time (the limit is per key, not global).
    flat = sorted(
        (ms, +1 if kind == "NODE_LEASED" else -1)
        for _, _, kind, ms in c.events("NODE_LEASED", "NODE_SUCCEEDED")
    )
    running = list(itertools.accumulate(d for _, d in flat))
    assert 1 < max(running) <= keys
    succeeded_once(c, total)


# -- circuit breaker ---------------------------------------------------------------------------


async def test_breaker_opens_holds_tasks_and_closes_after_the_fix(
    fresh_postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    fixed = tmp_path / "fixed"
    threshold, total = 3, 10
    async with cluster(
        fresh_postgres_url,
        tmp_path,
        replicas=2,
        workers=2,
        worker_env={"FIXED_FILE": str(fixed), "WORKER_CONCURRENCY": "2"},
        redis_url=redis_url,
    ) as c:
        await c.set_limits(
            pb.TaskTypeLimits(
                task_type="flaky",
                breaker_failure_threshold=threshold,
                breaker_reset_timeout=Duration(seconds=2),
            )
        )
        async with Client(c.addresses[0], timeout=60) as client:
            await one_node_workflow(
                client,
                "flaky",
                "flaky",
                retries=100,
                retry_initial_interval=0.05,
                retry_backoff=1.0,
            )
            started = await client.start_many("flaky", [{"i": i} for i in range(total)])
            assert len(started) == total

            async def breaker_open() -> bool:
                return (await c.breaker("flaky")).state == pb.BREAKER_STATE_OPEN

            await wait_for(breaker_open, timeout=30, message="the breaker never opened")
            opened_failures = len(c.events("NODE_ATTEMPT_FAILED"))
            # Two reset timeouts: at most a few probes. Not a wait for a state: this is the
            # span over which the failures are counted.
            await asyncio.sleep(5)
            held_failures = len(c.events("NODE_ATTEMPT_FAILED"))
            fixed.touch()
            await wait_all(c, total)
            breaker = await c.breaker("flaky")
    print(f"\nbreaker: {opened_failures} failures when open, {held_failures} after 5 s held")
    # Without the breaker 2 workers would burn ~100 attempts a second (~500 in the span);
    # held, only probes (one per reset timeout, on one replica or the other) and the tasks
    # already in flight when it opened fail: a handful, 7 seen once under load.
    assert held_failures - opened_failures <= 12
    assert breaker.state == pb.BREAKER_STATE_CLOSED
    assert breaker.shared
    succeeded_once(c, total)


# -- Redis goes away -----------------------------------------------------------------------------


class RedisServer:
    """A redis-server of this test's own on ``port``, to stop and start at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        ping = ["redis-cli", "-p", str(self.port), "ping"]
        wait_for_sync(
            lambda: (
                subprocess.run(ping, capture_output=True, check=False).stdout.strip() == b"PONG"
            ),
            timeout=10,
            message="redis-server did not start",
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


async def wait_shared(c: Cluster, shared: bool, within: float = 20.0) -> None:
    states: list[bool] = []

    async def all_as_wanted() -> bool:
        nonlocal states
        states = [(await c.dispatch_status(i)).shared for i in range(len(c.addresses))]
        return states == [shared] * len(states)

    await wait_for(
        all_as_wanted,
        timeout=within,
        interval=0.1,
        message=lambda: f"dispatch shared states {states}, wanted {shared}",
    )


async def test_redis_outage_degrades_to_per_process_limits_and_loses_nothing(
    fresh_postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    total, rate = 300, 30
    redis = RedisServer(port)
    redis.start()
    try:
        async with cluster(
            fresh_postgres_url,
            tmp_path,
            replicas=2,
            workers=2,
            redis_url=f"redis://127.0.0.1:{port}/0",
            redis_retry_interval="200ms",
        ) as c:
            await c.set_limits(pb.TaskTypeLimits(task_type="tick", rate_per_second=rate, burst=5))
            await wait_shared(c, True)
            async with Client(c.addresses[0], timeout=60) as client:
                await one_node_workflow(client, "ticks", "tick")
                started = await client.start_many("ticks", [{"i": i} for i in range(total)])
                assert len(started) == total
                # Some two seconds of work (at the rate) shared through Redis ...
                await wait_for(lambda: leased(c) >= 2 * rate, timeout=WAIT, interval=0.1)
                redis.stop()  # Redis stops mid-run ...
                await wait_shared(c, False)
                # ... and as much again per process ...
                degraded_from = leased(c)
                await wait_for(
                    lambda: leased(c) >= degraded_from + 2 * rate, timeout=WAIT, interval=0.1
                )
                redis.start()  # ... and comes back on the same port
                await wait_shared(c, True)
                await wait_all(c, total)
    finally:
        redis.stop()
    succeeded_once(c, total)
    leases = sorted(ms for _, _, _, ms in c.events("NODE_LEASED"))
    # Degraded, each of the two replicas enforces the rate on its own: at most twice it.
    assert max_in_window(leases) <= 2 * (rate + 5)


# -- priorities --------------------------------------------------------------------------------


async def test_high_priority_goes_first_and_low_priority_still_finishes(
    fresh_postgres_url: str, tmp_path: Path
) -> None:
    low_total, high_total = 1000, 50
    async with (
        cluster(fresh_postgres_url, tmp_path, workers=0, priority_aging="60s") as c,
        Client(c.addresses[0], timeout=60) as client,
    ):
        await one_node_workflow(client, "jobs", "work")
        low = await client.start_many("jobs", [{"p": "low"}] * low_total, priority=0)
        assert len(low) == low_total
        worker = spawn_worker(
            WORKER, c.addresses[0], tmp_path, "prio-worker", WORKER_CONCURRENCY="4"
        )
        c.workers.append(worker)
        high = []
        for _ in range(high_total):
            high.append(await client.start_execution("jobs", {"p": "high"}, priority=10))
            # Not a wait for a state: high-priority work arrives over time, into the backlog.
            await asyncio.sleep(0.02)
        await wait_all(c, low_total + high_total)
    high_ids = {r.id for r in high}
    leased = [(e, ms) for e, _, _, ms in c.events("NODE_LEASED")]
    order = {e: i for i, (e, _) in enumerate(leased)}
    ready = {e: ms for e, _, _, ms in c.events("NODE_READY")}
    # Each high-priority task is leased ahead of the low-priority backlog: between its
    # READY and its lease only the handful of low tasks already being claimed slip in.
    passed_by = []
    for e in high_ids:
        before = [x for x, ms in leased[: order[e]] if x not in high_ids and ms > ready[e]]
        passed_by.append(len(before))
    print(f"\npriorities: low tasks leased while a high one waited: max {max(passed_by)}")
    assert max(passed_by) <= 8
    assert order[max(high_ids, key=order.__getitem__)] < len(leased) - 100
    succeeded_once(c, low_total + high_total)
