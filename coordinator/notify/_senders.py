"""Sending one notification through one channel: webhook and SMS over HTTP (httpx), e-mail
over SMTP (aiosmtplib).

``Deliverer.send`` returns when the endpoint accepted the notification and raises
``DeliveryError`` (with a one-line reason) otherwise. It never retries: the outbox does.

Every connection goes through the destination check (``coordinator/notify/_network.py``):
``DestinationRefused`` when the host is, or resolves to, a forbidden address. Nothing an
endpoint answers is shown back beyond its status: the reason of a failure is the HTTP status
with its standard phrase, the SMTP reply code, or a fixed phrase for a network error, never
text from the reply (an internal service reached by mistake must not be readable through
``ListDeliveries``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, quote_plus

import aiosmtplib
import httpcore
import httpx

from coordinator.errors import Unavailable
from coordinator.model import ChannelKind
from coordinator.notify._network import (
    Destinations,
    GuardedBackend,
    connect_socket,
    tls_verify_reason,
)
from coordinator.notify._templates import render, template_values
from coordinator.signing import SIGNATURE_HEADER, sign

DELIVERY_HEADER = "X-Trellis-Delivery"
USER_AGENT = "trellis-notifications/1"


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


def _os_reason(exc: BaseException) -> str:
    """A fixed phrase for a network error: the errno's name, never a message from afar."""
    while exc is not None:
        if isinstance(exc, socket.gaierror):
            return "could not resolve the host name"
        if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode:
            return {
                errno.ECONNREFUSED: "connection refused",
                errno.ECONNRESET: "connection reset",
                errno.EHOSTUNREACH: "host unreachable",
                errno.ENETUNREACH: "network unreachable",
                errno.ETIMEDOUT: "connection timed out",
            }.get(exc.errno, f"network error ({errno.errorcode[exc.errno]})")
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return ""


def _http_error(exc: httpx.HTTPError) -> DeliveryError:
    """The reason of a failed request, from a fixed vocabulary (httpx's messages may quote
    bytes the endpoint sent, e.g. a malformed status line)."""
    if isinstance(exc, httpx.TimeoutException):
        phrase = {
            httpx.ConnectTimeout: "timed out connecting",
            httpx.ReadTimeout: "timed out waiting for the reply",
            httpx.WriteTimeout: "timed out sending",
            httpx.PoolTimeout: "timed out waiting for a connection",
        }.get(type(exc), "timed out")
    elif isinstance(exc, httpx.ConnectError):
        phrase = tls_verify_reason(exc) or _os_reason(exc) or "could not connect"
    elif isinstance(exc, httpx.RemoteProtocolError):
        phrase = "the endpoint broke the HTTP protocol"
    elif isinstance(exc, httpx.NetworkError):
        phrase = _os_reason(exc) or "connection lost"
    elif isinstance(exc, httpx.TooManyRedirects):
        phrase = "too many redirects"
    else:
        phrase = "request failed"
    return DeliveryError(f"{type(exc).__name__}: {phrase}")


def status_reason(status: int) -> str:
    """``HTTP 503 Service Unavailable``: the standard phrase, never the one the server sent."""
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _check_reply(reply: httpx.Response) -> None:
    if 200 <= reply.status_code < 300:
        return
    reason = status_reason(reply.status_code)
    if 300 <= reply.status_code < 400:
        reason += " (redirects are not followed: give the channel the final URL)"
    raise DeliveryError(reason)


def guarded_client(
    destinations: Destinations,
    timeout: float,
    *,
    ssl_context: ssl.SSLContext | None = None,
    follow_redirects: bool = False,
) -> httpx.AsyncClient:
    """An httpx client whose every connection (each redirect's too, were they followed) is
    checked by ``destinations``. The Deliverer's follows no redirects, and it ignores proxy
    settings from the environment (a proxy would connect wherever it is told, past the
    check). ``ssl_context``: the trusted CAs (default: the system's)."""
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    # httpx takes no network backend, so its pool is replaced by one that has ours (the
    # same pool httpx builds, tests/unit/test_notify_destinations.py checks it is used).
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context or httpx.create_ssl_context(trust_env=False),
        network_backend=GuardedBackend(destinations),
    )
    return httpx.AsyncClient(
        timeout=timeout,
        follow_redirects=follow_redirects,
        trust_env=False,
        transport=transport,
        headers={"User-Agent": USER_AGENT},
    )


class Deliverer:
    """Sends notifications; one per coordinator process (it holds an HTTP connection pool)."""

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        destinations: Destinations | None = None,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._timeout = timeout
        self._destinations = destinations or Destinations()
        self._client = client or guarded_client(self._destinations, timeout)
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
            sock = await connect_socket(
                self._destinations, config["host"], config["port"], self._timeout
            )
        except (OSError, TimeoutError) as exc:
            phrase = "timed out connecting" if isinstance(exc, TimeoutError) else _os_reason(exc)
            raise DeliveryError(f"SMTP: {phrase or 'could not connect'}") from exc
        try:
            await aiosmtplib.send(
                message,
                hostname=config["host"],
                sock=sock,
                start_tls=bool(config.get("starttls")),
                username=config.get("username") or None,
                password=config.get("password") or None,
                timeout=self._timeout,
                local_hostname=await self._hostname(),
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryError(f"SMTP {type(exc).__name__}: {smtp_reason(exc)}") from exc
        finally:
            sock.close()


def smtp_reason(exc: BaseException) -> str:
    """A fixed phrase and the reply code for a failed SMTP exchange, never the server's
    text."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = sorted({r.code for r in exc.recipients})
        return "recipients refused (reply " + ", ".join(map(str, codes)) + ")"
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return f"authentication refused (reply {exc.code})"
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"the server refused (reply {exc.code})"
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return "timed out"
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return "the server closed the connection"
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return "the server lacks a required extension (STARTTLS or AUTH)"
    return tls_verify_reason(exc) or _os_reason(exc) or "SMTP exchange failed"
