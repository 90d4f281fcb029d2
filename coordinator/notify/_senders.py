"""Sending one notification through one channel: webhook and SMS over HTTP (httpx), e-mail
over SMTP (aiosmtplib).

``Deliverer.send`` returns when the endpoint accepted the notification and raises
``DeliveryError`` (with a one-line reason) otherwise. It never retries: the outbox does.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Mapping
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import quote, quote_plus

import aiosmtplib
import httpx

from coordinator.errors import Unavailable
from coordinator.model import ChannelKind
from coordinator.notify._templates import render, template_values
from coordinator.signing import SIGNATURE_HEADER, sign

DELIVERY_HEADER = "X-Trellis-Delivery"
USER_AGENT = "trellis-notifications/1"
_SHOWN_BODY = 200


class DeliveryError(Unavailable):
    """The channel's endpoint refused the notification or could not be reached."""


def webhook_body(delivery_id: str, notification: Mapping[str, Any]) -> bytes:
    """The JSON document POSTed to a webhook: the notification plus its delivery id."""
    doc = {"delivery_id": delivery_id, **notification}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _one_line(value: str) -> str:
    return " ".join(value.split())


def _json_fragment(value: str) -> str:
    return json.dumps(value)[1:-1]


def body_escape(headers: Mapping[str, str]) -> Callable[[str], str]:
    """How placeholder values are escaped in an SMS body, by its Content-Type: inside JSON
    strings for ``application/json``, form-encoded for ``x-www-form-urlencoded``, else as
    they are."""
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    if "json" in content_type.lower():
        return _json_fragment
    if "x-www-form-urlencoded" in content_type.lower():
        return quote_plus
    return lambda s: s


def _http_error(exc: httpx.HTTPError) -> DeliveryError:
    return DeliveryError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _check_reply(reply: httpx.Response) -> None:
    if 200 <= reply.status_code < 300:
        return
    text = _one_line(reply.text)[:_SHOWN_BODY]
    raise DeliveryError(f"HTTP {reply.status_code}" + (f": {text}" if text else ""))


class Deliverer:
    """Sends notifications; one per coordinator process (it holds an HTTP connection pool)."""

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._timeout = timeout
        self._client = client or httpx.AsyncClient(
            timeout=timeout, follow_redirects=False, headers={"User-Agent": USER_AGENT}
        )
        self._clock = clock
        self._local_hostname: str | None = None

    async def _hostname(self) -> str:
        # socket.getfqdn() may wait on DNS: once, off the event loop.
        if self._local_hostname is None:
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        return self._local_hostname

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(
        self,
        kind: ChannelKind,
        config: Mapping[str, Any],
        delivery_id: str,
        notification: Mapping[str, Any],
    ) -> None:
        if kind is ChannelKind.WEBHOOK:
            await self._webhook(config, delivery_id, notification)
        elif kind is ChannelKind.SMTP:
            await self._smtp(config, delivery_id, notification)
        else:
            await self._sms(config, delivery_id, notification)

    async def _webhook(
        self, config: Mapping[str, Any], delivery_id: str, notification: Mapping[str, Any]
    ) -> None:
        body = webhook_body(delivery_id, notification)
        headers = {
            **config.get("headers", {}),
            "Content-Type": "application/json",
            DELIVERY_HEADER: delivery_id,
            SIGNATURE_HEADER: sign(config["secret"], body, int(self._clock())),
        }
        try:
            reply = await self._client.post(config["url"], content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise _http_error(exc) from exc
        _check_reply(reply)

    async def _sms(
        self, config: Mapping[str, Any], delivery_id: str, notification: Mapping[str, Any]
    ) -> None:
        escape = body_escape(config.get("headers", {}))

        async def one(recipient: str) -> None:
            values = template_values(notification, to=recipient)
            url = render(config["url"], values, lambda s: quote(s, safe=""))
            headers = {
                name: _one_line(render(value, values))
                for name, value in config.get("headers", {}).items()
            }
            headers[DELIVERY_HEADER] = delivery_id
            body = render(config.get("body_template", ""), values, escape)
            try:
                reply = await self._client.request(
                    config["method"], url, content=body.encode() or None, headers=headers
                )
            except httpx.HTTPError as exc:
                raise _http_error(exc) from exc
            _check_reply(reply)

        recipients = list(config["to"])
        results = await asyncio.gather(*(one(r) for r in recipients), return_exceptions=True)
        failed = [(r, e) for r, e in zip(recipients, results, strict=True) if e is not None]
        for _recipient, error in failed:
            if not isinstance(error, DeliveryError):
                raise error
        if failed:
            reasons = "; ".join(f"{r}: {e}" for r, e in failed)
            raise DeliveryError(f"{len(failed)} of {len(recipients)} recipients failed: {reasons}")

    async def _smtp(
        self, config: Mapping[str, Any], delivery_id: str, notification: Mapping[str, Any]
    ) -> None:
        values = template_values(notification)
        message = EmailMessage()
        message["From"] = config["from_address"]
        message["To"] = ", ".join(config["to"])
        message["Subject"] = _one_line(render(config["subject_template"], values))
        message["Date"] = formatdate(self._clock(), usegmt=True)
        domain = config["from_address"].rpartition("@")[2].strip(">") or "trellis"
        message["Message-ID"] = make_msgid(idstring=delivery_id.replace("-", ""), domain=domain)
        message[DELIVERY_HEADER] = delivery_id
        message.set_content(render(config["body_template"], values))
        try:
            await aiosmtplib.send(
                message,
                hostname=config["host"],
                port=config["port"],
                start_tls=bool(config.get("starttls")),
                username=config.get("username") or None,
                password=config.get("password") or None,
                timeout=self._timeout,
                local_hostname=await self._hostname(),
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            reason = _one_line(str(exc)) or type(exc).__name__
            raise DeliveryError(f"SMTP {type(exc).__name__}: {reason}") from exc
