"""The Worker against an in-process fake WorkerService on a real socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
import pytest

import worker_sdk
from tests.support.fake_worker_service import FakeWorkerService, echo, serving, start_server
from tests.support.wait import wait_for
from worker_sdk import NonRetryableError, TaskContext, Worker, task


@pytest.fixture
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeWorkerService]:
    service = FakeWorkerService()
    service.batches = getattr(request, "param", True)
    await start_server(service)
    yield service
    assert service.server is not None
    await service.server.stop(None)


async def test_registers_and_completes_with_json_output(fake: FakeWorkerService) -> None:
    seen: list[TaskContext] = []

    @task("inspect")
    async def inspect_ctx(ctx: TaskContext, data: Any) -> Any:
        seen.append(ctx)
        return data

    worker = Worker([echo, inspect_ctx], address=fake.address, concurrency=4, labels={"zone": "a"})
    async with serving(worker):
        token = await fake.add_task("echo", {"x": [1, "é"]})
        config_token = await fake.add_task(
            "inspect", None, config=b'{"limit": 3}', metadata={"trace": "t1"}
        )
        await wait_for(lambda: fake.done(token) and fake.done(config_token))

    registration = fake.registrations[0]
    assert sorted(registration.task_types) == ["echo", "inspect"]
    assert registration.capacity == 4
    assert registration.sdk_language == "python"
    assert registration.sdk_version == worker_sdk.__version__
    assert registration.identity == f"{socket.gethostname()}:{os.getpid()}"
    assert dict(registration.labels) == {"zone": "a"}
    assert worker.worker_id == "w-1"
    assert fake.polls[0].worker_id == "w-1"
    assert fake.completions[token] == {"got": {"x": [1, "é"]}, "attempt": 1}
    assert fake.complete_calls[0].worker_id == "w-1"
    assert fake.completions[config_token] is None  # empty input → None
    ctx = seen[0]
    assert ctx.config == {"limit": 3}
    assert ctx.metadata == {"trace": "t1"}
    assert (ctx.workflow_name, ctx.workflow_version, ctx.worker_id) == ("wf", 3, "w-1")
    assert ctx.idempotency_key == f"{ctx.execution_id}/{ctx.node_id}"
    assert ctx.lease_deadline is None
    assert not ctx.cancelled


async def test_sync_handler_runs_in_a_worker_thread(fake: FakeWorkerService) -> None:
    threads: list[str] = []

    @task("sync")
    def sync_handler(ctx: TaskContext, data: Any) -> Any:
        threads.append(threading.current_thread().name)
        return data * 2

    async with serving(Worker([sync_handler], address=fake.address)):
        token = await fake.add_task("sync", 21)
        await wait_for(lambda: fake.done(token))
    assert fake.completions[token] == 42
    assert threads[0].startswith("trellis-worker")


class CardDeclined(NonRetryableError):
    pass


@pytest.mark.parametrize(
    ("exc", "error_type", "non_retryable"),
    [
        (ValueError("bad value"), "ValueError", False),
        (CardDeclined("card declined"), "CardDeclined", True),
        (NonRetryableError("give up"), "NonRetryableError", True),
    ],
)
@pytest.mark.parametrize("is_async", [True, False])
async def test_exception_fails_the_task(
    fake: FakeWorkerService, exc: Exception, error_type: str, non_retryable: bool, is_async: bool
) -> None:
    def raise_it(ctx: TaskContext, data: Any) -> Any:
        raise exc

    async def raise_async(ctx: TaskContext, data: Any) -> Any:
        raise exc

    failing = task("fails")(raise_async if is_async else raise_it)
    async with serving(Worker([failing], address=fake.address)):
        token = await fake.add_task("fails")
        await wait_for(lambda: fake.done(token))
    error = fake.failures[token]
    assert error.type == error_type
    assert error.message == str(exc)
    assert error.non_retryable is non_retryable
    assert "raise exc" in json.loads(error.details)["traceback"]


async def test_unserializable_output_fails_non_retryable(fake: FakeWorkerService) -> None:
    @task("weird")
    async def weird(ctx: TaskContext, data: Any) -> Any:
        return {"when": datetime(2024, 1, 1)}

    async with serving(Worker([weird], address=fake.address)):
        token = await fake.add_task("weird")
        await wait_for(lambda: fake.done(token))
    assert fake.failures[token].type == "OutputNotSerializable"
    assert fake.failures[token].non_retryable


async def test_task_timeout_cancels_the_handler(fake: FakeWorkerService) -> None:
    cancelled = asyncio.Event()

    @task("slow", timeout="100ms")
    async def slow(ctx: TaskContext, data: Any) -> Any:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serving(Worker([slow], address=fake.address)):
        token = await fake.add_task("slow")
        await wait_for(lambda: fake.done(token))
    assert cancelled.is_set()
    error = fake.failures[token]
    assert error.type == "TimeoutError"
    assert not error.non_retryable
    assert "0.1s" in error.message


async def test_sync_handler_timeout_sets_cancelled(fake: FakeWorkerService) -> None:
    saw_cancel = threading.Event()

    @task("slow-sync", timeout=0.1)
    def slow(ctx: TaskContext, data: Any) -> Any:
        deadline = time.monotonic() + 10
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)  # the handler's own work between checks of ctx.cancelled
        if ctx.cancelled:
            saw_cancel.set()
        return "too late"

    async with serving(Worker([slow], address=fake.address)):
        token = await fake.add_task("slow-sync")
        await wait_for(lambda: fake.done(token))
        await wait_for(saw_cancel.is_set)
    assert fake.failures[token].type == "TimeoutError"
    assert token not in fake.completions


class Busy:
    """Task type "busy": each handler sleeps ``delay`` s and returns its input; ``peak`` is
    the most handlers that ran at once."""

    def __init__(self, delay: float) -> None:
        self.running = self.peak = 0

        @task("busy")
        async def busy(ctx: TaskContext, data: Any) -> Any:
            self.running += 1
            self.peak = max(self.peak, self.running)
            await asyncio.sleep(delay)  # the work's duration, so handlers overlap
            self.running -= 1
            return data

        self.task = busy


async def test_never_runs_more_than_concurrency(fake: FakeWorkerService) -> None:
    busy = Busy(0.05)
    tokens = [await fake.add_task("busy", i) for i in range(10)]
    async with serving(Worker([busy.task], address=fake.address, concurrency=3)):
        await wait_for(lambda: all(fake.done(t) for t in tokens))
    assert busy.peak == 3
    assert fake.max_outstanding <= 3
    assert all(1 <= p.max_tasks <= 3 for p in fake.polls)
    assert sorted(fake.completions.values()) == list(range(10))


BOTH_DELIVERIES = pytest.mark.parametrize(
    "fake", [True, False], indirect=True, ids=["batched", "one-by-one"]
)


@BOTH_DELIVERIES
async def test_eager_dispatch_runs_the_tasks_a_completion_reply_carries(
    fake: FakeWorkerService,
) -> None:
    """Each completion asks for one more task of the worker's types (the slot it frees); the
    tasks in the reply run without a poll, and the worker still never exceeds concurrency."""
    busy = Busy(0.02)
    tokens = [await fake.add_task("busy", i) for i in range(12)]
    async with serving(Worker([busy.task, echo], address=fake.address, concurrency=2)):
        await wait_for(lambda: all(fake.done(t) for t in tokens))
    assert sorted(fake.completions.values()) == list(range(12))
    assert fake.eager_leased, "no task came through a completion's reply"
    assert set(fake.eager_leased) <= set(fake.completions)
    if fake.batches:  # one ask per completion in the batch, for the slot it frees
        assert fake.report_calls and all(
            r.max_next_tasks == len(r.results) and list(r.task_types) == ["busy", "echo"]
            for r in fake.report_calls
        )
    else:
        assert all(
            c.max_next_tasks == 1 and list(c.task_types) == ["busy", "echo"]
            for c in fake.complete_calls
        )
    assert busy.peak <= 2
    assert fake.max_outstanding <= 2


@BOTH_DELIVERIES
async def test_eager_dispatch_can_be_turned_off(fake: FakeWorkerService) -> None:
    tokens = [await fake.add_task("echo", i) for i in range(3)]
    async with serving(Worker([echo], address=fake.address, concurrency=1, eager_dispatch=False)):
        await wait_for(lambda: all(fake.done(t) for t in tokens))
    assert fake.eager_leased == []
    assert all(c.max_next_tasks == 0 and not c.task_types for c in fake.complete_calls)
    assert all(r.max_next_tasks == 0 and not r.task_types for r in fake.report_calls)


def gated_task() -> tuple[asyncio.Event, worker_sdk.Task]:
    """A task type "gated" whose handlers all return their input once the event is set."""
    gate = asyncio.Event()

    @task("gated")
    async def gated(ctx: TaskContext, data: Any) -> Any:
        await gate.wait()
        return data

    return gate, gated


async def test_results_finishing_together_share_a_call(fake: FakeWorkerService) -> None:
    """Results that finish while a delivery is on the wire go together in the next call."""
    gate, gated = gated_task()
    tokens = [await fake.add_task("gated", i) for i in range(20)]
    async with serving(Worker([gated], address=fake.address, concurrency=20)):
        await wait_for(lambda: len(fake.leased) == 20)
        gate.set()
        await wait_for(lambda: all(fake.done(t) for t in tokens))
    assert sorted(fake.completions.values()) == list(range(20))
    sizes = [len(r.results) for r in fake.report_calls]
    assert sum(sizes) == 20
    assert max(sizes) > 1, sizes
    assert not fake.fail_calls


async def test_a_refused_result_does_not_hold_up_its_batch(fake: FakeWorkerService) -> None:
    """Each result of a batch has its own status: the stale one is dropped, once; the
    others are accepted, once."""
    fake.complete_errors = [(grpc.StatusCode.FAILED_PRECONDITION, "stale lease")]
    gate, gated = gated_task()
    tokens = [await fake.add_task("gated", i) for i in range(6)]
    async with serving(Worker([gated], address=fake.address, concurrency=6)):
        await wait_for(lambda: len(fake.leased) == 6)
        gate.set()
        await wait_for(lambda: len(fake.complete_calls) == 6 and len(fake.completions) == 5)
    assert len(fake.complete_calls) == 6  # nothing sent twice
    assert len({c.lease_token for c in fake.complete_calls}) == 6
    assert set(fake.completions) < set(tokens)
    assert not fake.fail_calls


async def test_results_go_one_by_one_to_a_coordinator_without_batches() -> None:
    service = FakeWorkerService()
    service.batches = False
    await start_server(service)
    try:
        tokens = [await service.add_task("echo", i) for i in range(5)]
        async with serving(Worker([echo], address=service.address, concurrency=5)):
            await wait_for(lambda: all(service.done(t) for t in tokens))
            later = await service.add_task("echo", 5)  # after the fallback was learnt
            await wait_for(lambda: service.done(later))
        assert len(service.complete_calls) == 6
        assert not service.report_calls
    finally:
        assert service.server is not None
        await service.server.stop(None)


async def test_extra_tasks_from_the_coordinator_wait_for_a_slot(fake: FakeWorkerService) -> None:
    fake.overdeliver = True
    busy = Busy(0.02)
    tokens = [await fake.add_task("busy", i) for i in range(6)]
    async with serving(Worker([busy.task], address=fake.address, concurrency=2)):
        await wait_for(lambda: all(fake.done(t) for t in tokens))
    assert busy.peak == 2


async def test_heartbeat_carries_details_and_is_sent_early(fake: FakeWorkerService) -> None:
    fake.heartbeat_interval = 30.0  # only an early send can arrive in time
    release = asyncio.Event()

    @task("progress")
    async def progress(ctx: TaskContext, data: Any) -> Any:
        ctx.heartbeat({"done": 50})
        await release.wait()
        return "ok"

    async with serving(Worker([progress], address=fake.address)):
        token = await fake.add_task("progress")
        await wait_for(lambda: fake.detail_seen(token, b'{"done":50}'), timeout=3)
        assert fake.heartbeats[0].worker_id == "w-1"
        release.set()
        await wait_for(lambda: fake.done(token))


async def test_sync_heartbeat_and_periodic_send(fake: FakeWorkerService) -> None:
    release = threading.Event()

    @task("sync-progress")
    def progress(ctx: TaskContext, data: Any) -> Any:
        ctx.heartbeat([1, 2])
        release.wait(5)
        return "ok"

    async with serving(Worker([progress], address=fake.address)):
        token = await fake.add_task("sync-progress")
        # Details persist: the periodic heartbeats keep sending them.
        await wait_for(
            lambda: (
                sum(lease.details == b"[1,2]" for hb in fake.heartbeats for lease in hb.leases) >= 3
            )
        )
        release.set()
        await wait_for(lambda: fake.done(token))


async def test_cancelled_lease_cancels_async_handler_and_sends_nothing(
    fake: FakeWorkerService,
) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @task("long")
    async def long(ctx: TaskContext, data: Any) -> Any:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            assert ctx.cancelled
            cancelled.set()
            raise

    worker = Worker([long, echo], address=fake.address)
    async with serving(worker):
        token = await fake.add_task("long")
        await asyncio.wait_for(started.wait(), 5)
        fake.cancel_tokens.add(token)
        await asyncio.wait_for(cancelled.wait(), 5)
        after = await fake.add_task("echo", 1)
        await wait_for(lambda: fake.done(after))
    # stop() has drained every runner: nothing can be sent for the cancelled lease now.
    assert not fake.done(token)
    assert token not in {c.lease_token for c in fake.complete_calls}
    assert token not in {f.lease_token for f in fake.fail_calls}


async def test_lost_lease_is_seen_by_sync_handler(fake: FakeWorkerService) -> None:
    returned = threading.Event()

    @task("poller")
    def poller(ctx: TaskContext, data: Any) -> Any:
        deadline = time.monotonic() + 10
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)  # the handler's own work between checks of ctx.cancelled
        returned.set()
        return "finished anyway"

    async with serving(Worker([poller], address=fake.address)):
        token = await fake.add_task("poller")
        await wait_for(lambda: any(hb.leases for hb in fake.heartbeats))
        fake.lost_tokens.add(token)
        await wait_for(returned.is_set)
    assert not fake.done(token)
    assert not fake.complete_calls


@BOTH_DELIVERIES
async def test_result_is_redelivered_until_accepted(fake: FakeWorkerService) -> None:
    fake.complete_errors = [(grpc.StatusCode.UNAVAILABLE, "restarting")] * 3
    async with serving(Worker([echo], address=fake.address)):
        token = await fake.add_task("echo", "x")
        await wait_for(lambda: fake.done(token))
    assert len(fake.complete_calls) == 4
    assert fake.completions[token] == {"got": "x", "attempt": 1}


@BOTH_DELIVERIES
async def test_stale_lease_result_is_dropped(fake: FakeWorkerService) -> None:
    fake.complete_errors = [(grpc.StatusCode.FAILED_PRECONDITION, "stale lease")]
    async with serving(Worker([echo], address=fake.address)):
        await fake.add_task("echo", "x")
        await wait_for(lambda: len(fake.complete_calls) == 1)
    assert not fake.completions
    assert not fake.fail_calls
    assert len(fake.complete_calls) == 1


@BOTH_DELIVERIES
async def test_refused_output_becomes_non_retryable_failure(fake: FakeWorkerService) -> None:
    fake.complete_errors = [(grpc.StatusCode.INVALID_ARGUMENT, "output is 9 MiB; limit 1 MiB")]
    async with serving(Worker([echo], address=fake.address)):
        token = await fake.add_task("echo", "x")
        await wait_for(lambda: fake.done(token))
    error = fake.failures[token]
    assert error.type == "OutputRejected"
    assert error.non_retryable
    assert "output is 9 MiB; limit 1 MiB" in error.message


async def test_result_sends_next_and_expansion(fake: FakeWorkerService) -> None:
    @task("route")
    async def route(ctx: TaskContext, data: Any) -> Any:
        return worker_sdk.Result(
            {"amount": data},
            next=["manual"],
            add_nodes=(worker_sdk.TaskNode("audit", "audit"),),
            add_edges=(("route", "audit"),),
        )

    @task("plain")
    def plain(ctx: TaskContext, data: Any) -> Any:  # sync handlers may return one too
        return worker_sdk.Result(data) if data else "bare"

    async with serving(Worker([route, plain], address=fake.address)):
        token = await fake.add_task("route", 5000)
        wrapped = await fake.add_task("plain", [1])
        bare = await fake.add_task("plain", 0)
        await wait_for(lambda: all(fake.done(t) for t in (token, wrapped, bare)))
    calls = {c.lease_token: c for c in fake.complete_calls}
    assert fake.completions[token] == {"amount": 5000}
    assert list(calls[token].next) == ["manual"]
    assert [n.id for n in calls[token].expansion.nodes] == ["audit"]
    assert [(e.source, e.target) for e in calls[token].expansion.edges] == [("route", "audit")]
    assert fake.completions[wrapped] == [1]
    assert fake.completions[bare] == "bare"
    for plain_token in (wrapped, bare):
        assert not calls[plain_token].next
        assert not calls[plain_token].HasField("expansion")


async def test_refused_expansion_fails_the_task_once(fake: FakeWorkerService) -> None:
    message = "expansion: adding edge audit -> route makes a cycle"
    fake.complete_errors = [(grpc.StatusCode.INVALID_ARGUMENT, message)] * 10

    @task("route")
    async def route(ctx: TaskContext, data: Any) -> Any:
        return worker_sdk.Result(
            None,
            add_nodes=(worker_sdk.TaskNode("audit", "audit"),),
            add_edges=(("route", "audit"), ("audit", "route")),
        )

    async with serving(Worker([route], address=fake.address)):
        token = await fake.add_task("route")
        await wait_for(lambda: fake.done(token))
    assert len(fake.complete_calls) == 1  # not resent in a loop
    assert len(fake.fail_calls) == 1
    error = fake.failures[token]
    assert error.non_retryable
    assert error.type == "OutputRejected"
    assert message in error.message


async def test_poll_failure_backs_off_and_registers_again(fake: FakeWorkerService) -> None:
    fake.poll_errors = [
        (grpc.StatusCode.UNAVAILABLE, "down"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down"),
    ]
    async with serving(Worker([echo], address=fake.address)):
        token = await fake.add_task("echo", 1)
        await wait_for(lambda: fake.done(token))
    assert len(fake.registrations) == 2
    assert fake.registrations[1].worker_id == "w-1"  # the id is kept across reconnects


async def test_survives_a_coordinator_restart(fake: FakeWorkerService) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    finished = asyncio.Event()

    @task("gated")
    async def gated(ctx: TaskContext, data: Any) -> Any:
        started.set()
        await release.wait()
        finished.set()
        return "after restart"

    port = int(fake.address.rsplit(":", 1)[1])
    async with serving(Worker([gated], address=fake.address)):
        token = await fake.add_task("gated")
        await asyncio.wait_for(started.wait(), 5)
        assert fake.server is not None
        await fake.server.stop(None)  # the coordinator goes away ...
        release.set()
        await asyncio.wait_for(finished.wait(), 5)  # ... while the handler finishes
        await start_server(fake, port)  # ... and comes back on the same port
        await wait_for(lambda: fake.done(token) and len(fake.registrations) == 2, timeout=30)
    assert fake.completions[token] == "after restart"


async def test_stop_cancels_the_outstanding_poll(fake: FakeWorkerService) -> None:
    worker = Worker([echo], address=fake.address, poll_wait=60)
    serve = asyncio.create_task(worker.serve())
    await wait_for(lambda: fake.polling == 1)
    started = time.monotonic()
    await asyncio.wait_for(worker.stop(), 5)
    assert time.monotonic() - started < 2
    await asyncio.wait_for(fake.poll_cancelled.wait(), 5)
    assert serve.done()
    await serve


async def test_stop_drains_in_flight_tasks(fake: FakeWorkerService) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    @task("gated")
    async def gated(ctx: TaskContext, data: Any) -> Any:
        started.set()
        await release.wait()
        return "drained"

    worker = Worker([gated], address=fake.address)
    serve = asyncio.create_task(worker.serve())
    token = await fake.add_task("gated")
    await asyncio.wait_for(started.wait(), 5)
    await wait_for(lambda: fake.polling == 1)  # the next poll is waiting on the server
    stopping = asyncio.create_task(worker.stop())
    await asyncio.wait_for(fake.poll_cancelled.wait(), 5)
    polls = len(fake.polls)
    assert not stopping.done()
    release.set()
    await asyncio.wait_for(stopping, 5)
    await serve
    assert fake.completions[token] == "drained"
    assert len(fake.polls) == polls  # no poll after stop()


async def test_drain_timeout_hands_unfinished_tasks_back(fake: FakeWorkerService) -> None:
    started = asyncio.Event()

    @task("stuck")
    async def stuck(ctx: TaskContext, data: Any) -> Any:
        started.set()
        await asyncio.Event().wait()

    worker = Worker([stuck], address=fake.address, drain_timeout=0.2)
    serve = asyncio.create_task(worker.serve())
    token = await fake.add_task("stuck")
    # The handler runs: the lease reached the worker (not only left the server).
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(worker.stop(), 5)
    await serve
    error = fake.failures[token]
    assert error.type == "WorkerShutdown"
    assert not error.non_retryable


async def test_run_stops_gracefully_on_sigterm(fake: FakeWorkerService) -> None:
    script = (
        "import sys\n"
        "from worker_sdk import Worker, task\n"
        "@task('echo')\n"
        "async def echo(ctx, data):\n"
        "    return data\n"
        "Worker([echo], address=sys.argv[1], poll_wait=60).run()\n"
        "print('clean exit')\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, fake.address, stdout=asyncio.subprocess.PIPE
    )
    try:
        await wait_for(lambda: fake.polling == 1, timeout=20)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert stdout == b"clean exit\n"


def test_worker_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one task"):
        Worker([])
    with pytest.raises(ValueError, match="two tasks"):
        Worker([echo, task("echo")(echo.handler)])
    with pytest.raises(ValueError, match="concurrency"):
        Worker([echo], concurrency=0)
    with pytest.raises(TypeError, match="@task"):
        Worker([echo.handler])  # type: ignore[list-item]
    assert Worker([echo]).task_types == ("echo",)
