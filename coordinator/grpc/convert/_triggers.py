"""TriggerService: webhook and event triggers, schedules and their fires, published events."""

from __future__ import annotations

from coordinator.errors import InvalidArgument
from coordinator.grpc.convert._common import timestamp_to_proto as _ts
from coordinator.model import (
    CatchupPolicy,
    EventTrigger,
    FireOutcome,
    OverlapPolicy,
    Schedule,
    ScheduleFire,
    WebhookAuth,
    WebhookTrigger,
)
from coordinator.service import PublishResult
from trellis.v1 import trigger_service_pb2 as tpb

_AUTH = {
    WebhookAuth.HMAC_SHA256: tpb.WEBHOOK_AUTH_HMAC_SHA256,
    WebhookAuth.BEARER: tpb.WEBHOOK_AUTH_BEARER,
}
_OVERLAP_TO = {
    OverlapPolicy.SKIP: tpb.OVERLAP_POLICY_SKIP,
    OverlapPolicy.ALLOW: tpb.OVERLAP_POLICY_ALLOW,
    OverlapPolicy.BUFFER_ONE: tpb.OVERLAP_POLICY_BUFFER_ONE,
}
_OVERLAP_FROM = {v: k for k, v in _OVERLAP_TO.items()} | {
    tpb.OVERLAP_POLICY_UNSPECIFIED: OverlapPolicy.SKIP
}
_CATCHUP_TO = {
    CatchupPolicy.SKIP_MISSED: tpb.CATCHUP_POLICY_SKIP_MISSED,
    CatchupPolicy.RUN_ONCE: tpb.CATCHUP_POLICY_RUN_ONCE,
    CatchupPolicy.RUN_ALL: tpb.CATCHUP_POLICY_RUN_ALL,
}
_CATCHUP_FROM = {v: k for k, v in _CATCHUP_TO.items()} | {
    tpb.CATCHUP_POLICY_UNSPECIFIED: CatchupPolicy.RUN_ONCE
}
_OUTCOME = {
    FireOutcome.STARTED: tpb.SCHEDULE_FIRE_OUTCOME_STARTED,
    FireOutcome.SKIPPED: tpb.SCHEDULE_FIRE_OUTCOME_SKIPPED,
    FireOutcome.BUFFERED: tpb.SCHEDULE_FIRE_OUTCOME_BUFFERED,
}


def overlap_from_proto(value: int) -> OverlapPolicy:
    try:
        return _OVERLAP_FROM[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(f"unknown overlap policy {value}") from None


def catchup_from_proto(value: int) -> CatchupPolicy:
    try:
        return _CATCHUP_FROM[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(f"unknown catch-up policy {value}") from None


def webhook_to_proto(t: WebhookTrigger) -> tpb.WebhookTrigger:
    msg = tpb.WebhookTrigger(
        path=t.path,
        workflow_name=t.workflow_name,
        workflow_version=t.workflow_version,
        auth=_AUTH[t.auth],
        idempotency_key=t.idempotency_expr,
        input=t.input_expr,
        create_time=_ts(t.created_at),
    )
    if t.auth is WebhookAuth.HMAC_SHA256:
        msg.signature_tolerance.FromTimedelta(t.signature_tolerance)
    return msg


def event_trigger_to_proto(t: EventTrigger) -> tpb.EventTrigger:
    return tpb.EventTrigger(
        id=t.id,
        event_name=t.event_name,
        workflow_name=t.workflow_name,
        workflow_version=t.workflow_version,
        filter=t.filter_expr,
        input=t.input_expr,
        create_time=_ts(t.created_at),
    )


def fire_to_proto(f: ScheduleFire) -> tpb.ScheduleFire:
    return tpb.ScheduleFire(
        fire_time=_ts(f.fire_at), outcome=_OUTCOME[f.outcome], execution_id=f.execution_id or ""
    )


def schedule_to_proto(s: Schedule, fires: list[ScheduleFire] | None = None) -> tpb.Schedule:
    return tpb.Schedule(
        id=s.id,
        cron=s.cron,
        timezone=s.timezone,
        workflow_name=s.workflow_name,
        workflow_version=s.workflow_version,
        input=s.input,
        overlap=_OVERLAP_TO[s.overlap],
        catchup=_CATCHUP_TO[s.catchup],
        max_catchup=s.max_catchup,
        paused=s.paused,
        next_fire_time=_ts(s.next_fire_at),
        last_fire_time=_ts(s.last_fire_at),
        last_execution_id=s.last_execution_id or "",
        buffered_fire_time=_ts(s.buffered_fire_at),
        started_fires=s.started_fires,
        skipped_fires=s.skipped_fires,
        missed_fires=s.missed_fires,
        create_time=_ts(s.created_at),
        recent_fires=[fire_to_proto(f) for f in fires or ()],
    )


def publish_result_to_proto(result: PublishResult) -> tpb.PublishEventResponse:
    return tpb.PublishEventResponse(
        executions=[
            tpb.TriggeredExecution(trigger_id=tid, execution_id=e.id, created=created)
            for tid, e, created in result.started
        ],
        failures=[tpb.TriggerFailure(trigger_id=tid, message=m) for tid, m in result.failures],
        filtered_out=result.filtered_out,
    )
