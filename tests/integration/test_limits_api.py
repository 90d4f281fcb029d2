"""DispatchService over gRPC (in process, SQLite and PostgreSQL): task-type limits,
breakers and the sharing status.

The server here carries DispatchService only, over the ``store`` fixture and a fake of
DispatchControl's operator members (cache invalidation, breakers, Redis link), so the
test sees exactly what the operator surface does with them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from coordinator.dispatch import RedisLink
from coordinator.grpc.dispatch_servicer import SERVICE_NAME, add_dispatch
from coordinator.model import BreakerInfo, BreakerState, TaskTypeLimits
from coordinator.service import Coordinator
from coordinator.service._limits import LimitsAdmin
from coordinator.store import SqlStore
from tests.support.grpc_api import channel_to, expect_status, open_interceptor
from trellis.v1 import dispatch_service_pb2 as dpb
from trellis.v1 import dispatch_service_pb2_grpc as dgrpc

NOW = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
OPENED = datetime(2030, 1, 2, 3, 0, tzinfo=UTC)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@dataclass
class FakeLink:
    configured: bool = True
    shared: bool = False

    def detail(self) -> str:
        return "per process: redis unreachable (connection refused)"


@dataclass
class FakeBreakers:
    """Breaker state per (tenant, type): (state, failures, opened_at)."""

    states: dict[tuple[str, str], tuple[BreakerState, int, datetime | None]] = field(
        default_factory=dict
    )
    resets: list[str] = field(default_factory=list)

    async def info(self, tenant_id: str, limits: TaskTypeLimits) -> BreakerInfo:
        state, failures, opened = self.states.get(
            (tenant_id, limits.task_type), (BreakerState.CLOSED, 0, None)
        )
        return BreakerInfo(
            task_type=limits.task_type,
            state=state,
            failure_count=failures,
            failure_threshold=limits.breaker_failure_threshold,
            reset_timeout=limits.breaker_reset_timeout,
            opened_at=opened,
            shared=False,
        )

    async def reset(self, tenant_id: str, limits: TaskTypeLimits) -> BreakerInfo:
        self.resets.append(limits.task_type)
        self.states.pop((tenant_id, limits.task_type), None)
        return await self.info(tenant_id, limits)


@dataclass
class FakeDispatch:
    breakers: FakeBreakers = field(default_factory=FakeBreakers)
    link: FakeLink = field(default_factory=FakeLink)
    invalidations: int = 0

    def invalidate(self) -> None:
        self.invalidations += 1


@dataclass
class Dispatch:
    stub: dgrpc.DispatchServiceStub
    fake: FakeDispatch
    store: Any


@pytest.fixture
async def dispatch(store: SqlStore) -> AsyncIterator[Dispatch]:
    fake = FakeDispatch()
    server = grpc.aio.server(interceptors=[open_interceptor(Coordinator(store))])
    add_dispatch(server, LimitsAdmin(store.limits, fake, clock=lambda: NOW))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = channel_to(f"127.0.0.1:{port}")
    try:
        yield Dispatch(dgrpc.DispatchServiceStub(channel), fake, store)
    finally:
        await channel.close()
        await server.stop(None)


def seconds(n: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(seconds=n))
    return d


async def put(d: Dispatch, **fields: Any) -> dpb.TaskTypeLimits:
    reply = await d.stub.SetTaskTypeLimits(
        dpb.SetTaskTypeLimitsRequest(limits=dpb.TaskTypeLimits(**fields))
    )
    return reply.limits


def test_service_name() -> None:
    assert SERVICE_NAME == "trellis.v1.DispatchService"


async def test_set_get_list_delete_round_trip(dispatch: Dispatch) -> None:
    d = dispatch
    stored = await put(
        d,
        task_type="send-email",
        rate_per_second=2.5,
        burst=5,
        rate_key="input.customer_id",
        max_concurrency=10,
        concurrency_key="input.account_id",
        breaker_failure_threshold=3,
        breaker_reset_timeout=seconds(45),
    )
    assert stored == dpb.TaskTypeLimits(
        task_type="send-email",
        rate_per_second=2.5,
        burst=5,
        rate_key="input.customer_id",
        max_concurrency=10,
        concurrency_key="input.account_id",
        concurrency_key_limit=1,  # defaulted with a key
        breaker_failure_threshold=3,
        breaker_reset_timeout=seconds(45),
        update_time=stored.update_time,
    )
    assert stored.update_time.ToDatetime(tzinfo=UTC) == NOW
    assert d.fake.invalidations == 1
    got = await d.stub.GetTaskTypeLimits(dpb.GetTaskTypeLimitsRequest(task_type="send-email"))
    assert got.limits == stored

    # Set replaces every field (an upsert): unset fields fall back to no limit / defaults.
    replaced = await put(d, task_type="send-email", max_concurrency=2)
    assert replaced.rate_per_second == 0 and replaced.rate_key == ""
    assert replaced.concurrency_key == "" and replaced.concurrency_key_limit == 0
    assert replaced.breaker_failure_threshold == 0
    assert replaced.breaker_reset_timeout.ToTimedelta() == timedelta(seconds=30)
    row = await d.store.limits.get_task_type_limits("default", "send-email")
    assert row.max_concurrency == 2 and row.concurrency_key_limit == 1
    assert row.breaker_reset_timeout == timedelta(seconds=30)

    await put(d, task_type="a.fetch", concurrency_key="input.k", concurrency_key_limit=3)
    await put(d, task_type="z/last:1", rate_per_second=1)
    listed = await d.stub.ListTaskTypeLimits(dpb.ListTaskTypeLimitsRequest())
    assert [x.task_type for x in listed.limits] == ["a.fetch", "send-email", "z/last:1"]
    assert listed.limits[0].concurrency_key_limit == 3

    await d.stub.DeleteTaskTypeLimits(dpb.DeleteTaskTypeLimitsRequest(task_type="send-email"))
    assert d.fake.invalidations == 5
    listed = await d.stub.ListTaskTypeLimits(dpb.ListTaskTypeLimitsRequest())
    assert [x.task_type for x in listed.limits] == ["a.fetch", "z/last:1"]
    await expect_status(
        d.stub.GetTaskTypeLimits(dpb.GetTaskTypeLimitsRequest(task_type="send-email")),
        NOT_FOUND,
        "no limits for task type 'send-email'",
        "trellis limits set send-email",
    )
    await expect_status(
        d.stub.DeleteTaskTypeLimits(dpb.DeleteTaskTypeLimitsRequest(task_type="send-email")),
        NOT_FOUND,
        "send-email",
    )


async def test_store_lists_per_tenant_or_all(dispatch: Dispatch) -> None:
    s = dispatch.store
    for tenant, task_type in (("t2", "b"), ("t1", "b"), ("t1", "a")):
        await s.limits.set_task_type_limits(
            TaskTypeLimits(task_type=task_type, tenant_id=tenant, max_concurrency=1), NOW
        )
    everything = await s.limits.list_task_type_limits(None)
    assert [(x.tenant_id, x.task_type) for x in everything] == [
        ("t1", "a"),
        ("t1", "b"),
        ("t2", "b"),
    ]
    assert [x.task_type for x in await s.limits.list_task_type_limits("t2")] == ["b"]
    await s.limits.delete_task_type_limits("t1", "b")
    assert [x.task_type for x in await s.limits.list_task_type_limits("t1")] == ["a"]


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        ({"task_type": ""}, ("empty task_type",)),
        ({"task_type": "has space"}, ("task_type 'has space' is invalid",)),
        ({"task_type": "x" * 129}, ("task_type", "at most 128")),
        ({"task_type": "t", "rate_per_second": -1}, ("rate_per_second",)),
        ({"task_type": "t", "rate_per_second": float("inf")}, ("rate_per_second", "finite")),
        ({"task_type": "t", "rate_per_second": float("nan")}, ("rate_per_second",)),
        ({"task_type": "t", "rate_per_second": 1, "burst": -1}, ("burst must be >= 0",)),
        ({"task_type": "t", "burst": 3}, ("burst needs rate_per_second",)),
        ({"task_type": "t", "rate_key": "input.k"}, ("rate_key needs rate_per_second",)),
        ({"task_type": "t", "max_concurrency": -1}, ("max_concurrency",)),
        (
            {"task_type": "t", "concurrency_key": "input.k", "concurrency_key_limit": -2},
            ("concurrency_key_limit must be >= 1",),
        ),
        ({"task_type": "t", "concurrency_key_limit": 2}, ("concurrency_key_limit needs",)),
        ({"task_type": "t", "breaker_failure_threshold": -1}, ("breaker_failure_threshold",)),
        (
            {"task_type": "t", "breaker_reset_timeout": seconds(0)},
            ("breaker_reset_timeout must be greater than zero",),
        ),
        (
            {"task_type": "t", "rate_per_second": 1, "rate_key": "input.("},
            ("rate_key is not a valid CEL expression",),
        ),
        (
            {"task_type": "t", "concurrency_key": "customer.id"},
            ("concurrency_key is not a valid CEL expression", "input"),
        ),
    ],
)
async def test_invalid_limits_are_refused_naming_the_field(
    dispatch: Dispatch, fields: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    await expect_status(put(dispatch, **fields), INVALID, *fragments)
    assert await dispatch.store.limits.list_task_type_limits(None) == []
    assert dispatch.fake.invalidations == 0


async def test_set_without_limits_is_refused(dispatch: Dispatch) -> None:
    await expect_status(
        dispatch.stub.SetTaskTypeLimits(dpb.SetTaskTypeLimitsRequest()), INVALID, "limits"
    )


async def test_breakers_are_listed_and_reset(dispatch: Dispatch) -> None:
    d = dispatch
    await put(d, task_type="charge", breaker_failure_threshold=5, breaker_reset_timeout=seconds(10))
    await put(d, task_type="email", breaker_failure_threshold=2)
    await put(d, task_type="plain", max_concurrency=4)
    d.fake.breakers.states[("default", "charge")] = (BreakerState.OPEN, 5, OPENED)

    listed = await d.stub.ListBreakers(dpb.ListBreakersRequest())
    assert [b.task_type for b in listed.breakers] == ["charge", "email"]
    charge, email = listed.breakers
    assert charge.state == dpb.BREAKER_STATE_OPEN
    assert (charge.failure_count, charge.failure_threshold) == (5, 5)
    assert charge.reset_timeout.ToTimedelta() == timedelta(seconds=10)
    assert charge.open_time.ToDatetime(tzinfo=UTC) == OPENED
    assert email.state == dpb.BREAKER_STATE_CLOSED
    assert not email.HasField("open_time")
    assert email.reset_timeout.ToTimedelta() == timedelta(seconds=30)

    reset = await d.stub.ResetBreaker(dpb.ResetBreakerRequest(task_type="charge"))
    assert reset.breaker.state == dpb.BREAKER_STATE_CLOSED
    assert reset.breaker.failure_count == 0
    assert d.fake.breakers.resets == ["charge"]

    await expect_status(
        d.stub.ResetBreaker(dpb.ResetBreakerRequest(task_type="plain")),
        NOT_FOUND,
        "'plain' has no circuit breaker",
    )
    await expect_status(
        d.stub.ResetBreaker(dpb.ResetBreakerRequest(task_type="unknown")),
        NOT_FOUND,
        "no limits for task type 'unknown'",
    )

    # Deleting a type with a breaker clears the breaker too.
    await d.stub.DeleteTaskTypeLimits(dpb.DeleteTaskTypeLimitsRequest(task_type="email"))
    assert d.fake.breakers.resets == ["charge", "email"]


async def test_dispatch_status_reports_the_link(dispatch: Dispatch) -> None:
    reply = await dispatch.stub.GetDispatchStatus(dpb.GetDispatchStatusRequest())
    assert reply == dpb.GetDispatchStatusResponse(
        redis_configured=True,
        shared=False,
        detail="per process: redis unreachable (connection refused)",
    )
    dispatch.fake.link.shared = True
    reply = await dispatch.stub.GetDispatchStatus(dpb.GetDispatchStatusRequest())
    assert reply.shared is True


async def test_status_with_the_real_redis_link_unset(store: SqlStore) -> None:
    link = RedisLink("")
    admin = LimitsAdmin(store.limits, FakeDispatch(link=link), clock=lambda: NOW)  # type: ignore[arg-type]
    status = admin.get_dispatch_status()
    assert (status.configured, status.shared) == (False, False)
    assert status.detail.startswith("per process")
