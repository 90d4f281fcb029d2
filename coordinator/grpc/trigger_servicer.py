"""TriggerService: decode the request, call the trigger use cases, encode the reply (the
conversion both ways is ``coordinator.grpc.convert``)."""

from __future__ import annotations

from typing import Any

import grpc

from coordinator.grpc import convert
from coordinator.grpc.auth import tenant
from coordinator.grpc.status import unary
from coordinator.service import Schedules, Triggers
from trellis.v1 import trigger_service_pb2 as tpb
from trellis.v1 import trigger_service_pb2_grpc as tgrpc

Ctx = grpc.aio.ServicerContext[Any, Any]


class TriggerServicer(tgrpc.TriggerServiceServicer):
    def __init__(self, triggers: Triggers, schedules: Schedules) -> None:
        self._t = triggers
        self._s = schedules

    # -- webhooks

    @unary
    async def CreateWebhookTrigger(
        self, request: tpb.CreateWebhookTriggerRequest, context: Ctx
    ) -> tpb.CreateWebhookTriggerResponse:
        tolerance = convert.duration_or_none(request, "signature_tolerance")
        trigger = await self._t.create_webhook_trigger(
            tenant(),
            request.path,
            request.workflow_name,
            request.workflow_version,
            hmac_secret=request.hmac_secret,
            bearer_token=request.bearer_token,
            signature_tolerance=tolerance,
            idempotency_expr=request.idempotency_key,
            input_expr=request.input,
        )
        return tpb.CreateWebhookTriggerResponse(trigger=convert.webhook_to_proto(trigger))

    @unary
    async def ListWebhookTriggers(
        self, request: tpb.ListWebhookTriggersRequest, context: Ctx
    ) -> tpb.ListWebhookTriggersResponse:
        rows = await self._t.list_webhook_triggers(tenant())
        return tpb.ListWebhookTriggersResponse(triggers=[convert.webhook_to_proto(t) for t in rows])

    @unary
    async def DeleteWebhookTrigger(
        self, request: tpb.DeleteWebhookTriggerRequest, context: Ctx
    ) -> tpb.DeleteWebhookTriggerResponse:
        await self._t.delete_webhook_trigger(tenant(), request.path)
        return tpb.DeleteWebhookTriggerResponse()

    @unary
    async def FireWebhook(
        self, request: tpb.FireWebhookRequest, context: Ctx
    ) -> tpb.FireWebhookResponse:
        execution, created = await self._t.fire_webhook(
            tenant(), request.path, dict(request.headers), request.body
        )
        return tpb.FireWebhookResponse(execution_id=execution.id, created=created)

    # -- schedules

    @unary
    async def CreateSchedule(
        self, request: tpb.CreateScheduleRequest, context: Ctx
    ) -> tpb.CreateScheduleResponse:
        schedule = await self._s.create_schedule(
            tenant(),
            request.id,
            request.cron,
            request.timezone,
            request.workflow_name,
            request.workflow_version,
            request.input,
            overlap=convert.overlap_from_proto(request.overlap),
            catchup=convert.catchup_from_proto(request.catchup),
            max_catchup=request.max_catchup,
            paused=request.paused,
        )
        return tpb.CreateScheduleResponse(schedule=convert.schedule_to_proto(schedule))

    @unary
    async def GetSchedule(
        self, request: tpb.GetScheduleRequest, context: Ctx
    ) -> tpb.GetScheduleResponse:
        schedule, fires = await self._s.get_schedule(tenant(), request.id)
        return tpb.GetScheduleResponse(schedule=convert.schedule_to_proto(schedule, fires))

    @unary
    async def ListSchedules(
        self, request: tpb.ListSchedulesRequest, context: Ctx
    ) -> tpb.ListSchedulesResponse:
        rows = await self._s.list_schedules(tenant())
        return tpb.ListSchedulesResponse(schedules=[convert.schedule_to_proto(s) for s in rows])

    @unary
    async def PauseSchedule(
        self, request: tpb.PauseScheduleRequest, context: Ctx
    ) -> tpb.PauseScheduleResponse:
        schedule = await self._s.pause_schedule(tenant(), request.id)
        return tpb.PauseScheduleResponse(schedule=convert.schedule_to_proto(schedule))

    @unary
    async def ResumeSchedule(
        self, request: tpb.ResumeScheduleRequest, context: Ctx
    ) -> tpb.ResumeScheduleResponse:
        schedule = await self._s.resume_schedule(tenant(), request.id)
        return tpb.ResumeScheduleResponse(schedule=convert.schedule_to_proto(schedule))

    @unary
    async def DeleteSchedule(
        self, request: tpb.DeleteScheduleRequest, context: Ctx
    ) -> tpb.DeleteScheduleResponse:
        await self._s.delete_schedule(tenant(), request.id)
        return tpb.DeleteScheduleResponse()

    # -- events

    @unary
    async def CreateEventTrigger(
        self, request: tpb.CreateEventTriggerRequest, context: Ctx
    ) -> tpb.CreateEventTriggerResponse:
        trigger = await self._t.create_event_trigger(
            tenant(),
            request.event_name,
            request.workflow_name,
            request.workflow_version,
            filter_expr=request.filter,
            input_expr=request.input,
        )
        return tpb.CreateEventTriggerResponse(trigger=convert.event_trigger_to_proto(trigger))

    @unary
    async def ListEventTriggers(
        self, request: tpb.ListEventTriggersRequest, context: Ctx
    ) -> tpb.ListEventTriggersResponse:
        rows = await self._t.list_event_triggers(tenant(), request.event_name or None)
        return tpb.ListEventTriggersResponse(
            triggers=[convert.event_trigger_to_proto(t) for t in rows]
        )

    @unary
    async def DeleteEventTrigger(
        self, request: tpb.DeleteEventTriggerRequest, context: Ctx
    ) -> tpb.DeleteEventTriggerResponse:
        await self._t.delete_event_trigger(tenant(), request.id)
        return tpb.DeleteEventTriggerResponse()

    @unary
    async def PublishEvent(
        self, request: tpb.PublishEventRequest, context: Ctx
    ) -> tpb.PublishEventResponse:
        result = await self._t.publish_event(
            tenant(), request.name, request.payload, request.idempotency_key
        )
        return convert.publish_result_to_proto(result)
