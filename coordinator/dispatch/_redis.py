"""The optional Redis connection shared by rate-limit buckets and breakers.

``RedisLink`` knows whether Redis is configured and reachable right now. Callers run
their Redis work through ``call``; when it fails with a connection error the link marks
itself degraded (logging once), callers fall back to per-process state, and a background
probe reconnects every ``retry_interval`` and logs the recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar, cast
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.backoff
import redis.exceptions
import redis.retry

T = TypeVar("T")

log = logging.getLogger(__name__)

# Short timeouts: a Redis that hangs must turn into "per process" quickly instead of
# holding up claims. One immediate retry lets a pooled connection that a Redis restart
# closed be replaced without degrading the link.
SOCKET_TIMEOUT = 0.5
_RETRIES = 1

# What makes the link degraded. Other Redis errors (a script error, a wrong type) are
# bugs and propagate as they are.
_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    TimeoutError,
    OSError,
)


class RedisUnavailable(Exception):
    """Redis is not configured, or not reachable right now: use per-process state."""


def display_url(url: str) -> str:
    """``url`` without credentials: ``redis://host:port/db`` (``unix://path?db=N``)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = f"?{parts.query}" if parts.query else ""
        return f"unix://{parts.path}{query}"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or 6379
    db = parts.path.lstrip("/") or "0"
    return f"{parts.scheme or 'redis'}://{host}:{port}/{db}"


class RedisLink:
    def __init__(
        self,
        url: str = "",
        *,
        retry_interval: timedelta = timedelta(seconds=2),
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._url = url
        self._shown = display_url(url) if url else ""
        self._retry_interval = retry_interval
        self._clock = clock or (lambda: datetime.now(UTC))
        self._client: redis.asyncio.Redis | None = None
        self._sync_client: redis.Redis | None = None
        # Set while degraded: since when, and the error that degraded it.
        self._down_since: datetime | None = None
        self._down_error = ""
        self._probe: asyncio.Task[None] | None = None
        self._callbacks: list[Callable[[bool], None]] = []

    @property
    def configured(self) -> bool:
        """True when a Redis URL was given."""
        return bool(self._url)

    @property
    def shared(self) -> bool:
        """True when Redis is configured and was reachable at the last attempt."""
        return self._client is not None and self._down_since is None

    def detail(self) -> str:
        """For readiness: "shared through redis://host:port/db" or "per process: ..."."""
        if not self.configured:
            return "per process: TRELLIS_REDIS_URL is not set"
        if self._client is None:
            return f"per process: not connected to {self._shown} yet"
        if self._down_since is not None:
            return (
                f"per process: redis unreachable since {self._down_since.isoformat()} "
                f"({self._down_error})"
            )
        return f"shared through {self._shown}"

    async def call(self, fn: Callable[[redis.asyncio.Redis], Awaitable[T]]) -> T:
        """``await fn(client)`` with the redis.asyncio client; raises RedisUnavailable
        (after marking the link degraded) when Redis is unset or unreachable.

        Work that uses the synchronous client (``sync_client``) runs through here too,
        e.g. ``await link.call(lambda _: asyncio.to_thread(work))``, so that its
        connection errors degrade the link the same way."""
        client = self._client
        if client is None:
            raise RedisUnavailable(self.detail())
        if self._down_since is not None:
            raise RedisUnavailable(self.detail())
        try:
            return await fn(client)
        except _DOWN_ERRORS as exc:
            self._degrade(exc)
            raise RedisUnavailable(self.detail()) from exc

    def sync_client(self) -> redis.Redis:
        """A synchronous client on the same URL, for libraries that need one (pybreaker
        storage). Use it in a worker thread, inside ``call``."""
        if not self.configured:
            raise RedisUnavailable(self.detail())
        if self._sync_client is None:
            self._sync_client = redis.Redis.from_url(
                self._url,
                socket_connect_timeout=SOCKET_TIMEOUT,
                socket_timeout=SOCKET_TIMEOUT,
                retry=redis.retry.Retry(redis.backoff.NoBackoff(), _RETRIES),
            )
        return self._sync_client

    def on_change(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(shared)`` whenever the link goes degraded or recovers."""
        self._callbacks.append(callback)

    async def start(self) -> None:
        """Connect (not fatal when Redis is down: the link starts degraded)."""
        if not self.configured or self._client is not None:
            return
        self._client = redis.asyncio.Redis.from_url(
            self._url,
            socket_connect_timeout=SOCKET_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            retry=redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), _RETRIES),
        )
        with contextlib.suppress(RedisUnavailable):
            await self.call(_ping)
        if self._down_since is None:
            log.info("rate limits and breakers shared through %s", self._shown)

    async def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        sync_client, self._sync_client = self._sync_client, None
        if sync_client is not None:
            sync_client.close()

    # -- degraded mode ---------------------------------------------------------------

    def _degrade(self, exc: BaseException) -> None:
        if self._down_since is not None:
            return  # already degraded (concurrent calls failing together): logged once
        self._down_since = self._clock()
        self._down_error = str(exc) or type(exc).__name__
        log.warning(
            "redis unreachable at %s: %s; rate limits and breakers are per process "
            "until it returns",
            self._shown,
            self._down_error,
        )
        self._notify(False)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(
                self._reconnect(), name="trellis-redis-probe"
            )

    async def _reconnect(self) -> None:
        client = self._client
        assert client is not None
        while True:
            await asyncio.sleep(self._retry_interval.total_seconds())
            try:
                await _ping(client)
            except _DOWN_ERRORS:
                continue
            break
        since = self._down_since
        self._down_since = None
        self._down_error = ""
        log.info(
            "redis reachable again at %s (per process since %s); limits and breakers shared again",
            self._shown,
            since.isoformat() if since else "?",
        )
        self._notify(True)

    def _notify(self, shared: bool) -> None:
        for callback in self._callbacks:
            try:
                callback(shared)
            except Exception:
                log.exception("redis link change callback failed")


async def _ping(client: redis.asyncio.Redis) -> object:
    # redis-py annotates commands for both clients at once (``Awaitable[bool] | bool``).
    return await cast(Awaitable[bool], client.ping())
