"""Operator use cases of dispatch control (docs/dispatch.md): task-type limits and breakers.

``LimitsAdmin`` validates and stores limits (``LimitsRepository``), tells the dispatch control
to drop its limits cache after a change, and shows or resets the circuit breakers. The
enforcement itself is ``coordinator.dispatch.DispatchControl``; this module only needs
the few members of it named by ``DispatchAdminPort``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import NamedTuple, Protocol

from coordinator.engine import LIMIT_VARIABLES, check_task_type, compile_expression
from coordinator.errors import InvalidArgument, NotFound, TrellisError
from coordinator.model import BreakerInfo, TaskTypeLimits
from coordinator.service._common import check_names
from coordinator.service.ports import LimitsRepository

log = logging.getLogger(__name__)

# Key expressions see the node input only.


class BreakersPort(Protocol):
    """What ``coordinator.dispatch.TaskBreakers`` offers an operator."""

    async def info(self, tenant_id: str, limits: TaskTypeLimits) -> BreakerInfo: ...

    async def reset(self, tenant_id: str, limits: TaskTypeLimits) -> BreakerInfo: ...


class LinkPort(Protocol):
    """What ``coordinator.dispatch.RedisLink`` tells about sharing."""

    @property
    def configured(self) -> bool: ...

    @property
    def shared(self) -> bool: ...

    def detail(self) -> str: ...


class DispatchAdminPort(Protocol):
    """The members of ``DispatchControl`` the operator surface uses."""

    def invalidate(self) -> None:
        """Drop the limits cache (after a change), so the next claim reads the store."""
        ...

    @property
    def breakers(self) -> BreakersPort: ...

    @property
    def link(self) -> LinkPort: ...


class DispatchStatus(NamedTuple):
    # TRELLIS_REDIS_URL is set.
    configured: bool
    # Buckets and breakers are shared through Redis right now.
    shared: bool
    # e.g. "shared through redis://redis:6379/0" or "per process: ...".
    detail: str


def validate_limits(limits: TaskTypeLimits) -> TaskTypeLimits:
    """``limits`` as stored (concurrency_key_limit defaulted); raises ``InvalidArgument``
    naming the first field that is wrong."""
    check_names(task_type=limits.task_type)
    check_task_type(limits.task_type, "the limits")
    rate = limits.rate_per_second
    if not math.isfinite(rate) or rate < 0:
        raise InvalidArgument(
            f"rate_per_second must be a finite number >= 0 (0 = no rate limit), not {rate}"
        )
    if limits.burst < 0:
        raise InvalidArgument(f"burst must be >= 0, not {limits.burst}")
    if limits.burst and not rate:
        raise InvalidArgument("burst needs rate_per_second; set a rate or leave burst at 0")
    if limits.rate_key and not rate:
        raise InvalidArgument("rate_key needs rate_per_second; set a rate or leave rate_key empty")
    if limits.max_concurrency < 0:
        raise InvalidArgument(
            f"max_concurrency must be >= 0 (0 = no limit), not {limits.max_concurrency}"
        )
    key_limit = limits.concurrency_key_limit
    if key_limit < 0:
        raise InvalidArgument(f"concurrency_key_limit must be >= 1, not {key_limit}")
    if limits.concurrency_key:
        key_limit = key_limit or 1
    elif key_limit > 1:
        raise InvalidArgument(
            "concurrency_key_limit needs concurrency_key; set a key expression "
            "(e.g. input.account_id) or leave the limit unset"
        )
    else:
        key_limit = 1  # the model's default; unused without a key
    if limits.breaker_failure_threshold < 0:
        raise InvalidArgument(
            "breaker_failure_threshold must be >= 0 (0 = no breaker), "
            f"not {limits.breaker_failure_threshold}"
        )
    if limits.breaker_reset_timeout <= timedelta():
        raise InvalidArgument(
            f"breaker_reset_timeout must be greater than zero, not {limits.breaker_reset_timeout}"
        )
    for where, source in (
        ("rate_key", limits.rate_key),
        ("concurrency_key", limits.concurrency_key),
    ):
        if source:
            compile_expression(source, where=where, variables=LIMIT_VARIABLES)
    return replace(limits, concurrency_key_limit=key_limit)


class LimitsAdmin:
    """Task-type limits and circuit breakers, for operators (DispatchService)."""

    def __init__(
        self,
        store: LimitsRepository,
        dispatch: DispatchAdminPort,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._dispatch = dispatch
        self._clock = clock

    async def set_task_type_limits(self, limits: TaskTypeLimits) -> TaskTypeLimits:
        """Create or replace every limit of ``limits.task_type``."""
        stored = await self._store.set_task_type_limits(validate_limits(limits), self._clock())
        self._dispatch.invalidate()
        log.info(
            "task type limits set",
            extra={"tenant_id": stored.tenant_id, "task_type": stored.task_type},
        )
        return stored

    async def get_task_type_limits(self, tenant_id: str, task_type: str) -> TaskTypeLimits:
        return await self._store.get_task_type_limits(tenant_id, task_type)

    async def list_task_type_limits(self, tenant_id: str) -> list[TaskTypeLimits]:
        return await self._store.list_task_type_limits(tenant_id)

    async def delete_task_type_limits(self, tenant_id: str, task_type: str) -> None:
        """Remove the limits and the breaker of ``task_type``."""
        old = await self._store.get_task_type_limits(tenant_id, task_type)
        await self._store.delete_task_type_limits(tenant_id, task_type)
        self._dispatch.invalidate()
        log.info("task type limits deleted", extra={"tenant_id": tenant_id, "task_type": task_type})
        if old.breaker_failure_threshold > 0:
            # So that limits set again later start with a closed breaker.
            try:
                await self._dispatch.breakers.reset(tenant_id, old)
            except TrellisError as exc:
                log.warning(
                    "could not clear the breaker of a deleted task type: %s",
                    exc,
                    extra={"tenant_id": tenant_id, "task_type": task_type},
                )

    async def list_breakers(self, tenant_id: str) -> list[BreakerInfo]:
        """The breaker of every task type that has one, ordered by task type."""
        rows = await self._store.list_task_type_limits(tenant_id)
        return [
            await self._dispatch.breakers.info(tenant_id, limits)
            for limits in rows
            if limits.breaker_failure_threshold > 0
        ]

    async def reset_breaker(self, tenant_id: str, task_type: str) -> BreakerInfo:
        """Close the breaker of ``task_type`` and clear its failure count."""
        limits = await self._store.get_task_type_limits(tenant_id, task_type)
        if limits.breaker_failure_threshold <= 0:
            raise NotFound(
                f"task type {task_type!r} has no circuit breaker; give it one with "
                f"`trellis limits set {task_type} --breaker-threshold N`"
            )
        info = await self._dispatch.breakers.reset(tenant_id, limits)
        log.info("breaker reset", extra={"tenant_id": tenant_id, "task_type": task_type})
        return info

    def get_dispatch_status(self) -> DispatchStatus:
        link = self._dispatch.link
        return DispatchStatus(link.configured, link.shared, link.detail())
