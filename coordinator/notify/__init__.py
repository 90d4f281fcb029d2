"""Notification channels: validation of their settings, templates, webhook signatures,
retry delays, per-channel circuit breakers, the senders (httpx, aiosmtplib) and the check
of where they may connect (``Destinations``: public addresses only, unless allowed).

This package does I/O but holds no state of its own beyond the breakers: the outbox
(which notifications are due, their attempts) lives in the store and is driven by
``coordinator.service`` (``NotificationDispatcher``). It imports neither SQLAlchemy nor grpc.
"""

from coordinator.model import ChannelKind
from coordinator.notify._backoff import Backoff
from coordinator.notify._breaker import ChannelBreakers
from coordinator.notify._channels import (
    DEFAULT_BODY,
    DEFAULT_SUBJECT,
    redacted,
    validate_channel,
)
from coordinator.notify._network import (
    ALLOW_HOSTS_SETTING,
    ALLOW_NETWORKS_SETTING,
    DestinationRefused,
    Destinations,
    forbidden_reason,
)
from coordinator.notify._senders import (
    DELIVERY_HEADER,
    Deliverer,
    DeliveryError,
    guarded_client,
    webhook_body,
)
from coordinator.notify._templates import (
    PLACEHOLDERS,
    check_template,
    render,
    template_values,
)
from coordinator.signing import SIGNATURE_HEADER, sign, signature, verify

__all__ = [
    "ALLOW_HOSTS_SETTING",
    "ALLOW_NETWORKS_SETTING",
    "DEFAULT_BODY",
    "DEFAULT_SUBJECT",
    "DELIVERY_HEADER",
    "PLACEHOLDERS",
    "SIGNATURE_HEADER",
    "Backoff",
    "ChannelBreakers",
    "ChannelKind",
    "Deliverer",
    "DeliveryError",
    "DestinationRefused",
    "Destinations",
    "check_template",
    "forbidden_reason",
    "guarded_client",
    "redacted",
    "render",
    "sign",
    "signature",
    "template_values",
    "validate_channel",
    "verify",
    "webhook_body",
]
