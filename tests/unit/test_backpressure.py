"""Backpressure: PollWaiters and StartRate, the retry hint on the wire, and the SDK
honouring it (Worker against the fake WorkerService on a socket, Client against a fake
WorkflowService)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from coordinator.errors import NotFound, ResourceExhausted, Unavailable
from coordinator.grpc.status import trailers_for
from coordinator.service._backpressure import PollWaiters, StartRate
from tests.support.fake_worker_service import FakeWorkerService, echo, serving, start_server
from tests.support.wait import wait_for
from trellis.v1 import common_pb2
from trellis.v1 import worker_service_pb2 as pb
from trellis.v1 import workflow_service_pb2 as fpb
from trellis.v1 import workflow_service_pb2_grpc as fgrpc
from worker_sdk import Client, ResourceExhaustedError, Worker
from worker_sdk._channel import Backoff, retry_after
from worker_sdk._errors import rpc_error

# -- PollWaiters ----------------------------------------------------------------------------


def test_poll_waiters_admit_up_to_the_limit_then_refuse_with_a_hint() -> None:
    waiters = PollWaiters(2, retry_after=1.5)
    with waiters.admit(), waiters.admit():
        assert waiters.waiting == 2
        with pytest.raises(ResourceExhausted) as refused, waiters.admit():
            pass
        assert refused.value.retry_after == 1.5
        assert str(refused.value) == (
            "too many waiting polls on this replica (2); retry after 1.5 s "
            "or connect to another replica"
        )
        assert waiters.waiting == 2
    assert waiters.waiting == 0
    with waiters.admit():
        assert waiters.waiting == 1


def test_poll_waiters_release_the_slot_when_the_poll_fails() -> None:
    waiters = PollWaiters(1)
    with pytest.raises(RuntimeError), waiters.admit():
        raise RuntimeError("database went away")
    assert waiters.waiting == 0
    with waiters.admit():
        pass


def test_poll_waiters_need_a_positive_limit() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PollWaiters(0)


# -- StartRate ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_start_rate_allows_the_burst_then_the_rate() -> None:
    clock = FakeClock()
    rate = StartRate(2.0, 3, clock=clock)
    for _ in range(3):
        rate.take()
    with pytest.raises(ResourceExhausted) as refused:
        rate.take()
    assert refused.value.retry_after == pytest.approx(0.5)  # one token at 2/s
    assert "2/s, burst 3" in str(refused.value)
    clock.now += 0.5
    rate.take()
    with pytest.raises(ResourceExhausted):
        rate.take()
    clock.now += 100  # refills to the burst, not beyond
    for _ in range(3):
        rate.take()
    with pytest.raises(ResourceExhausted):
        rate.take()


def test_start_rate_hint_for_a_batch_is_the_time_until_enough_tokens() -> None:
    clock = FakeClock()
    rate = StartRate(10.0, 5, clock=clock)
    rate.take(4)
    with pytest.raises(ResourceExhausted) as refused:
        rate.take(3)  # 1 token left, 2 missing at 10/s
    assert refused.value.retry_after == pytest.approx(0.2)
    assert "3 starts" in str(refused.value)
    clock.now += 0.2
    rate.take(3)


def test_a_batch_over_the_burst_waits_for_a_full_bucket_and_leaves_a_debt() -> None:
    clock = FakeClock()
    rate = StartRate(10.0, 5, clock=clock)
    rate.take(1)
    with pytest.raises(ResourceExhausted) as refused:
        rate.take(20)
    assert refused.value.retry_after == pytest.approx(0.1)  # until the bucket is full
    clock.now += 0.1
    rate.take(20)  # admitted, 15 in debt
    with pytest.raises(ResourceExhausted) as after:
        rate.take(1)
    assert after.value.retry_after == pytest.approx(1.6)


def test_start_rate_zero_is_unlimited() -> None:
    rate = StartRate(0.0, 1)
    for _ in range(1000):
        rate.take(50)


def test_start_rate_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        StartRate(-1.0, 1)
    with pytest.raises(ValueError):
        StartRate(1.0, 0)


# -- the hint on the wire -------------------------------------------------------------------


def test_errors_with_a_hint_carry_the_retry_after_trailer() -> None:
    assert trailers_for(ResourceExhausted("slow down", retry_after=1.5)) == (
        ("retry-after-ms", "1500"),
    )
    assert trailers_for(Unavailable("database unavailable", retry_after=0.0001)) == (
        ("retry-after-ms", "1"),
    )
    assert trailers_for(ResourceExhausted("over a limit")) == ()
    assert trailers_for(NotFound("no such execution")) == ()


def _aio_error(
    code: grpc.StatusCode, trailers: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), "refused")


def test_sdk_reads_the_hint_and_backs_off_by_it() -> None:
    exc = _aio_error(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "1500"),))
    assert retry_after(exc) == 1.5
    assert rpc_error(exc, "StartExecution").retry_after == 1.5
    assert retry_after(_aio_error(grpc.StatusCode.RESOURCE_EXHAUSTED)) is None
    assert retry_after(_aio_error(grpc.StatusCode.UNAVAILABLE, (("retry-after-ms", "x"),))) is None
    backoff = Backoff(initial=0.1, maximum=10.0)
    for _ in range(5):
        assert 1.5 <= backoff.delay_after(exc) <= 1.5 * 1.2
    assert backoff.failures == 5
    assert 0 <= backoff.delay_after(_aio_error(grpc.StatusCode.UNAVAILABLE)) <= 3.2


# -- the Worker -----------------------------------------------------------------------------


class HintingService(FakeWorkerService):
    """Refuses polls / completions with RESOURCE_EXHAUSTED and a retry hint first."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse_polls = 0
        self.refuse_completes = 0
        self.hint_ms = 300
        self.poll_times: list[float] = []
        self.complete_times: list[float] = []
        self.refuse_whole_batch = True  # False: refuse each result in the reply instead

    def _refuse(self, context: Any) -> Any:
        return context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too many waiting polls on this replica (1); retry after 0.3 s",
            (("retry-after-ms", str(self.hint_ms)),),
        )

    async def PollTasks(self, request: pb.PollTasksRequest, context: Any) -> pb.PollTasksResponse:
        self.poll_times.append(time.monotonic())
        if self.refuse_polls:
            self.refuse_polls -= 1
            self.polls.append(request)
            await self._refuse(context)
        return await super().PollTasks(request, context)

    async def CompleteTask(
        self, request: pb.CompleteTaskRequest, context: Any
    ) -> pb.CompleteTaskResponse:
        self.complete_times.append(time.monotonic())
        if self.refuse_completes:
            self.refuse_completes -= 1
            self.complete_calls.append(request)
            await self._refuse(context)
        return await super().CompleteTask(request, context)

    async def ReportResults(
        self, request: pb.ReportResultsRequest, context: Any
    ) -> pb.ReportResultsResponse:
        if self.batches:
            self.complete_times.append(time.monotonic())
        if not self.refuse_completes or not self.batches:
            return await super().ReportResults(request, context)
        self.refuse_completes -= 1
        self.complete_calls.extend(r.completed for r in request.results)
        if self.refuse_whole_batch:
            await self._refuse(context)
        reply = pb.ReportResultsResponse()
        for _ in request.results:
            status = reply.results.add(
                code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="over the start rate"
            )
            status.retry_after.FromMilliseconds(self.hint_ms)
        return reply


