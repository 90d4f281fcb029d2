"""TriggerService over gRPC (in process, SQLite and PostgreSQL): webhooks, events, schedules."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from coordinator.signing import sign
from tests.support.grpc_api import DIAMOND, Api, expect_status, register
from tests.support.wait import wait_for
from trellis.v1 import trigger_service_pb2 as tpb
from trellis.v1 import trigger_service_pb2_grpc as tgrpc
from trellis.v1 import workflow_service_pb2 as fpb

SECRET = "s3cret-s3cret-s3cret"
TOKEN = "bearer-token-0123456789"


def stub(api: Api) -> tgrpc.TriggerServiceStub:
    return tgrpc.TriggerServiceStub(api.channel)


async def executions(api: Api) -> list[str]:
    reply = await api.workflows.ListExecutions(fpb.ListExecutionsRequest(workflow_name="diamond"))
    return [e.id for e in reply.executions]


def signed(body: bytes, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    return {"X-Trellis-Signature": sign(secret, body, int(time.time()) if at is None else at)}


# -- webhooks ---------------------------------------------------------------------------


async def test_webhook_registration_is_validated(api: Api) -> None:
    triggers = stub(api)
    await register(api, DIAMOND)
    cases = [
        (
            tpb.CreateWebhookTriggerRequest(
                path="a b", workflow_name="diamond", hmac_secret=SECRET
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "path",
        ),
        (
            tpb.CreateWebhookTriggerRequest(path="p", workflow_name="diamond"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "exactly one",
        ),
        (
            tpb.CreateWebhookTriggerRequest(path="p", workflow_name="diamond", hmac_secret="short"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at least 16",
        ),
        (
            tpb.CreateWebhookTriggerRequest(
                path="p", workflow_name="diamond", hmac_secret=SECRET, idempotency_key="body.("
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "webhook trigger 'p' idempotency_key is not a valid CEL expression",
        ),
        (
            tpb.CreateWebhookTriggerRequest(path="p", workflow_name="nope", hmac_secret=SECRET),
            grpc.StatusCode.NOT_FOUND,
            "nope",
        ),
    ]
    for request, code, fragment in cases:
        await expect_status(triggers.CreateWebhookTrigger(request), code, fragment)
    assert (await triggers.ListWebhookTriggers(tpb.ListWebhookTriggersRequest())).triggers == []

    ok = tpb.CreateWebhookTriggerRequest(
        path="github/push", workflow_name="diamond", hmac_secret=SECRET
    )
    created = (await triggers.CreateWebhookTrigger(ok)).trigger
    assert created.auth == tpb.WEBHOOK_AUTH_HMAC_SHA256
    assert created.signature_tolerance.seconds == 300
    await expect_status(
        triggers.CreateWebhookTrigger(ok), grpc.StatusCode.ALREADY_EXISTS, "github/push"
    )
    listed = (await triggers.ListWebhookTriggers(tpb.ListWebhookTriggersRequest())).triggers
    assert [t.path for t in listed] == ["github/push"]
    assert SECRET not in str(listed), "secrets are never returned"
    await triggers.DeleteWebhookTrigger(tpb.DeleteWebhookTriggerRequest(path="github/push"))
    await expect_status(
        triggers.DeleteWebhookTrigger(tpb.DeleteWebhookTriggerRequest(path="github/push")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_signed_webhook_starts_once_per_idempotency_key(api: Api) -> None:
    triggers = stub(api)
    await register(api, DIAMOND)
    await triggers.CreateWebhookTrigger(
        tpb.CreateWebhookTriggerRequest(
            path="orders",
            workflow_name="diamond",
            hmac_secret=SECRET,
            idempotency_key="body.order_id",
            input='{"n": body.qty, "via": headers["x-source"]}',
        )
    )
    body = json.dumps({"order_id": "o-1", "qty": 3}).encode()
    headers = {**signed(body), "X-Source": "shop"}
    first = await triggers.FireWebhook(
        tpb.FireWebhookRequest(path="orders", headers=headers, body=body)
    )
    assert first.created
    # Delivered again, signed afresh: the idempotency key finds the first execution.
    resigned = {**signed(body, at=int(time.time()) + 1), "X-Source": "shop"}
    again = await triggers.FireWebhook(
        tpb.FireWebhookRequest(path="orders", headers=resigned, body=body)
    )
    assert (again.execution_id, again.created) == (first.execution_id, False)
    # The very same signed request again is a replay, refused.
    await expect_status(
        triggers.FireWebhook(tpb.FireWebhookRequest(path="orders", headers=headers, body=body)),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=first.execution_id))
    assert json.loads(got.execution.input) == {"n": 3, "via": "shop"}
    assert got.execution.idempotency_key == "webhook:orders:o-1"

    refused = [
        ({"X-Trellis-Signature": sign("wrong-secret-wrong", body, int(time.time()))}, body),
        (signed(body, at=int(time.time()) - 3600), body),
        ({}, body),
        (signed(body), body + b" "),
    ]
    for bad_headers, bad_body in refused:
        await expect_status(
            triggers.FireWebhook(
                tpb.FireWebhookRequest(path="orders", headers=bad_headers, body=bad_body)
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    not_json = b"{not json"
    await expect_status(
        triggers.FireWebhook(
            tpb.FireWebhookRequest(path="orders", headers=signed(not_json), body=not_json)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not valid JSON",
    )
    await expect_status(
        triggers.FireWebhook(tpb.FireWebhookRequest(path="nowhere", headers={}, body=b"{}")),
        grpc.StatusCode.NOT_FOUND,
        "nowhere",
    )
    assert await executions(api) == [first.execution_id], "no error case started anything"


async def test_bearer_webhook_without_key_starts_every_time(api: Api) -> None:
    triggers = stub(api)
    await register(api, DIAMOND)
    await triggers.CreateWebhookTrigger(
        tpb.CreateWebhookTriggerRequest(path="hook", workflow_name="diamond", bearer_token=TOKEN)
    )
    good = {"Authorization": f"Bearer {TOKEN}"}
    ids = set()
    for _ in range(2):
        reply = await triggers.FireWebhook(
            tpb.FireWebhookRequest(path="hook", headers=good, body=b'{"n": 1}')
        )
        assert reply.created
        ids.add(reply.execution_id)
    assert len(ids) == 2
    got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=ids.pop()))
    assert json.loads(got.execution.input) == {"n": 1}, "the body is the default input"
    for headers in ({"Authorization": "Bearer nope-nope-nope-nope"}, {}):
        await expect_status(
            triggers.FireWebhook(tpb.FireWebhookRequest(path="hook", headers=headers, body=b"{}")),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    assert len(await executions(api)) == 2


# -- events -----------------------------------------------------------------------------


async def test_publish_event_starts_matching_triggers_and_reports_failures(api: Api) -> None:
    triggers = stub(api)
    await register(api, DIAMOND)
    big = await triggers.CreateEventTrigger(
        tpb.CreateEventTriggerRequest(
            event_name="order.created",
            workflow_name="diamond",
            filter="event.total > 100",
            input='{"n": event.total}',
        )
    )
    every = await triggers.CreateEventTrigger(
        tpb.CreateEventTriggerRequest(event_name="order.created", workflow_name="diamond")
    )
    await triggers.CreateEventTrigger(
        tpb.CreateEventTriggerRequest(event_name="other", workflow_name="diamond")
    )
    await expect_status(
        triggers.CreateEventTrigger(
            tpb.CreateEventTriggerRequest(
                event_name="x", workflow_name="diamond", filter="event.a + 1"
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a boolean",
    )

    reply = await triggers.PublishEvent(
        tpb.PublishEventRequest(name="order.created", payload=b'{"total": 250}')
    )
    started = {e.trigger_id: e for e in reply.executions}
    assert set(started) == {big.trigger.id, every.trigger.id}
    got = await api.workflows.GetExecution(
        fpb.GetExecutionRequest(execution_id=started[big.trigger.id].execution_id)
    )
    assert json.loads(got.execution.input) == {"n": 250}

    small = await triggers.PublishEvent(
        tpb.PublishEventRequest(name="order.created", payload=b'{"total": 5}')
    )
    assert [e.trigger_id for e in small.executions] == [every.trigger.id]
    assert small.filtered_out == 1

    # The filter cannot be evaluated on this payload: reported, the other trigger still runs.
    odd = await triggers.PublishEvent(
        tpb.PublishEventRequest(name="order.created", payload=b'{"total": "lots"}')
    )
    assert [e.trigger_id for e in odd.executions] == [every.trigger.id]
    assert [f.trigger_id for f in odd.failures] == [big.trigger.id]
    assert "filter" in odd.failures[0].message

    keyed = tpb.PublishEventRequest(name="other", payload=b"{}", idempotency_key="k1")
    one = await triggers.PublishEvent(keyed)
    two = await triggers.PublishEvent(keyed)
    assert one.executions[0].created and not two.executions[0].created
    assert one.executions[0].execution_id == two.executions[0].execution_id
    assert len(await executions(api)) == 5

    await expect_status(
        triggers.PublishEvent(tpb.PublishEventRequest(name="other", payload=b"{nope")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "JSON",
    )
    listed = await triggers.ListEventTriggers(tpb.ListEventTriggersRequest(event_name="other"))
    assert len(listed.triggers) == 1
    await triggers.DeleteEventTrigger(tpb.DeleteEventTriggerRequest(id=listed.triggers[0].id))
    none = await triggers.PublishEvent(tpb.PublishEventRequest(name="other", payload=b"{}"))
    assert list(none.executions) == []


# -- schedules --------------------------------------------------------------------------


async def test_schedule_crud_and_validation(api: Api) -> None:
    triggers = stub(api)
    await register(api, DIAMOND)
    bad = [
        (dict(id="s", cron="61 * * * *"), grpc.StatusCode.INVALID_ARGUMENT, "not valid"),
        (dict(id="s", cron="* *"), grpc.StatusCode.INVALID_ARGUMENT, "5 fields"),
        (
            dict(id="s", cron="0 * * * *", timezone="Mars/Olympus"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "IANA",
        ),
        (dict(id="s", cron="0 * * * *", workflow_name="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (dict(id="bad id", cron="0 * * * *"), grpc.StatusCode.INVALID_ARGUMENT, "schedule id"),
    ]
    for fields, code, fragment in bad:
        request = tpb.CreateScheduleRequest(**{"workflow_name": "diamond", **fields})
        await expect_status(triggers.CreateSchedule(request), code, fragment)

    request = tpb.CreateScheduleRequest(
        id="nightly",
        cron="0 2 * * *",
        timezone="Europe/Paris",
        workflow_name="diamond",
        input=b'{"n": 2}',
        overlap=tpb.OVERLAP_POLICY_BUFFER_ONE,
        catchup=tpb.CATCHUP_POLICY_RUN_ALL,
    )
    created = (await triggers.CreateSchedule(request)).schedule
    assert created.next_fire_time.seconds > time.time()
    assert created.next_fire_time.ToDatetime().minute == 0
    assert created.max_catchup == 100
    await expect_status(triggers.CreateSchedule(request), grpc.StatusCode.ALREADY_EXISTS)

    paused = (await triggers.PauseSchedule(tpb.PauseScheduleRequest(id="nightly"))).schedule
    assert paused.paused and not paused.HasField("next_fire_time")
    resumed = (await triggers.ResumeSchedule(tpb.ResumeScheduleRequest(id="nightly"))).schedule
    assert not resumed.paused and resumed.next_fire_time == created.next_fire_time
    listed = (await triggers.ListSchedules(tpb.ListSchedulesRequest())).schedules
    assert [s.id for s in listed] == ["nightly"]
    await triggers.DeleteSchedule(tpb.DeleteScheduleRequest(id="nightly"))
    await expect_status(
        triggers.GetSchedule(tpb.GetScheduleRequest(id="nightly")), grpc.StatusCode.NOT_FOUND
    )


@pytest.mark.timeout(60)
async def test_the_scheduler_loop_fires_a_per_second_schedule(api: Api) -> None:
    triggers = stub(api)
    await register(api, DIAMOND)
    await triggers.CreateSchedule(
        tpb.CreateScheduleRequest(
            id="tick",
            cron="* * * * * *",
            workflow_name="diamond",
            overlap=tpb.OVERLAP_POLICY_ALLOW,
        )
    )

    async def fired() -> list[tpb.ScheduleFire]:
        reply = await triggers.GetSchedule(tpb.GetScheduleRequest(id="tick"))
        return list(reply.schedule.recent_fires) if len(reply.schedule.recent_fires) >= 2 else []

    fires = await wait_for(fired, timeout=20)
    await triggers.PauseSchedule(tpb.PauseScheduleRequest(id="tick"))
    got = await api.workflows.GetExecution(
        fpb.GetExecutionRequest(execution_id=fires[-1].execution_id)
    )
    at = fires[-1].fire_time.ToDatetime().replace(tzinfo=None).isoformat()
    assert got.execution.idempotency_key == f"schedule:tick:{at}+00:00"
