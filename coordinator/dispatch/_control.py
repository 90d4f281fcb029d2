"""DispatchControl: the per-replica side of dispatch limits.

It caches the task-type limits (re-read every ``refresh``; at once after a change through
this replica), builds the ClaimPolicy of each poll (breaker states, concurrency caps and
keys, rate buckets) and records task outcomes in the breakers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from coordinator.dispatch._breakers import TaskBreakers
from coordinator.dispatch._buckets import TokenBuckets
from coordinator.dispatch._redis import RedisLink
from coordinator.engine import LIMIT_VARIABLES, Expression, ExpressionError, compile_expression
from coordinator.model import Admitted, BreakerState, Candidate, LeasedCounts, TaskTypeLimits, admit
from coordinator.service.ports import LimitsRepository

log = logging.getLogger(__name__)

# The key of the tasks whose key expression could not be evaluated: they share one key, so
# they stay within the limit (serialized) rather than escape it.
UNKEYED = "!error"
# The longest key (as JSON) a rate_key / concurrency_key expression may give.
MAX_KEY_BYTES = 1024


def compile_limit_expression(source: str, where: str) -> Expression:
    """Compile a rate_key / concurrency_key expression (InvalidArgument naming ``where``)."""
    return compile_expression(source, where=where, variables=LIMIT_VARIABLES)


@dataclass
class ClaimPlan:
    """The ClaimPolicy of one poll (see coordinator/service/ports.py)."""

    buckets: TokenBuckets
    tenant_id: str
    scan_size: int
    excluded_types: frozenset[str] = frozenset()
    counted_types: frozenset[str] = frozenset()
    needs_input: bool = False
    type_caps: dict[str, int] = field(default_factory=dict)
    key_limits: dict[str, int] = field(default_factory=dict)
    key_exprs: dict[str, Expression] = field(default_factory=dict)
    rated: dict[str, TaskTypeLimits] = field(default_factory=dict)
    rate_exprs: dict[str, Expression] = field(default_factory=dict)
    wait_hint: float | None = None
    _limit: int = 0
    _counts: LeasedCounts = field(default_factory=LeasedCounts)

    def scan(self, limit: int) -> int:
        # Candidates held back by a key (or a capped type) must not hide the others
        # behind them: one busy customer cannot stall the rest.
        held_back = self.key_limits or self.type_caps or self.rate_exprs
        return max(limit, self.scan_size) if held_back else limit

    def hint(self, seconds: float) -> None:
        self.wait_hint = seconds if self.wait_hint is None else min(self.wait_hint, seconds)

    def admit(
        self, candidates: Sequence[Candidate], counts: LeasedCounts, limit: int
    ) -> list[Admitted]:
        if not self.rated:
            return self._admit(candidates, counts, limit)
        # Rate-limited: tokens first (take_tokens), so that a task without one does not
        # hold a concurrency slot that another key's task could use.
        self._counts, self._limit = counts, limit
        return [Admitted(c) for c in candidates]

    def _admit(
        self, candidates: Sequence[Candidate], counts: LeasedCounts, limit: int
    ) -> list[Admitted]:
        return admit(
            candidates,
            counts,
            limit,
            type_caps=self.type_caps,
            key_limits=self.key_limits,
            key_of=self._concurrency_key,
        )

    def _concurrency_key(self, c: Candidate) -> str:
        return _key(self.key_exprs[c.task_type], c)

    async def take_tokens(self, admitted: Sequence[Admitted]) -> list[Admitted]:
        """The candidates (in order, at most ``limit``) that got a token (types without a
        rate need none) and that the concurrency limits admit; tokens taken for the others
        are given back at once. Each bucket is asked for at most ``limit`` tokens."""
        if not self.rated:
            return list(admitted)
        candidates = [a.candidate for a in admitted]
        buckets = [self._bucket_of(c) for c in candidates]
        asked: dict[str, int] = {}
        types: dict[str, str] = {}
        for bucket, c in zip(buckets, candidates, strict=True):
            if bucket is not None:
                asked[bucket] = min(asked.get(bucket, 0) + 1, self._limit)
                types[bucket] = c.task_type
        granted: dict[str, int] = {}
        for bucket, ask in asked.items():
            limits = self.rated[types[bucket]]
            grant = await self.buckets.take(bucket, limits.rate_per_second, limits.bucket_size, ask)
            granted[bucket] = grant.granted
            if grant.granted < ask:
                self.hint(grant.wait)
        tokened: list[Candidate] = []
        for bucket, c in zip(buckets, candidates, strict=True):
            if bucket is None:
                tokened.append(c)
            elif granted[bucket] > 0:
                granted[bucket] -= 1
                tokened.append(c)
        chosen = self._admit(tokened, self._counts, self._limit)
        picked = {(a.candidate.execution_id, a.candidate.node_id) for a in chosen}
        await self.refund(
            [Admitted(c) for c in tokened if (c.execution_id, c.node_id) not in picked]
        )
        return chosen

    async def refund(self, taken: Sequence[Admitted]) -> None:
        counts: dict[tuple[str, str], int] = {}
        for a in taken:
            limits = self.rated.get(a.candidate.task_type)
            if limits is not None:
                key = (limits.task_type, self._bucket(limits, a.candidate))
                counts[key] = counts.get(key, 0) + 1
        for (task_type, bucket), n in counts.items():
            limits = self.rated[task_type]
            await self.buckets.refund(bucket, limits.rate_per_second, limits.bucket_size, n)

    def _bucket_of(self, c: Candidate) -> str | None:
        limits = self.rated.get(c.task_type)
        return None if limits is None else self._bucket(limits, c)

    def _bucket(self, limits: TaskTypeLimits, c: Candidate) -> str:
        bucket = f"{self.tenant_id}/{limits.task_type}"
        expr = self.rate_exprs.get(limits.task_type)
        return bucket if expr is None else f"{bucket}/{_key(expr, c)}"


def _key(expr: Expression, c: Candidate) -> str:
    try:
        value: Any = expr.evaluate(
            {"input": json.loads(c.input or b"null")}, max_bytes=MAX_KEY_BYTES
        )
    except (ExpressionError, ValueError) as exc:
        log.warning(
            "%s; the task shares the key %r with others that failed",
            exc,
            UNKEYED,
            extra={"execution_id": c.execution_id, "node_id": c.node_id},
        )
        return UNKEYED
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


class DispatchControl:
    def __init__(
        self,
        store: LimitsRepository,
        *,
        link: RedisLink,
        clock: Callable[[], datetime],
        refresh: timedelta = timedelta(seconds=1),
        claim_scan: int = 256,
    ) -> None:
        self.store = store
        self.link = link
        self._clock = clock
        self.buckets = TokenBuckets(link)
        self.breakers = TaskBreakers(link, clock=clock)
        self._refresh = refresh.total_seconds()
        self._claim_scan = claim_scan
        self._cache: dict[str, dict[str, TaskTypeLimits]] = {}
        self._loaded_at: float | None = None

    def invalidate(self) -> None:
        """Re-read the limits at the next use (after a change through this replica)."""
        self._loaded_at = None

    async def _all(self) -> Mapping[str, dict[str, TaskTypeLimits]]:
        now = time.monotonic()
        if self._loaded_at is None or now - self._loaded_at >= self._refresh:
            cache: dict[str, dict[str, TaskTypeLimits]] = {}
            for limits in await self.store.list_task_type_limits(None):
                cache.setdefault(limits.tenant_id, {})[limits.task_type] = limits
            self._cache, self._loaded_at = cache, now
        return self._cache

    async def limits(self, tenant_id: str, task_type: str) -> TaskTypeLimits | None:
        return (await self._all()).get(tenant_id, {}).get(task_type)

    def cached(self, tenant_id: str, task_type: str) -> TaskTypeLimits | None:
        """The limits as last loaded (no I/O), for hot paths that may be a refresh late."""
        return self._cache.get(tenant_id, {}).get(task_type)

    async def plan(self, tenant_id: str, task_types: Sequence[str]) -> ClaimPlan:
        plan = ClaimPlan(self.buckets, tenant_id, self._claim_scan)
        limited = (await self._all()).get(tenant_id, {})
        excluded, counted = set(), set()
        for task_type in task_types:
            limits = limited.get(task_type)
            if limits is None:
                continue
            cap = limits.max_concurrency
            if limits.breaker_failure_threshold > 0:
                gate = await self.breakers.gate(tenant_id, limits)
                if gate.state is BreakerState.OPEN:
                    excluded.add(task_type)
                    if gate.until is not None:
                        wait = (gate.until - self._clock()).total_seconds()
                        plan.hint(max(wait, 0.001))
                    continue
                if gate.state is BreakerState.HALF_OPEN:
                    cap = 1  # the probe: one leased task of the type at a time
            if cap:
                plan.type_caps[task_type] = cap
                counted.add(task_type)
            if limits.concurrency_key:
                plan.key_limits[task_type] = max(1, limits.concurrency_key_limit)
                plan.key_exprs[task_type] = compile_limit_expression(
                    limits.concurrency_key, "concurrency_key"
                )
                counted.add(task_type)
            if limits.rate_per_second > 0:
                plan.rated[task_type] = limits
                if limits.rate_key:
                    plan.rate_exprs[task_type] = compile_limit_expression(
                        limits.rate_key, "rate_key"
                    )
        plan.excluded_types = frozenset(excluded)
        plan.counted_types = frozenset(counted)
        plan.needs_input = bool(plan.key_exprs or plan.rate_exprs)
        return plan

    def wakes_on_lease_end(self, tenant_id: str, task_type: str) -> bool:
        """True when a lease of this type ending may let a waiting poll claim (the type's
        concurrency is limited, or its breaker has one)."""
        limits = self.cached(tenant_id, task_type)
        return limits is not None and (
            limits.limits_concurrency or limits.breaker_failure_threshold > 0
        )

    async def record_outcome(self, tenant_id: str, task_type: str, ok: bool) -> None:
        """One attempt of ``task_type`` succeeded or failed (breakers count failures)."""
        limits = await self.limits(tenant_id, task_type)
        if limits is not None and limits.breaker_failure_threshold > 0:
            await self.breakers.record(tenant_id, limits, ok)
