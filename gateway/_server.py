"""The gateway's HTTP/1.1 connections (uvicorn's h11 protocol), guarded against slow and
too many clients.

- A request head (request line and headers) must arrive whole within ``header_timeout``
  of the connection opening, or of its first byte on a kept-alive connection: a client
  sending it a byte at a time is answered 408 and cut off.
- A request body must arrive within ``body_timeout``: the routes that read one answer 408
  themselves (``gateway.app``); this protocol cuts off, a second later, any connection
  still sending a body nobody answered in time (e.g. to an unknown path).
- A head that is malformed or over h11's 16 KiB is answered 400 (JSON, like every error).
- At most ``max_connections`` are open. One more evicts the connection that has waited
  longest without a request in progress (still sending its head, or idle between
  requests); only when every connection is busy with a request is the new one refused
  (503). A flood of idle or slow connections therefore cannot lock out a probe of
  ``/healthz``, which sends its head at once.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

# The protocol's own fallback comes this long after the app's body deadline.
_BODY_GRACE_SECONDS = 1.0


def _raw_error(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(
    *, header_timeout: float, body_timeout: float, max_connections: int
) -> type[H11Protocol]:
    """An ``H11Protocol`` class for one server, with these bounds (see the module doc)."""
    # Connections with no request in progress, the longest waiting first (a dict keeps
    # insertion order): who is evicted when the server is full.
    idle: dict[GuardedProtocol, None] = {}
    head_late = _raw_error(
        408,
        "Request Timeout",
        f"the request head did not arrive within {header_timeout:g}s "
        "(TRELLIS_GATEWAY_HEADER_TIMEOUT); send the request line and headers at once",
    )
    evicted = _raw_error(
        408,
        "Request Timeout",
        "the connection was closed to make room: it had no request in progress while the "
        f"gateway was at its limit of {max_connections} connections",
    )
    malformed = _raw_error(
        400,
        "Bad Request",
        "the request head is malformed or larger than 16384 bytes; send a valid HTTP/1.1 "
        "request line and headers",
    )
    full = _raw_error(
        503,
        "Service Unavailable",
        f"the gateway is at its limit of {max_connections} connections, all busy "
        "(TRELLIS_GATEWAY_MAX_CONNECTIONS); retry later",
    )

    class GuardedProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                victim = next(iter(idle), None)
                if victim is None:
                    log.warning("connection refused: %d connections, all busy", max_connections)
                    self._cut_off(full)
                    return
                log.warning("idle connection evicted: at the limit of %d", max_connections)
                victim._cut_off(evicted)
            idle[self] = None
            self._head_timer = self.loop.call_later(header_timeout, self._head_late)

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                # The first byte of the next request on a kept-alive connection.
                self._head_timer = self.loop.call_later(header_timeout, self._head_late)
            super().data_received(data)
            state = self.conn.their_state
            if state is not h11.IDLE and self._head_timer is not None:
                # The head is in: the request is in progress.
                self._head_timer.cancel()
                self._head_timer = None
                idle.pop(self, None)
                if state is h11.SEND_BODY:
                    self._body_timer = self.loop.call_later(
                        body_timeout + _BODY_GRACE_SECONDS, self._body_late
                    )
            if state is not h11.SEND_BODY and self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                idle.pop(self, None)
                idle[self] = None  # kept alive, waiting for the next request: at the back

        def connection_lost(self, exc: Exception | None) -> None:
            idle.pop(self, None)
            for timer in (self._head_timer, self._body_timer):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._body_timer = None
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            # uvicorn answers text; the gateway's errors are JSON.
            self._cut_off(malformed)

        def _head_late(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.warning("request head too slow: connection closed after %gs", header_timeout)
                self._cut_off(head_late)

        def _body_late(self) -> None:
            self._body_timer = None
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                log.warning("request body too slow: connection closed")
                self.transport.close()

        def _cut_off(self, answer: bytes) -> None:
            idle.pop(self, None)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            if not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.close()

    return GuardedProtocol


__all__ = ["guarded_protocol"]
