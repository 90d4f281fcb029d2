"""Notifications on SQLite and PostgreSQL: the NotificationService RPCs over a real socket,
the outbox written in the transaction that ends an execution, and the delivery loop's
claims, retries, breaker and exactly-once settling against the real store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.util import await_only

from coordinator import errors
from coordinator.model import (
    Channel,
    ChannelKind,
    DeliveryAttempt,
    DeliveryStatus,
    ErrorInfo,
    Execution,
    ExecutionStatus,
    NodeRun,
    NotificationRule,
    Transition,
)
from coordinator.notify import Backoff, ChannelBreakers, DestinationRefused
from coordinator.service import Decision, Store, with_deliveries
from coordinator.service._notifications import DeliverySettings, NotificationDispatcher
from coordinator.store import SqlStore, open_store
from tests.support.grpc_api import (
    Api,
    definition,
    expect_status,
    poll,
    register,
    serve_api,
    start,
)
from tests.support.wait import wait_for
from trellis.v1 import common_pb2
from trellis.v1 import notification_service_pb2 as npb
from trellis.v1 import notification_service_pb2_grpc as ngrpc
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb

FAILED = common_pb2.EXECUTION_STATUS_FAILED
SUCCEEDED = common_pb2.EXECUTION_STATUS_SUCCEEDED
# Nothing listens here (port 9 is "discard" and not served on test machines): attempts fail.
DEAD_URL = "http://127.0.0.1:9/hook"


@pytest.fixture
async def api(store: Store) -> AsyncIterator[Api]:
    """The coordinator of these tests allows notifications to loopback (their URLs are on
    127.0.0.1): TRELLIS_NOTIFY_ALLOW_NETWORKS. Without it they are refused
    (tests/integration/test_notify_destinations.py)."""
    async with serve_api(store, notify_allow_networks="127.0.0.0/8") as served:
        yield served


def stub(api: Api) -> ngrpc.NotificationServiceStub:
    return ngrpc.NotificationServiceStub(api.channel)


def webhook(name: str, url: str = DEAD_URL, secret: str = "s3cret") -> npb.Channel:
    return npb.Channel(name=name, webhook=npb.WebhookChannel(url=url, secret=secret))


async def fail_one(api: Api, name: str) -> str:
    """Start ``name`` (one node) and fail its task for good; returns the execution id."""
    execution_id = await start(api, name, {"order": 7})
    (task,) = await poll(api, wait=5)
    await api.workers.FailTask(
        wpb.FailTaskRequest(
            lease_token=task.lease_token,
            error=wpb.TaskError(
                type="CardDeclined", message="card 4242 declined", non_retryable=True
            ),
        )
    )
    return execution_id


async def status_of(api: Api, execution_id: str) -> int:
    reply = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    return int(reply.execution.status)


async def test_channels_are_created_validated_listed_and_deleted(api: Api) -> None:
    n = stub(api)
    created = (await n.CreateChannel(npb.CreateChannelRequest(channel=webhook("ops")))).channel
    assert created.id and created.name == "ops" and created.webhook.url == DEAD_URL
    assert created.webhook.secret == "<set>"  # write-only: shown as set, never its value
    smtp = npb.Channel(
        name="mail",
        smtp=npb.SmtpChannel(
            host="127.0.0.1", port=2525, from_address="trellis@example.com", to=["a@example.com"]
        ),
    )
    mail = (await n.CreateChannel(npb.CreateChannelRequest(channel=smtp))).channel
    assert "{status}" in mail.smtp.subject_template  # the default template was filled in
    by_name = (await n.GetChannel(npb.GetChannelRequest(channel="ops"))).channel
    by_id = (await n.GetChannel(npb.GetChannelRequest(channel=created.id))).channel
    assert by_name == by_id == created
    listed = (await n.ListChannels(npb.ListChannelsRequest())).channels
    assert [c.name for c in listed] == ["mail", "ops"]

    await expect_status(
        n.CreateChannel(npb.CreateChannelRequest(channel=webhook("ops"))),
        grpc.StatusCode.ABORTED,
        "already exists",
    )
    bad = {
        "webhook.url": webhook("x", url="ftp://example.com/hook"),
        "webhook.secret": webhook("x", secret=""),
        "smtp.to": npb.Channel(
            name="x", smtp=npb.SmtpChannel(host="h", port=25, from_address="a@b.c")
        ),
        "smtp.port": npb.Channel(
            name="x", smtp=npb.SmtpChannel(host="h", from_address="a@b.c", to=["d@e.f"])
        ),
        "sms.body_template": npb.Channel(
            name="x",
            sms=npb.SmsChannel(url="https://sms.example/send", body_template="{nope}", to=["+1"]),
        ),
        "channel: set one of": npb.Channel(name="x"),
        "name:": webhook("bad name!"),
    }
    for fragment, channel in bad.items():
        await expect_status(
            n.CreateChannel(npb.CreateChannelRequest(channel=channel)),
            grpc.StatusCode.INVALID_ARGUMENT,
            fragment,
        )

    await n.DeleteChannel(npb.DeleteChannelRequest(channel="ops"))
    await expect_status(
        n.GetChannel(npb.GetChannelRequest(channel="ops")), grpc.StatusCode.NOT_FOUND, "ops"
    )
    await expect_status(
        n.DeleteChannel(npb.DeleteChannelRequest(channel="ops")), grpc.StatusCode.NOT_FOUND
    )


async def test_rules_attach_channels_to_workflows_and_executions(api: Api) -> None:
    n = stub(api)
    await register(api, definition("orders", ["charge"], []))
    await n.CreateChannel(npb.CreateChannelRequest(channel=webhook("ops")))
    rule = (
        await n.CreateNotificationRule(
            npb.CreateNotificationRuleRequest(
                channel="ops", workflow_name="orders", statuses=[FAILED]
            )
        )
    ).rule
    assert rule.workflow_name == "orders" and list(rule.statuses) == [FAILED]
    everything = (
        await n.CreateNotificationRule(
            npb.CreateNotificationRuleRequest(channel="ops", workflow_name="orders")
        )
    ).rule
    assert len(everything.statuses) == 4  # empty means every final status
    execution_id = await start(api, "orders")
    one = (
        await n.CreateNotificationRule(
            npb.CreateNotificationRuleRequest(channel="ops", execution_id=execution_id)
        )
    ).rule
    assert one.execution_id == execution_id

    listed = (
        await n.ListNotificationRules(npb.ListNotificationRulesRequest(workflow_name="orders"))
    ).rules
    assert {r.id for r in listed} == {rule.id, everything.id}
    await n.DeleteNotificationRule(npb.DeleteNotificationRuleRequest(id=everything.id))
    listed = (await n.ListNotificationRules(npb.ListNotificationRulesRequest(channel="ops"))).rules
    assert {r.id for r in listed} == {rule.id, one.id}

    await expect_status(
        n.CreateNotificationRule(
            npb.CreateNotificationRuleRequest(channel="ops", workflow_name="nope")
        ),
        grpc.StatusCode.NOT_FOUND,
        "nope",
    )
    await expect_status(
        n.CreateNotificationRule(npb.CreateNotificationRuleRequest(channel="ops")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exactly one",
    )
    await expect_status(
        n.CreateNotificationRule(
            npb.CreateNotificationRuleRequest(
                channel="ops",
                workflow_name="orders",
                statuses=[common_pb2.EXECUTION_STATUS_RUNNING],
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RUNNING",
    )
    await expect_status(
        n.CreateNotificationRule(
            npb.CreateNotificationRuleRequest(channel="missing", workflow_name="orders")
        ),
        grpc.StatusCode.NOT_FOUND,
        "missing",
    )
    await expect_status(
        n.DeleteNotificationRule(npb.DeleteNotificationRuleRequest(id=everything.id)),
        grpc.StatusCode.NOT_FOUND,
    )
    # Deleting the channel deletes its rules.
    await n.DeleteChannel(npb.DeleteChannelRequest(channel="ops"))
    assert not (await n.ListNotificationRules(npb.ListNotificationRulesRequest())).rules


async def test_an_execution_ending_queues_one_delivery_per_matching_rule(api: Api) -> None:
    n = stub(api)
    await register(api, definition("orders", ["charge"], []))
    await register(api, definition("quiet", ["charge"], []))
    await n.CreateChannel(npb.CreateChannelRequest(channel=webhook("ops")))
    await n.CreateChannel(npb.CreateChannelRequest(channel=webhook("audit")))
    await n.CreateNotificationRule(
        npb.CreateNotificationRuleRequest(channel="ops", workflow_name="orders", statuses=[FAILED])
    )
    await n.CreateNotificationRule(
        npb.CreateNotificationRuleRequest(
            channel="audit", workflow_name="orders", statuses=[SUCCEEDED]
        )
    )

    failed = await fail_one(api, "orders")
    assert await status_of(api, failed) == FAILED
    (delivery,) = (
        await n.ListDeliveries(npb.ListDeliveriesRequest(execution_id=failed))
    ).deliveries
    ops = (await n.GetChannel(npb.GetChannelRequest(channel="ops"))).channel
    assert delivery.channel_id == ops.id
    assert delivery.execution_status == FAILED and delivery.workflow_name == "orders"
    doc = json.loads(delivery.payload)
    assert doc["execution_id"] == failed and doc["status"] == "FAILED"
    assert doc["workflow_name"] == "orders" and doc["workflow_version"] == 1
    assert doc["error"]["type"] == "CardDeclined"
    assert "card 4242 declined" in doc["error"]["message"]
    assert doc["error"]["node_id"] == "charge"
    assert doc["ended_at"] and doc["created_at"]

    # The delivery loop is running: the dead endpoint's attempts are recorded.
    async def attempted() -> npb.Delivery | None:
        (d,) = (await n.ListDeliveries(npb.ListDeliveriesRequest(channel="ops"))).deliveries
        return d if d.attempts else None

    seen = await wait_for(attempted, timeout=20)
    assert not seen.attempts[0].ok and seen.attempts[0].error
    assert seen.status == npb.DELIVERY_STATUS_PENDING and seen.last_error

    # No rule for this workflow: no delivery.
    quiet = await fail_one(api, "quiet")
    assert await status_of(api, quiet) == FAILED
    assert not (await n.ListDeliveries(npb.ListDeliveriesRequest(execution_id=quiet))).deliveries
    # A rule on one execution.
    execution_id = await start(api, "quiet")
    await n.CreateNotificationRule(
        npb.CreateNotificationRuleRequest(channel="audit", execution_id=execution_id)
    )
    (task,) = await poll(api, wait=5)
    await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(lease_token=task.lease_token, output=b'{"ok": true}')
    )
    (done,) = (
        await n.ListDeliveries(npb.ListDeliveriesRequest(execution_id=execution_id))
    ).deliveries
    assert done.execution_status == SUCCEEDED
    assert json.loads(done.payload)["output"] == {"ok": True}
    await expect_status(
        n.ListDeliveries(npb.ListDeliveriesRequest(channel="nope")), grpc.StatusCode.NOT_FOUND
    )


# -- the store and the dispatcher, without gRPC ----------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class ScriptedSender:
    """Fails while ``down``, refuses the destination while ``refused``; records what it was
    asked to send."""

    def __init__(self) -> None:
        self.down = False
        self.refused = False
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def send(
        self,
        kind: ChannelKind,
        config: Mapping[str, Any],
        delivery_id: str,
        notification: Mapping[str, Any],
    ) -> None:
        if self.refused:
            raise DestinationRefused("destination refused: hook.internal resolves to a loopback")
        if self.down:
            raise errors.Unavailable("connection refused")
        self.sent.append((delivery_id, dict(notification)))


async def _running_execution(store: SqlStore, name: str, clock: Clock) -> Execution:
    execution = Execution(
        id=f"e-{name}",
        workflow_name=name,
        workflow_version=1,
        status=ExecutionStatus.RUNNING,
        input=b"null",
        created_at=clock(),
        updated_at=clock(),
    )
    await store.executions.create_execution(Transition(execution=execution))
    return execution


async def _end(
    store: SqlStore, execution: Execution, status: ExecutionStatus, **extra: Any
) -> None:
    # The deliveries are decided above the store, as the service does (with_deliveries).
    rules = await store.notifications.list_rules(
        execution.tenant_id, channel_id=None, workflow_name=None, execution_id=None
    )

    def decide(loaded: Execution, nodes: Mapping[str, NodeRun]) -> Decision[None]:
        ended = replace(
            loaded,
            status=status,
            error=ErrorInfo("Boom", "it broke", node_id="n")
            if status.value != "SUCCEEDED"
            else None,
            ended_at=loaded.updated_at,
        )
        transition = Transition(execution=ended, **extra)
        return Decision(with_deliveries(transition, loaded.status, rules), None)

    await store.executions.transact(execution.tenant_id, execution.id, decide)


async def _setup(store: SqlStore, clock: Clock, name: str = "wf") -> tuple[Channel, Execution]:
    channel = await store.notifications.create_channel(
        Channel(
            "c1", "ops", ChannelKind.WEBHOOK, {"url": DEAD_URL, "secret": "s"}, clock(), "default"
        )
    )
    await store.notifications.create_rule(
        NotificationRule(
            "r1", channel.id, (ExecutionStatus.FAILED,), clock(), "default", workflow_name=name
        )
    )
    return channel, await _running_execution(store, name, clock)


async def test_the_outbox_row_commits_or_rolls_back_with_the_transition(store: SqlStore) -> None:
    clock = Clock()
    _channel, execution = await _setup(store, clock)
    # The transition that ends the execution fails after the outbox insert (a dead letter
    # that does not exist cannot be redriven): neither the status nor the delivery stay.
    with pytest.raises((errors.NotFound, errors.FailedPrecondition)):
        await _end(store, execution, ExecutionStatus.FAILED, redriven_dead_letter="missing")
    assert (
        await store.executions.get_execution("default", execution.id)
    ).status is ExecutionStatus.RUNNING
    assert await _deliveries(store) == []

    await _end(store, execution, ExecutionStatus.FAILED)
    (delivery,) = await _deliveries(store)
    assert delivery.status is DeliveryStatus.PENDING and delivery.execution_id == execution.id
    # Statuses the rule does not name, and executions of other workflows, queue nothing.
    other = await _running_execution(store, "other", clock)
    await _end(store, other, ExecutionStatus.FAILED)
    succeeded = await _running_execution(store, "wf-ok", clock)
    await store.notifications.create_rule(
        NotificationRule(
            "r2", "c1", (ExecutionStatus.FAILED,), clock(), "default", workflow_name="wf-ok"
        )
    )
    await _end(store, succeeded, ExecutionStatus.SUCCEEDED)
    assert len(await _deliveries(store)) == 1


async def _deliveries(store: SqlStore) -> list[Any]:
    return await store.notifications.list_deliveries(
        "default", execution_id=None, channel_id=None, status=None, limit=100, before=None
    )


@pytest.mark.postgres
async def test_a_listing_never_shows_an_attempt_without_the_state_it_produced(
    fresh_postgres_url: str,
) -> None:
    # A failed attempt committed while a listing runs, right after its first statement has
    # read the deliveries: the listing shows the delivery before that attempt or after it,
    # never the attempt without the last_error it set. (On PostgreSQL each statement of a
    # READ COMMITTED transaction takes its own snapshot; a SQLite transaction reads one.)
    store = await open_store(fresh_postgres_url)
    try:
        clock = Clock()
        _channel, execution = await _setup(store, clock)
        await _end(store, execution, ExecutionStatus.FAILED)
        (claimed,) = await store.notifications.claim_deliveries(clock(), 10, timedelta(seconds=30))
        written: list[str] = []

        def write_between(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if written or "FROM notification_deliveries" not in statement:
                return
            written.append(statement)
            await_only(
                store.notifications.record_attempt(
                    claimed.delivery.id,
                    claimed.delivery.claim_seq,
                    DeliveryAttempt(1, clock(), False, "connection refused"),
                    retry_at=clock() + timedelta(seconds=1),
                )
            )

        event.listen(Engine, "after_cursor_execute", write_between)
        try:
            (during,) = await _deliveries(store)
        finally:
            event.remove(Engine, "after_cursor_execute", write_between)
        assert written
        assert (during.attempts, len(during.history), during.last_error) == (0, 0, None)
        (after,) = await _deliveries(store)
        assert after.attempts == len(after.history) == 1
        assert after.last_error == after.history[0].error == "connection refused"
    finally:
        await store.close()


def _dispatcher(
    store: SqlStore, sender: ScriptedSender, clock: Clock, **settings: Any
) -> NotificationDispatcher:
    values: dict[str, Any] = {
        "backoff": Backoff(timedelta(seconds=1), timedelta(seconds=60), 2.0, 0.0),
        "max_attempts": 4,
        "breaker_threshold": 100,
        **settings,
    }
    config = DeliverySettings(**values)
    return NotificationDispatcher(
        store.notifications,
        sender,
        config,
        clock=clock,
        breakers=ChannelBreakers(config.breaker_threshold, config.breaker_reset, clock=clock),
    )


async def test_failed_attempts_retry_with_backoff_then_deliver_once(store: SqlStore) -> None:
    clock = Clock()
    _channel, execution = await _setup(store, clock)
    await _end(store, execution, ExecutionStatus.FAILED)
    sender = ScriptedSender()
    dispatcher = _dispatcher(store, sender, clock)
    sender.down = True
    assert await dispatcher.run_once() == 1
    (d,) = await _deliveries(store)
    assert d.attempts == 1 and d.status is DeliveryStatus.PENDING
    assert d.next_attempt_at == clock() + timedelta(seconds=1)
    assert await dispatcher.run_once() == 0  # not due yet
    clock.advance(1)
    assert await dispatcher.run_once() == 1
    (d,) = await _deliveries(store)
    assert d.next_attempt_at == clock() + timedelta(seconds=2)  # exponential
    sender.down = False
    clock.advance(2)
    assert await dispatcher.run_once() == 1
    (d,) = await _deliveries(store)
    assert d.status is DeliveryStatus.DELIVERED and d.delivered_at == clock()
    assert [(a.attempt, a.ok) for a in d.history] == [(1, False), (2, False), (3, True)]
    assert d.history[0].error == "connection refused"
    assert [s[0] for s in sender.sent] == [d.id]
    assert sender.sent[0][1]["status"] == "FAILED"
    clock.advance(3600)
    assert await dispatcher.run_once() == 0


async def test_a_delivery_out_of_attempts_is_failed_and_kept(store: SqlStore) -> None:
    clock = Clock()
    _channel, execution = await _setup(store, clock)
    await _end(store, execution, ExecutionStatus.FAILED)
    sender = ScriptedSender()
    sender.down = True
    dispatcher = _dispatcher(store, sender, clock, max_attempts=2)
    await dispatcher.run_once()
    clock.advance(60)
    await dispatcher.run_once()
    (d,) = await _deliveries(store)
    assert d.status is DeliveryStatus.FAILED and d.attempts == 2
    assert d.last_error == "connection refused"
    clock.advance(3600)
    assert await dispatcher.run_once() == 0
    failed = await store.notifications.list_deliveries(
        "default",
        execution_id=None,
        channel_id="c1",
        status=DeliveryStatus.FAILED,
        limit=10,
        before=None,
    )
    assert [f.id for f in failed] == [d.id]


async def test_a_refused_destination_fails_at_once_and_leaves_the_breaker_alone(
    store: SqlStore,
) -> None:
    clock = Clock()
    _channel, execution = await _setup(store, clock)
    await _end(store, execution, ExecutionStatus.FAILED)
    sender = ScriptedSender()
    sender.refused = True
    dispatcher = _dispatcher(store, sender, clock, max_attempts=10, breaker_threshold=1)
    assert await dispatcher.run_once() == 1
    (d,) = await _deliveries(store)
    # Not retried: only the operator's allow settings would change the answer.
    assert d.status is DeliveryStatus.FAILED and d.attempts == 1
    assert d.last_error == "destination refused: hook.internal resolves to a loopback"
    # The endpoint was never contacted: the channel's breaker does not count it.
    assert dispatcher.breakers.state("c1") == "closed"
    clock.advance(3600)
    assert await dispatcher.run_once() == 0


async def test_a_refused_probe_does_not_leave_the_breaker_waiting_for_it(
    store: SqlStore,
) -> None:
    clock = Clock()
    _channel, execution = await _setup(store, clock)
    await store.notifications.create_rule(
        NotificationRule(
            "r2", "c1", (ExecutionStatus.FAILED,), clock(), "default", workflow_name="wf2"
        )
    )
    await _end(store, execution, ExecutionStatus.FAILED)
    sender = ScriptedSender()
    sender.down = True
    dispatcher = _dispatcher(
        store, sender, clock, breaker_threshold=1, breaker_reset=timedelta(seconds=30)
    )
    await dispatcher.run_once()  # a failed attempt opens the breaker
    assert dispatcher.breakers.state("c1") == "open"
    clock.advance(30)
    sender.refused = True  # the probe's destination is refused (e.g. DNS changed)
    assert await dispatcher.run_once() == 1
    (first,) = await _deliveries(store)
    assert first.status is DeliveryStatus.FAILED and first.attempts == 2
    # The next delivery is the probe at once: the refused one did not hold the slot.
    sender.refused = sender.down = False
    await _end(store, await _running_execution(store, "wf2", clock), ExecutionStatus.FAILED)
    assert await dispatcher.run_once() == 1
    second = next(d for d in await _deliveries(store) if d.id != first.id)
    assert second.status is DeliveryStatus.DELIVERED
    assert dispatcher.breakers.state("c1") == "closed"


async def test_an_open_breaker_defers_without_counting_attempts(store: SqlStore) -> None:
    clock = Clock()
    _channel, execution = await _setup(store, clock)
    await _end(store, execution, ExecutionStatus.FAILED)
    sender = ScriptedSender()
    sender.down = True
    dispatcher = _dispatcher(
        store, sender, clock, breaker_threshold=1, breaker_reset=timedelta(seconds=30)
    )
    await dispatcher.run_once()  # attempt 1 fails: the breaker opens
    assert dispatcher.breakers.state("c1") == "open"
    clock.advance(1)
    assert await dispatcher.run_once() == 1  # claimed, but deferred
    (d,) = await _deliveries(store)
    assert d.attempts == 1 and d.next_attempt_at == T0 + timedelta(seconds=30)
    sender.down = False
    clock.advance(29)  # the reset has passed: one probe, which succeeds
    assert await dispatcher.run_once() == 1
    (d,) = await _deliveries(store)
    assert d.status is DeliveryStatus.DELIVERED and d.attempts == 2
    assert dispatcher.breakers.state("c1") == "closed"


async def test_a_lapsed_claim_is_taken_over_and_marked_delivered_once(store: SqlStore) -> None:
    clock = Clock()
    _channel, execution = await _setup(store, clock)
    await _end(store, execution, ExecutionStatus.FAILED)
    lease = timedelta(seconds=30)
    (first,) = await store.notifications.claim_deliveries(clock(), 10, lease)
    assert await store.notifications.claim_deliveries(clock(), 10, lease) == []  # held by the lease
    clock.advance(31)  # the first replica crashed or hung past its lease
    (second,) = await store.notifications.claim_deliveries(clock(), 10, lease)
    assert second.delivery.claim_seq == first.delivery.claim_seq + 1
    from coordinator.model import DeliveryAttempt

    # Both send; both record. One DELIVERED transition, two attempts recorded.
    n2 = await store.notifications.record_attempt(
        second.delivery.id,
        second.delivery.claim_seq,
        DeliveryAttempt(1, clock(), True),
        retry_at=None,
    )
    n1 = await store.notifications.record_attempt(
        first.delivery.id,
        first.delivery.claim_seq,
        DeliveryAttempt(1, clock(), True),
        retry_at=None,
    )
    assert (n2, n1) == (1, 2)
    (d,) = await _deliveries(store)
    assert d.status is DeliveryStatus.DELIVERED and d.delivered_at == clock()
    assert [a.ok for a in d.history] == [True, True]
    # A stale claim's failure cannot reschedule a delivery another claim owns.
    execution2 = await _running_execution(store, "wf2", clock)
    await store.notifications.create_rule(
        NotificationRule(
            "r3", "c1", (ExecutionStatus.FAILED,), clock(), "default", workflow_name="wf2"
        )
    )
    await _end(store, execution2, ExecutionStatus.FAILED)
    (old,) = await store.notifications.claim_deliveries(clock(), 10, lease)
    clock.advance(31)
    (new,) = await store.notifications.claim_deliveries(clock(), 10, lease)
    await store.notifications.record_attempt(
        old.delivery.id,
        old.delivery.claim_seq,
        DeliveryAttempt(1, clock(), False, "x"),
        retry_at=None,
    )
    pending = await store.notifications.list_deliveries(
        "default", execution_id=execution2.id, channel_id=None, status=None, limit=10, before=None
    )
    assert pending[0].status is DeliveryStatus.PENDING  # not FAILED by the stale claim
    assert new.delivery.id == pending[0].id


async def test_concurrent_claims_never_share_a_delivery(store: SqlStore) -> None:
    clock = Clock()
    await _setup(store, clock, name="unused")
    for i in range(6):
        await store.notifications.create_rule(
            NotificationRule(
                f"rule-{i}",
                "c1",
                (ExecutionStatus.FAILED,),
                clock(),
                "default",
                workflow_name=f"many-{i}",
            )
        )
        execution = await _running_execution(store, f"many-{i}", clock)
        await _end(store, execution, ExecutionStatus.FAILED)
    lease = timedelta(seconds=30)
    results = await asyncio.gather(
        *(store.notifications.claim_deliveries(clock(), 4, lease) for _ in range(3))
    )
    ids = [c.delivery.id for claimed in results for c in claimed]
    assert len(ids) == len(set(ids)) == 6
