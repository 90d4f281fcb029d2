"""Start options of an execution (delayed starts, max_concurrency), the request shape batch
starts share, and the store seam of max_running_executions (the overflow queue)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from coordinator.errors import InvalidArgument
from coordinator.model import WorkflowDef

# The furthest ahead a start may be scheduled.
MAX_START_DELAY = timedelta(days=3650)
# The most executions one BatchStartExecutions call may start.
MAX_BATCH_START = 1000
# The highest max_concurrency a start may ask for.
MAX_EXECUTION_CONCURRENCY = 10_000


@dataclass(frozen=True)
class StartRequest:
    """One execution to start, as a client asks for it."""

    workflow_name: str
    workflow_version: int | None = None
    input: bytes = b""
    idempotency_key: str | None = None
    priority: int = 0
    # Delayed start: at this time, or after this delay (at most one of them).
    start_time: datetime | None = None
    delay: timedelta | None = None
    # Most nodes of the execution leased at once; 0 = the definition's max_concurrency.
    max_concurrency: int = 0


def start_at(request: StartRequest, now: datetime) -> datetime | None:
    """When a delayed start is due, or None to start now (no delay, or a time passed)."""
    if request.start_time is not None and request.delay is not None:
        raise InvalidArgument("set at most one of start_time and delay, not both")
    if request.delay is not None:
        if request.delay < timedelta(0):
            raise InvalidArgument(f"delay {request.delay} is negative; pass a delay of 0 or more")
        at = now + request.delay
    elif request.start_time is not None:
        at = request.start_time
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
    else:
        return None
    if at - now > MAX_START_DELAY:
        raise InvalidArgument(
            f"start time {at.isoformat()} is more than {MAX_START_DELAY.days} days ahead; "
            "schedule it closer"
        )
    return at if at > now else None


def execution_concurrency(request: StartRequest, defn: WorkflowDef) -> int:
    """The max_concurrency an execution gets: the request's, else the definition's."""
    value = request.max_concurrency
    if not 0 <= value <= MAX_EXECUTION_CONCURRENCY:
        raise InvalidArgument(
            f"max_concurrency {value} is out of range; use 1 to {MAX_EXECUTION_CONCURRENCY}, "
            "or 0 for the workflow definition's max_concurrency"
        )
    return value or defn.max_concurrency


# -- max_running_executions ---------------------------------------------------------------
