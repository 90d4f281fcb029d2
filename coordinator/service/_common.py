"""What every use case shares: the settings, the clock, ids, and checks of client input."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from coordinator import engine
from coordinator.errors import InvalidArgument
from coordinator.model import NULL_JSON
from coordinator.notify import Destinations

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class ServiceSettings:
    max_payload_bytes: int = 1024 * 1024
    poll_max_wait: timedelta = timedelta(seconds=30)
    heartbeat_interval: timedelta = timedelta(seconds=5)
    # A poll hands out at most as many tasks as fit this reply size at the payload limit.
    max_reply_bytes: int = 64 * 1024 * 1024
    # A worker holding leases that sends no heartbeat (nor claims) for this long is lost:
    # its leases are failed (retryable) at once.
    worker_liveness_timeout: timedelta = timedelta(seconds=15)
    limits: engine.Limits = field(default_factory=engine.Limits)
    # Deepest nesting of sub-workflows (a root execution has depth 0).
    max_workflow_depth: int = 10
    # A repeated idempotency key within this window returns the first execution.
    idempotency_window: timedelta = timedelta(hours=24)
    # Where notification channels may point besides public addresses (none by default).
    notify_destinations: Destinations = field(default_factory=Destinations)

    def check_payload(self, name: str, payload: bytes) -> bytes:
        """A strict JSON document within the size limit; empty means null."""
        return self.decode_payload(name, payload)[0]

    def decode_payload(self, name: str, payload: bytes) -> tuple[bytes, Any]:
        """``check_payload`` and the decoded document (``engine.decode_json``: no NaN or
        Infinity, no lone surrogates, bounded nesting and numbers)."""
        if not payload:
            return NULL_JSON, None
        limit = self.max_payload_bytes
        if len(payload) > limit:
            raise InvalidArgument(
                f"{name} is {len(payload)} bytes, over the {limit}-byte limit "
                "(TRELLIS_MAX_PAYLOAD_BYTES); pass large data by reference"
            )
        return payload, engine.decode_json(payload, name)


def check_names(**values: str | Sequence[str] | None) -> None:
    """Identifiers from clients must not carry NUL characters (stores differ on them)."""
    for name, value in values.items():
        items = [value] if isinstance(value, str) else list(value or ())
        if any("\x00" in item for item in items):
            raise InvalidArgument(f"{name} contains a NUL character; remove it")


def clamp_page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(requested or 100, 1000)


class Dated(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...


D = TypeVar("D", bound=Dated)


def page_of(rows: Sequence[D], limit: int) -> tuple[list[D], str]:
    """A page of ``rows`` read newest first with one row more than ``limit``, and the token
    of the next page (the last row's creation time and id), empty on the last page."""
    more = len(rows) > limit
    kept = list(rows[:limit])
    if not more:
        return kept, ""
    return kept, f"{int(kept[-1].created_at.timestamp() * 1000)}:{kept[-1].id}"


def decode_cursor(token: str) -> tuple[datetime, str]:
    try:
        ms, _, ident = token.partition(":")
        return datetime.fromtimestamp(int(ms) / 1000, UTC), ident
    except ValueError as exc:
        raise InvalidArgument("page_token is malformed; pass next_page_token unchanged") from exc


class Draining:
    """Whether the coordinator is shutting down: polls return empty and new ones are
    refused, watches end (one flag shared by the use cases that wait)."""

    def __init__(self) -> None:
        self.on = False

    def __call__(self) -> bool:
        return self.on
