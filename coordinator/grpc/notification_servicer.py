"""NotificationService over gRPC, and the delivery loop's lifecycle in the server.

The servicer decodes, calls ``coordinator.service.NotificationService`` and encodes; the
proto <-> domain conversion of notification messages is the section below (it concerns
only this service's messages). ``add_notifications`` wires both into a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import json_format

from coordinator.config import CoordinatorConfig
from coordinator.errors import InvalidArgument
from coordinator.grpc import convert
from coordinator.grpc.convert import timestamp_to_proto as _ts
from coordinator.grpc.status import unary
from coordinator.model import (
    DEFAULT_TENANT,
    Channel,
    ChannelKind,
    Delivery,
    DeliveryStatus,
    NotificationRule,
)
from coordinator.notify import Backoff, Deliverer, redacted
from coordinator.service import Coordinator
from coordinator.service._notifications import (
    DeliverySettings,
    NotificationDispatcher,
    NotificationService,
)
from trellis.v1 import notification_service_pb2 as npb
from trellis.v1 import notification_service_pb2_grpc as ngrpc

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]
TENANT = DEFAULT_TENANT
SERVICE_NAME = npb.DESCRIPTOR.services_by_name["NotificationService"].full_name

# -- conversion ----------------------------------------------------------------------------


def channel_settings_from_proto(channel: npb.Channel) -> tuple[ChannelKind, dict[str, Any]]:
    which = channel.WhichOneof("settings")
    if which is None:
        raise InvalidArgument("channel: set one of webhook, smtp or sms")
    kind = ChannelKind(which)
    message = getattr(channel, which)
    # Proto3 JSON with field names as declared (snake_case), defaults included so that an
    # unset port reads as 0 and is refused by validation, not silently defaulted.
    doc = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return kind, doc


def channel_to_proto(channel: Channel) -> npb.Channel:
    shown: Mapping[str, Any] = redacted(channel.config)
    out = npb.Channel(id=channel.id, name=channel.name, create_time=_ts(channel.created_at))
    target = getattr(out, channel.kind.value)
    json_format.ParseDict(dict(shown), target)
    return out


def rule_to_proto(rule: NotificationRule) -> npb.NotificationRule:
    out = npb.NotificationRule(
        id=rule.id,
        channel_id=rule.channel_id,
        statuses=[convert.execution_status_to_proto(s) for s in rule.statuses],
        create_time=_ts(rule.created_at),
    )
    if rule.workflow_name is not None:
        out.workflow_name = rule.workflow_name
    elif rule.execution_id is not None:
        out.execution_id = rule.execution_id
    return out


def delivery_status_from_proto(
    value: npb.DeliveryStatus.ValueType,
) -> DeliveryStatus | None:
    if value == npb.DELIVERY_STATUS_UNSPECIFIED:
        return None
    try:
        name = npb.DeliveryStatus.Name(value)
    except ValueError:
        raise InvalidArgument(f"status: unknown delivery status {value}") from None
    return DeliveryStatus(name.removeprefix("DELIVERY_STATUS_"))


def delivery_to_proto(d: Delivery) -> npb.Delivery:
    return npb.Delivery(
        id=d.id,
        execution_id=d.execution_id,
        workflow_name=d.workflow_name,
        execution_status=convert.execution_status_to_proto(d.execution_status),
        channel_id=d.channel_id,
        rule_id=d.rule_id,
        status=npb.DeliveryStatus.Value(f"DELIVERY_STATUS_{d.status.value}"),
        payload=d.payload,
        create_time=_ts(d.created_at),
        next_attempt_time=_ts(d.next_attempt_at) if d.status is DeliveryStatus.PENDING else None,
        deliver_time=_ts(d.delivered_at),
        last_error=d.last_error or "",
        attempts=[
            npb.DeliveryAttempt(attempt=a.attempt, time=_ts(a.time), ok=a.ok, error=a.error or "")
            for a in d.history
        ],
    )


# -- servicer ------------------------------------------------------------------------------


class NotificationServicer(ngrpc.NotificationServiceServicer):
    def __init__(self, service: NotificationService) -> None:
        self._s = service

    @unary
    async def CreateChannel(
        self, request: npb.CreateChannelRequest, context: Ctx
    ) -> npb.CreateChannelResponse:
        kind, settings = channel_settings_from_proto(request.channel)
        channel = await self._s.create_channel(TENANT, request.channel.name, kind, settings)
        return npb.CreateChannelResponse(channel=channel_to_proto(channel))

    @unary
    async def GetChannel(
        self, request: npb.GetChannelRequest, context: Ctx
    ) -> npb.GetChannelResponse:
        channel = await self._s.get_channel(TENANT, request.channel)
        return npb.GetChannelResponse(channel=channel_to_proto(channel))

    @unary
    async def ListChannels(
        self, request: npb.ListChannelsRequest, context: Ctx
    ) -> npb.ListChannelsResponse:
        channels = await self._s.list_channels(TENANT)
        return npb.ListChannelsResponse(channels=[channel_to_proto(c) for c in channels])

    @unary
    async def DeleteChannel(
        self, request: npb.DeleteChannelRequest, context: Ctx
    ) -> npb.DeleteChannelResponse:
        await self._s.delete_channel(TENANT, request.channel)
        return npb.DeleteChannelResponse()

    @unary
    async def CreateNotificationRule(
        self, request: npb.CreateNotificationRuleRequest, context: Ctx
    ) -> npb.CreateNotificationRuleResponse:
        statuses = []
        for value in request.statuses:
            status = convert.execution_status_from_proto(value)
            if status is None:
                raise InvalidArgument("statuses: EXECUTION_STATUS_UNSPECIFIED is not a status")
            statuses.append(status)
        rule = await self._s.create_rule(
            TENANT,
            request.channel,
            workflow_name=request.workflow_name or None,
            execution_id=request.execution_id or None,
            statuses=statuses,
        )
        return npb.CreateNotificationRuleResponse(rule=rule_to_proto(rule))

    @unary
    async def ListNotificationRules(
        self, request: npb.ListNotificationRulesRequest, context: Ctx
    ) -> npb.ListNotificationRulesResponse:
        rules = await self._s.list_rules(
            TENANT,
            channel_ref=request.channel or None,
            workflow_name=request.workflow_name or None,
            execution_id=request.execution_id or None,
        )
        return npb.ListNotificationRulesResponse(rules=[rule_to_proto(r) for r in rules])

    @unary
    async def DeleteNotificationRule(
        self, request: npb.DeleteNotificationRuleRequest, context: Ctx
    ) -> npb.DeleteNotificationRuleResponse:
        await self._s.delete_rule(TENANT, request.id)
        return npb.DeleteNotificationRuleResponse()

    @unary
    async def ListDeliveries(
        self, request: npb.ListDeliveriesRequest, context: Ctx
    ) -> npb.ListDeliveriesResponse:
        rows, token = await self._s.list_deliveries(
            TENANT,
            execution_id=request.execution_id or None,
            channel_ref=request.channel or None,
            status=delivery_status_from_proto(request.status),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return npb.ListDeliveriesResponse(
            deliveries=[delivery_to_proto(d) for d in rows], next_page_token=token
        )


# -- wiring --------------------------------------------------------------------------------


def delivery_settings(config: CoordinatorConfig) -> DeliverySettings:
    return DeliverySettings(
        poll_interval=config.notify_poll_interval,
        max_attempts=config.notify_max_attempts,
        max_age=config.notify_max_age,
        backoff=Backoff(
            initial=config.notify_backoff_initial,
            maximum=config.notify_backoff_max,
            multiplier=config.notify_backoff_multiplier,
            jitter=config.notify_backoff_jitter,
        ),
        breaker_threshold=config.notify_breaker_threshold,
        breaker_reset=config.notify_breaker_reset,
        send_timeout=config.notify_send_timeout,
    )


class NotificationRuntime:
    """The delivery loop of one coordinator process: ``start`` after serving, ``stop``
    before closing the store. A delivery being sent when it stops is claimed until its
    lease passes, then sent again (by any replica)."""

    def __init__(self, dispatcher: NotificationDispatcher, deliverer: Deliverer) -> None:
        self.dispatcher = dispatcher
        self._deliverer = deliverer
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.dispatcher.run(), name="notifications")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._deliverer.aclose()


def add_notifications(
    server: grpc.aio.Server, coordinator: Coordinator, config: CoordinatorConfig
) -> NotificationRuntime:
    """Serve NotificationService on ``server``; the returned runtime runs the delivery loop."""
    store = coordinator.store.notifications
    service = NotificationService(
        store,
        coordinator.store.executions,
        coordinator.store.workflows,
        clock=coordinator.clock,
        rules=coordinator.rules,
        wakeups=coordinator.store.wakeups,
    )
    ngrpc.add_NotificationServiceServicer_to_server(NotificationServicer(service), server)
    settings = delivery_settings(config)
    deliverer = Deliverer(timeout=settings.send_timeout.total_seconds())
    dispatcher = NotificationDispatcher(store, deliverer, settings, clock=coordinator.clock)
    return NotificationRuntime(dispatcher, deliverer)