@pytest.fixture
async def hinting() -> AsyncIterator[HintingService]:
    service = HintingService()
    await start_server(service)
    yield service
    assert service.server is not None
    await service.server.stop(None)


async def test_worker_poll_honours_the_hint_and_logs_once(
    hinting: HintingService, caplog: pytest.LogCaptureFixture
) -> None:
    hinting.refuse_polls = 3
    caplog.set_level(logging.DEBUG, logger="worker_sdk")
    async with serving(Worker([echo], address=hinting.address)):
        token = await hinting.add_task("echo", 1)
        await wait_for(lambda: hinting.done(token))
    gaps = [b - a for a, b in itertools.pairwise(hinting.poll_times[:4])]
    assert len(gaps) == 3
    assert all(gap >= 0.3 for gap in gaps), gaps  # never sooner than the coordinator asked
    assert len(hinting.registrations) == 1  # backpressure is not a reconnect
    refusals = [r for r in caplog.records if "RESOURCE_EXHAUSTED" in r.getMessage()]
    assert [r.levelno for r in refusals] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert any("works again after 3 failures" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("batches", "whole"),
    [(True, True), (True, False), (False, True)],
    ids=["batch-refused", "result-refused", "one-by-one"],
)
async def test_worker_keeps_a_refused_result_and_resends_it_after_the_hint(
    hinting: HintingService, caplog: pytest.LogCaptureFixture, batches: bool, whole: bool
) -> None:
    """The retry hint is followed whether the whole ReportResults call was refused, or one
    result in its reply, or the CompleteTask of a coordinator without batches."""
    hinting.batches = batches
    hinting.refuse_whole_batch = whole
    hinting.refuse_completes = 2
    caplog.set_level(logging.DEBUG, logger="worker_sdk")
    async with serving(Worker([echo], address=hinting.address)):
        token = await hinting.add_task("echo", "x")
        await wait_for(lambda: hinting.done(token))
    assert len(hinting.complete_calls) == 3
    assert hinting.completions[token] == {"got": "x", "attempt": 1}
    times = hinting.complete_times
    assert all(b - a >= 0.3 for a, b in itertools.pairwise(times)), times
    warnings = [
        r
        for r in caplog.records
        if "RESOURCE_EXHAUSTED" in r.getMessage() and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1


async def test_worker_resends_a_result_through_a_long_outage(
    fake: FakeWorkerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many refusals in a row (a database outage): the result is never given up on. Short
    # delays keep the test quick; the number of attempts is what matters.
    monkeypatch.setattr("worker_sdk._runner.Backoff", lambda: Backoff(initial=0.001, maximum=0.01))
    fake.complete_errors = [(grpc.StatusCode.UNAVAILABLE, "database unavailable")] * 40
    async with serving(Worker([echo], address=fake.address)):
        token = await fake.add_task("echo", "x")
        await wait_for(lambda: fake.done(token), timeout=30)
    assert len(fake.complete_calls) == 41
    assert fake.completions[token] == {"got": "x", "attempt": 1}


@pytest.fixture
async def fake() -> AsyncIterator[FakeWorkerService]:
    service = FakeWorkerService()
    await start_server(service)
    yield service
    assert service.server is not None
    await service.server.stop(None)


# -- the Client -----------------------------------------------------------------------------


class ThrottlingWorkflows(fgrpc.WorkflowServiceServicer):
    def __init__(self, refusals: int, *, hint: bool = True) -> None:
        self.refusals = refusals
        self.hint = hint
        self.calls = 0

    async def StartExecution(
        self, request: fpb.StartExecutionRequest, context: Any
    ) -> fpb.StartExecutionResponse:
        self.calls += 1
        if self.refusals:
            self.refusals -= 1
            trailers = (("retry-after-ms", "50"),) if self.hint else ()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "start rate", trailers)
        return fpb.StartExecutionResponse(
            execution=common_pb2.Execution(
                id="e-1",
                workflow_name=request.workflow_name,
                status=common_pb2.EXECUTION_STATUS_RUNNING,
                input=json.dumps(None).encode(),
            ),
            created=True,
        )


async def _workflows(service: ThrottlingWorkflows) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    fgrpc.add_WorkflowServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_client_retries_a_throttled_start_after_the_hint() -> None:
    service = ThrottlingWorkflows(refusals=3)
    server, address = await _workflows(service)
    try:
        async with Client(address) as client:
            execution = await client.start_execution("wf")
        assert execution.id == "e-1"
        assert service.calls == 4
    finally:
        await server.stop(None)


async def test_client_gives_up_on_throttled_starts_after_backpressure_wait() -> None:
    service = ThrottlingWorkflows(refusals=1000)
    server, address = await _workflows(service)
    try:
        async with Client(address, backpressure_wait=0.3) as client:
            with pytest.raises(ResourceExhaustedError) as refused:
                await asyncio.wait_for(client.start_execution("wf"), 30)
        assert refused.value.retry_after == 0.05
        assert 1 < service.calls < 1000
        async with Client(address, backpressure_wait=0) as client:
            calls = service.calls
            with pytest.raises(ResourceExhaustedError):
                await client.start_execution("wf")
        assert service.calls == calls + 1
    finally:
        await server.stop(None)


async def test_client_does_not_retry_a_refusal_without_a_hint() -> None:
    # e.g. gRPC's own "message larger than max": retrying cannot help.
    service = ThrottlingWorkflows(refusals=5, hint=False)
    server, address = await _workflows(service)
    try:
        async with Client(address) as client:
            with pytest.raises(ResourceExhaustedError):
                await client.start_execution("wf")
        assert service.calls == 1
    finally:
        await server.stop(None)
