"""The gateway's HTTP/1.1 connections (uvicorn's h11 protocol), guarded against slow and
too many clients.

Each connection is always in one of three phases, read from h11's state of the client's
side after every event (bytes arriving, a response completing, a pipelined request picked
up from the buffer):

- *waiting* for a request head: a head must arrive whole within ``header_timeout`` of the
  connection opening, of its first byte on a kept-alive connection, or of the moment a
  pipelined, unfinished head is picked up; else 408 and the connection is closed.
- *body*: the head is in, the body is arriving. The body must arrive within
  ``body_timeout`` of the head: the routes that read one answer 408 themselves
  (``gateway.app``); this protocol closes, a second later, any connection still sending a
  body nobody answered in time (e.g. to an unknown path, or after an answer that did not
  wait for it). The head and body of one request together get at most
  ``header_timeout + body_timeout`` (and the second).
- *busy*: the whole request is in and the app is answering it.

A head that is malformed or over h11's 16 KiB is answered 400 (JSON, like every error).

At most ``max_connections`` are open. One more evicts, in this order:

1. the connection that has waited longest for a head (idle between requests, or still
   sending its head) when that is at least ``_SETTLE_SECONDS``;
2. else the slowest connection sending a body: one whose request was already answered
   first, then the fewest body bytes a second since its head;
3. else the connection waiting longest for a head, however short that is.

Only when every connection is busy is the new one refused (503). A flood of idle, slow or
slowly sending connections therefore cannot lock out a probe of ``/healthz``, which sends
its head at once (and a just-opened probe is not the first to go).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

# The protocol's own fallback comes this long after the app's body deadline.
_BODY_GRACE_SECONDS = 1.0
# A connection waiting for a head this long counts as slow when the server is full; one
# opened more recently is evicted only when no connection is sending a body.
_SETTLE_SECONDS = 1.0
# Body rates are taken over at least this long, so one early burst does not count as fast.
_RATE_WINDOW_SECONDS = 1.0

Phase = Literal["waiting", "body", "busy"]


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
    # Connections waiting for a request head, the longest waiting first (a dict keeps
    # insertion order), and connections sending a body: who is evicted when full.
    waiting: dict[GuardedProtocol, None] = {}
    sending: set[GuardedProtocol] = set()
    # Connections closed by this protocol that the loop has not yet reported lost: they
    # no longer count against the limit.
    closing: set[GuardedProtocol] = set()
    head_late = _raw_error(
        408,
        "Request Timeout",
        f"the request head did not arrive within {header_timeout:g}s "
        "(TRELLIS_GATEWAY_HEADER_TIMEOUT); send the request line and headers at once",
    )
    body_late = _raw_error(
        408,
        "Request Timeout",
        f"the body did not arrive within {body_timeout:g}s (TRELLIS_GATEWAY_BODY_TIMEOUT)",
    )
    evicted_waiting = _raw_error(
        408,
        "Request Timeout",
        "the connection was closed to make room: it had no request in progress while the "
        f"gateway was at its limit of {max_connections} connections",
    )
    evicted_sending = _raw_error(
        408,
        "Request Timeout",
        "the connection was closed to make room: it was the slowest sending its request "
        f"body while the gateway was at its limit of {max_connections} connections "
        "(TRELLIS_GATEWAY_MAX_CONNECTIONS); send the body as fast as the head",
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

    def victim(now: float) -> GuardedProtocol | None:
        """The connection to evict for a new one (the order in the module doc), if any."""
        longest = next(iter(waiting), None)
        if longest is not None and now - longest._waiting_since >= _SETTLE_SECONDS:
            return longest
        if sending:
            return min(sending, key=lambda conn: conn._body_progress(now))
        return longest

    class GuardedProtocol(H11Protocol):
        _phase: Phase = "busy"
        _request: object = None  # the request cycle the phase belongs to
        _request_started: float | None = None
        _waiting_since = 0.0
        _body_started = 0.0
        _body_bytes = 0
        _head_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) - len(closing) > max_connections:
                other = victim(self.loop.time())
                if other is None:
                    log.warning("connection refused: %d connections, all busy", max_connections)
                    self._cut_off(full)
                    return
                other._evict()
            self._track()
            self._start_head()

        def data_received(self, data: bytes) -> None:
            if self._phase == "waiting" and self._head_timer is None:
                self._start_head()  # the first byte of the next request on a kept-alive one
            request = self._request if self._phase == "body" else None
            held = len(self.cycle.body) if request is not None else 0
            super().data_received(data)  # handle_events tracks the phase
            if request is not None and self._request is request and self._phase == "body":
                # What this call added to the body the app has not read yet (uvicorn drops
                # the bytes of a body whose request was already answered: no progress).
                self._body_bytes += len(self.cycle.body) - held

        def handle_events(self) -> None:
            # Called for received bytes and, after a response, for pipelined requests.
            super().handle_events()
            self._track()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._track()

        def connection_lost(self, exc: Exception | None) -> None:
            self._forget()
            closing.discard(self)
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            # uvicorn answers text; the gateway's errors are JSON.
            self._cut_off(malformed)

        def _track(self) -> None:
            """Move to the phase h11's state of the client's side says, on any change."""
            if self.transport.is_closing():
                self._forget()  # closed by uvicorn: nothing to time, nobody to evict
                return
            state = self.conn.their_state
            phase: Phase = (
                "waiting" if state is h11.IDLE else "body" if state is h11.SEND_BODY else "busy"
            )
            request = None if phase == "waiting" else self.cycle
            if phase == self._phase and request is self._request:
                return
            self._forget()
            previous, self._phase, self._request = self._phase, phase, request
            now = self.loop.time()
            if phase == "waiting":
                self._waiting_since, self._request_started = now, None
                waiting[self] = None  # at the back
                if self.conn.trailing_data[0]:
                    self._start_head()  # a pipelined head, not yet whole
            elif phase == "body":
                # The request began with its head, or now when it was picked up whole
                # from the bytes pipelined behind the previous one.
                started = self._request_started if previous == "waiting" else None
                started = self._request_started = now if started is None else started
                # The body bytes already in: with its head, or pipelined with it.
                self._body_started, self._body_bytes = now, len(self.cycle.body)
                sending.add(self)
                deadline = min(now + body_timeout, started + header_timeout + body_timeout)
                self._body_timer = self.loop.call_at(
                    deadline + _BODY_GRACE_SECONDS, self._body_late
                )
            else:
                self._request_started = None

        def _start_head(self) -> None:
            if self._phase == "waiting" and self._head_timer is None:
                self._request_started = self.loop.time()
                self._head_timer = self.loop.call_later(header_timeout, self._head_late)

        def _forget(self) -> None:
            """Leave the current phase: its timers and its place in the eviction order."""
            waiting.pop(self, None)
            sending.discard(self)
            for timer in (self._head_timer, self._body_timer):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._body_timer = None

        def _answering(self) -> bool:
            """Whether a response has been started (a 100 Continue does not count)."""
            return self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

        def _body_progress(self, now: float) -> tuple[bool, float, float]:
            """Sorts the slowest body first: one already answered, then the fewest bytes a
            second since the head, then the longest under way."""
            elapsed = max(now - self._body_started, _RATE_WINDOW_SECONDS)
            return (not self._answering(), self._body_bytes / elapsed, self._body_started)

        def _evict(self) -> None:
            if self._phase == "body":
                log.warning(
                    "slow body evicted: at the limit of %d (%d bytes in %.1fs)",
                    max_connections,
                    self._body_bytes,
                    self.loop.time() - self._body_started,
                )
                self._cut_off(evicted_sending)
            else:
                log.warning("idle connection evicted: at the limit of %d", max_connections)
                self._cut_off(evicted_waiting)

        def _head_late(self) -> None:
            self._head_timer = None
            if self._phase == "waiting" and not self.transport.is_closing():
                log.warning("request head too slow: connection closed after %gs", header_timeout)
                self._cut_off(head_late)

        def _body_late(self) -> None:
            self._body_timer = None
            if self._phase == "body" and not self.transport.is_closing():
                log.warning("request body too slow: connection closed")
                self._cut_off(body_late)

        def _cut_off(self, answer: bytes) -> None:
            """Close the connection, with ``answer`` unless a response is already under way
            (it would be cut in two)."""
            self._forget()
            if not self.transport.is_closing():
                closing.add(self)
                if not self._answering():
                    self.transport.write(answer)
                self.transport.close()

    return GuardedProtocol


__all__ = ["guarded_protocol"]
