"""Task definitions (the ``@task`` decorator) and the context handed to handlers."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from worker_sdk._duration import Duration, parse_positive_duration

Handler = Callable[["TaskContext", Any], Any]
"""``async def h(ctx, data)`` or ``def h(ctx, data)``; returns a JSON-serializable value."""

_TASK_LOGGER = logging.getLogger("worker_sdk.task")


def _is_async_callable(handler: Callable[..., Any]) -> bool:
    while isinstance(handler, functools.partial):
        handler = handler.func
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - objects with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


@dataclass(frozen=True)
class Task:
    """A named handler that a Worker serves; made by the ``@task`` decorator.

    ``timeout`` (longest one attempt may run) is enforced by the worker and is
    also the default ``start_to_close_timeout`` of workflow nodes built with
    this task; ``retries`` (extra attempts after the first) is the default
    retry policy of those nodes. ``is_async`` tells whether the handler is a
    coroutine function (sync handlers run in a thread pool). A Task is still
    callable like its handler.
    """

    name: str
    handler: Handler
    timeout: timedelta | None = None
    retries: int | None = None
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"task name must be a non-empty string, got {self.name!r}")
        if not callable(self.handler):
            raise TypeError(f"task {self.name!r}: handler must be callable, got {self.handler!r}")
        if self.timeout is not None:
            # Accepts anything parse_duration does, for Task(...) built by hand.
            timeout = parse_positive_duration(self.timeout, what=f"timeout of task {self.name!r}")
            object.__setattr__(self, "timeout", timeout)
        if self.retries is not None and (
            isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0
        ):
            raise ValueError(
                f"task {self.name!r}: retries must be a non-negative integer, got {self.retries!r}"
            )
        object.__setattr__(self, "is_async", _is_async_callable(self.handler))

    def __call__(self, ctx: TaskContext, data: Any) -> Any:
        return self.handler(ctx, data)


def task(
    name: str,
    *,
    timeout: Duration | None = None,
    retries: int | None = None,
) -> Callable[[Handler], Task]:
    """Declares a task handler served under ``name``::

    @task("send-email", timeout="30s", retries=3)
    async def send_email(ctx, data):
        ...
    """
    if callable(name):
        raise TypeError("use @task('name'), not bare @task: a task needs the name it is served as")
    parsed = None if timeout is None else parse_positive_duration(timeout, what="task timeout")

    def decorate(handler: Handler) -> Task:
        return Task(name=name, handler=handler, timeout=parsed, retries=retries)

    return decorate


class _LeaseSignals:
    """State shared between a TaskContext and the worker running it; safe across threads."""

    __slots__ = ("_cancelled", "_details", "_lock", "_on_heartbeat")

    def __init__(self, on_heartbeat: Callable[[], None] | None = None) -> None:
        self._cancelled = threading.Event()
        self._details = b""
        self._lock = threading.Lock()
        self._on_heartbeat = on_heartbeat

    def record(self, details: bytes) -> None:
        with self._lock:
            self._details = details
        if self._on_heartbeat is not None:
            self._on_heartbeat()

    @property
    def details(self) -> bytes:
        with self._lock:
            return self._details

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(frozen=True)
class TaskContext:
    """What a handler knows about the attempt it runs.

    ``idempotency_key`` is stable across attempts of the same node (delivery is
    at-least-once); ``attempt`` starts at 1. ``config`` is the node's static
    configuration (parsed JSON, or None). ``lease_deadline`` is when the
    coordinator gives up on this attempt unless it is completed or kept alive.
    ``execution_start_time`` is when the execution started; ``execution_input`` the
    execution's input and ``parent_outputs`` the outputs of the node's parents keyed
    by parent id (both parsed on first use); ``map_index`` is the element's index when
    the task is an element of a map node (None otherwise).
    ``logger`` adds execution_id, node_id, attempt and worker_id to every record.
    """

    execution_id: str
    node_id: str
    task_type: str
    attempt: int
    idempotency_key: str
    workflow_name: str = ""
    workflow_version: int = 0
    config: Any = None
    lease_deadline: datetime | None = None
    worker_id: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    execution_start_time: datetime | None = None
    map_index: int | None = None
    logger: logging.LoggerAdapter[logging.Logger] = field(init=False, repr=False, compare=False)
    _signals: _LeaseSignals = field(default_factory=_LeaseSignals, repr=False, compare=False)
    _execution_input: bytes = field(default=b"", repr=False, compare=False)
    _parent_outputs: bytes = field(default=b"", repr=False, compare=False)

    @functools.cached_property
    def execution_input(self) -> Any:
        """The execution's input (parsed JSON; None when empty)."""
        return json.loads(self._execution_input) if self._execution_input else None

    @functools.cached_property
    def parent_outputs(self) -> Mapping[str, Any]:
        """Parent node id -> that parent's output (parsed JSON; empty for an entry node)."""
        if not self._parent_outputs:
            return {}
        parsed = json.loads(self._parent_outputs)
        return parsed if isinstance(parsed, dict) else {}

    def __post_init__(self) -> None:
        adapter = logging.LoggerAdapter(
            _TASK_LOGGER,
            {
                "execution_id": self.execution_id,
                "node_id": self.node_id,
                "attempt": self.attempt,
                "worker_id": self.worker_id,
                "task_type": self.task_type,
            },
        )
        object.__setattr__(self, "logger", adapter)

    def heartbeat(self, details: Any = None) -> None:
        """Reports progress; never blocks.

        Records ``details`` (any JSON-serializable value) as the latest progress;
        the worker's background heartbeat sends it, and a call triggers an early
        send. Raises TypeError when ``details`` is not JSON-serializable.
        """
        if details is None:
            encoded = b""
        else:
            try:
                encoded = json.dumps(details, separators=(",", ":"), allow_nan=False).encode()
            except (TypeError, ValueError) as exc:
                raise TypeError(f"heartbeat details are not JSON-serializable: {exc}") from exc
        self._signals.record(encoded)

    @property
    def cancelled(self) -> bool:
        """True once the coordinator cancelled this attempt or the worker lost its lease.

        Async handlers are also cancelled (``asyncio.CancelledError``); sync handlers
        should poll this and return early. Nothing a cancelled attempt returns is sent.
        """
        return self._signals.cancelled
