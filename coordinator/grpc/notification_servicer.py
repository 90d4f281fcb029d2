"""NotificationService over gRPC: the servicer decodes (with ``coordinator.grpc.convert``),
calls ``coordinator.service.NotificationService`` and encodes (with ``convert`` again).
The delivery loop is wired and run by the server module."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from coordinator.grpc import convert
from coordinator.grpc.auth import tenant
from coordinator.grpc.status import unary
from coordinator.service import (
    NotificationService,
)
from trellis.v1 import notification_service_pb2 as npb
from trellis.v1 import notification_service_pb2_grpc as ngrpc

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = npb.DESCRIPTOR.services_by_name["NotificationService"].full_name

# -- servicer ------------------------------------------------------------------------------


class NotificationServicer(ngrpc.NotificationServiceServicer):
    def __init__(self, service: NotificationService) -> None:
        self._s = service

    @unary
    async def CreateChannel(
        self, request: npb.CreateChannelRequest, context: Ctx
    ) -> npb.CreateChannelResponse:
        kind, settings = convert.channel_settings_from_proto(request.channel)
        channel = await self._s.create_channel(tenant(), request.channel.name, kind, settings)
        return npb.CreateChannelResponse(channel=convert.channel_to_proto(channel))

    @unary
    async def GetChannel(
        self, request: npb.GetChannelRequest, context: Ctx
    ) -> npb.GetChannelResponse:
        channel = await self._s.get_channel(tenant(), request.channel)
        return npb.GetChannelResponse(channel=convert.channel_to_proto(channel))

    @unary
    async def ListChannels(
        self, request: npb.ListChannelsRequest, context: Ctx
    ) -> npb.ListChannelsResponse:
        channels = await self._s.list_channels(tenant())
        return npb.ListChannelsResponse(channels=[convert.channel_to_proto(c) for c in channels])

    @unary
    async def DeleteChannel(
        self, request: npb.DeleteChannelRequest, context: Ctx
    ) -> npb.DeleteChannelResponse:
        await self._s.delete_channel(tenant(), request.channel)
        return npb.DeleteChannelResponse()

    @unary
    async def CreateNotificationRule(
        self, request: npb.CreateNotificationRuleRequest, context: Ctx
    ) -> npb.CreateNotificationRuleResponse:
        statuses = convert.rule_statuses_from_proto(request.statuses)
        rule = await self._s.create_rule(
            tenant(),
            request.channel,
            workflow_name=request.workflow_name or None,
            execution_id=request.execution_id or None,
            statuses=statuses,
        )
        return npb.CreateNotificationRuleResponse(rule=convert.rule_to_proto(rule))

    @unary
    async def ListNotificationRules(
        self, request: npb.ListNotificationRulesRequest, context: Ctx
    ) -> npb.ListNotificationRulesResponse:
        rules = await self._s.list_rules(
            tenant(),
            channel_ref=request.channel or None,
            workflow_name=request.workflow_name or None,
            execution_id=request.execution_id or None,
        )
        return npb.ListNotificationRulesResponse(rules=[convert.rule_to_proto(r) for r in rules])

    @unary
    async def DeleteNotificationRule(
        self, request: npb.DeleteNotificationRuleRequest, context: Ctx
    ) -> npb.DeleteNotificationRuleResponse:
        await self._s.delete_rule(tenant(), request.id)
        return npb.DeleteNotificationRuleResponse()

    @unary
    async def ListDeliveries(
        self, request: npb.ListDeliveriesRequest, context: Ctx
    ) -> npb.ListDeliveriesResponse:
        rows, token = await self._s.list_deliveries(
            tenant(),
            execution_id=request.execution_id or None,
            channel_ref=request.channel or None,
            status=convert.delivery_status_from_proto(request.status),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return npb.ListDeliveriesResponse(
            deliveries=[convert.delivery_to_proto(d) for d in rows], next_page_token=token
        )
