"""Notification channels: validation of their settings, templates, webhook signatures,
retry delays, per-channel circuit breakers and the senders (httpx, aiosmtplib).

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
from coordinator.notify._senders import DELIVERY_HEADER, Deliverer, DeliveryError, webhook_body
from coordinator.notify._templates import (
    PLACEHOLDERS,
    check_template,
    render,
    template_values,
)
from coordinator.signing import SIGNATURE_HEADER, sign, signature, verify

__all__ = [
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
    "check_template",
    "redacted",
    "render",
    "sign",
    "signature",
    "template_values",
    "validate_channel",
    "verify",
    "webhook_body",
]
