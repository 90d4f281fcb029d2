"""Connecting to the coordinator: channel options, retry policy."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any, cast

import grpc

from worker_sdk._settings import ConnectionSettings

# Reconnect quickly after a coordinator restart (gRPC's default backoff grows to 120 s),
# and accept large batches of tasks.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def open_channel(settings: ConnectionSettings) -> grpc.aio.Channel:
    """A channel to the coordinator with the SDK's options, TLS and credential (call inside
    the event loop).

    The credential is sent as metadata on every call (``authorization: Bearer``). Not as
    gRPC call credentials: their plugin runs a Python callback per call on another thread,
    which halves a worker's calls per second; metadata costs a tuple."""
    options = list(CHANNEL_OPTIONS)
    tls = settings.tls
    if tls is None:
        channel = grpc.aio.insecure_channel(settings.address, options=options)
    else:
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(tls.ca_file),
            private_key=_read(tls.key_file),
            certificate_chain=_read(tls.cert_file),
        )
        channel = grpc.aio.secure_channel(settings.address, creds, options=options)
    if not settings.api_key:
        return channel
    return cast(grpc.aio.Channel, _Authorized(channel, settings.api_key))


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


class _Authorized:
    """A channel whose calls all carry ``authorization: Bearer <key>`` (added to the
    metadata a call is given); everything else is the wrapped channel's."""

    def __init__(self, channel: grpc.aio.Channel, key: str) -> None:
        self._channel = channel
        self._metadata = (("authorization", f"Bearer {key}"),)

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.unary_unary(*args, **kwargs), self._metadata)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.unary_stream(*args, **kwargs), self._metadata)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.stream_unary(*args, **kwargs), self._metadata)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.stream_stream(*args, **kwargs), self._metadata)

    def __getattr__(self, name: str) -> Any:  # close, channel_ready, get_state ...
        return getattr(self._channel, name)

    async def __aenter__(self) -> _Authorized:
        await self._channel.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._channel.__aexit__(*exc)


class _WithMetadata:
    def __init__(self, call: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._call = call
        self._metadata = metadata

    def __call__(self, request: Any = None, *, metadata: Any = None, **kwargs: Any) -> Any:
        sent = self._metadata if not metadata else (*self._metadata, *metadata)
        return self._call(request, metadata=sent, **kwargs)


# Failures that say "not now" rather than "never": retried with backoff.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


# The coordinator's retry hint (backpressure): trailing metadata, in milliseconds.
RETRY_AFTER_KEY = "retry-after-ms"
# A hint is followed with up to this much extra delay (a fraction of it), so the clients
# refused together do not all come back at the same instant; and never beyond the cap.
_HINT_JITTER = 0.2
_MAX_HINT = 300.0


def retry_after(exc: grpc.aio.AioRpcError) -> float | None:
    """The server's retry hint in seconds (the ``retry-after-ms`` trailer), if it sent one."""
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                millis = float(value)
            except (TypeError, ValueError):
                return None
            return min(max(millis, 0.0) / 1000.0, _MAX_HINT)
    return None


class Backoff:
    """Delays of ``uniform(0, min(maximum, initial * 2**n))`` for the n-th consecutive failure,
    or the server's retry hint (plus a little jitter) when the failure carries one."""

    def __init__(self, initial: float = 0.1, maximum: float = 10.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** min(self.failures, 30))
        self.failures += 1
        return random.uniform(0.0, ceiling)

    def delay_after(self, exc: grpc.aio.AioRpcError) -> float:
        """The delay before retrying after ``exc``: its retry hint if any, else ``next_delay``."""
        hint = retry_after(exc)
        if hint is None:
            return self.next_delay()
        self.failures += 1
        return hint * (1.0 + random.uniform(0.0, _HINT_JITTER))

    def reset(self) -> None:
        self.failures = 0


class Episode:
    """Logs a run of failures of one activity once, not once per retry.

    The first failure (and one with a different status code) is logged as a warning,
    the following ones at debug level; the first success after failures is logged once.
    """

    def __init__(self, logger: logging.Logger, activity: str) -> None:
        self._logger = logger
        self._activity = activity
        self._code: grpc.StatusCode | None = None
        self.failures = 0

    def failed(
        self,
        exc: grpc.aio.AioRpcError,
        delay: float,
        *,
        extra: Mapping[str, Any] | None = None,
        level: int = logging.WARNING,
    ) -> None:
        code = exc.code()
        news = self.failures == 0 or code != self._code
        self._code = code
        self.failures += 1
        self._logger.log(
            level if news else logging.DEBUG,
            "%s failed (%s: %s); retrying in %.1fs%s",
            self._activity,
            code.name,
            exc.details(),
            delay,
            "" if news else f" ({self.failures} failures so far)",
            extra=extra,
        )

    def succeeded(self, *, extra: Mapping[str, Any] | None = None) -> None:
        if self.failures:
            self._logger.info(
                "%s works again after %d failures",
                self._activity,
                self.failures,
                extra=extra,
            )
        self.failures = 0
        self._code = None
