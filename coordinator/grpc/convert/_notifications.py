"""NotificationService: channels (their settings in, redacted out), rules and deliveries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format

from coordinator.errors import InvalidArgument
from coordinator.grpc.convert._common import (
    execution_status_from_proto,
    execution_status_to_proto,
)
from coordinator.grpc.convert._common import timestamp_to_proto as _ts
from coordinator.model import (
    Channel,
    ChannelKind,
    Delivery,
    DeliveryStatus,
    ExecutionStatus,
    NotificationRule,
)
from coordinator.notify import redacted
from trellis.v1 import common_pb2
from trellis.v1 import notification_service_pb2 as npb

# -- channels -----------------------------------------------------------------------------


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


# -- rules --------------------------------------------------------------------------------


def rule_statuses_from_proto(
    values: Iterable[common_pb2.ExecutionStatus.ValueType],
) -> list[ExecutionStatus]:
    """The statuses a rule fires on; UNSPECIFIED is refused (it is no status)."""
    statuses = []
    for value in values:
        status = execution_status_from_proto(value)
        if status is None:
            raise InvalidArgument("statuses: EXECUTION_STATUS_UNSPECIFIED is not a status")
        statuses.append(status)
    return statuses


def rule_to_proto(rule: NotificationRule) -> npb.NotificationRule:
    out = npb.NotificationRule(
        id=rule.id,
        channel_id=rule.channel_id,
        statuses=[execution_status_to_proto(s) for s in rule.statuses],
        create_time=_ts(rule.created_at),
    )
    if rule.workflow_name is not None:
        out.workflow_name = rule.workflow_name
    elif rule.execution_id is not None:
        out.execution_id = rule.execution_id
    return out


# -- deliveries ---------------------------------------------------------------------------


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
        execution_status=execution_status_to_proto(d.execution_status),
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
