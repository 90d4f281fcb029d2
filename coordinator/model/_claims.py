"""What a claim works with: candidates, counts of leased rows, and the admission rule of
the concurrency limits (pure: no I/O).

The claim counts LEASED rows inside its transaction, after taking its locks; ``admit``
walks the candidates in dispatch order and keeps those for which every limit still has
room, counting each one it keeps, so one claim never oversteps a limit either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LeaseKey:
    execution_id: str
    node_id: str
    lease_seq: int


@dataclass(frozen=True)
class Candidate:
    """A READY row a claim may lease, with what the limits need to know about it."""

    execution_id: str
    node_id: str
    task_type: str
    # The node input (only loaded when ``ClaimPolicy.needs_input``).
    input: bytes | None
    # The execution's max_concurrency (0 = none).
    execution_max_concurrency: int


@dataclass
class LeasedCounts:
    """Rows LEASED right now, counted inside the claim's transaction (after its locks)."""

    # (task_type, concurrency_key or None) -> count, for ``ClaimPolicy.counted_types``.
    by_type_key: dict[tuple[str, str | None], int] = field(default_factory=dict)
    # execution_id -> count, for candidates' executions with a max_concurrency.
    by_execution: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Admitted:
    candidate: Candidate
    # Written on the leased row; counted against the type's concurrency_key_limit.
    concurrency_key: str | None = None


KeyOf = Callable[[Candidate], str]


def admit(
    candidates: Sequence[Candidate],
    counts: LeasedCounts,
    limit: int,
    *,
    type_caps: Mapping[str, int] | None = None,
    key_limits: Mapping[str, int] | None = None,
    key_of: KeyOf | None = None,
) -> list[Admitted]:
    """The candidates (in order, at most ``limit``) within every execution's
    max_concurrency, each type's cap (``type_caps``: leased tasks of the type) and each
    keyed type's per-key limit (``key_limits``, keys from ``key_of``)."""
    type_caps = type_caps or {}
    key_limits = key_limits or {}
    per_key = dict(counts.by_type_key)
    per_type: dict[str, int] = {}
    for (task_type, _key), count in per_key.items():
        per_type[task_type] = per_type.get(task_type, 0) + count
    per_execution = dict(counts.by_execution)
    out: list[Admitted] = []
    for c in candidates:
        if len(out) >= limit:
            break
        cap = c.execution_max_concurrency
        if cap and per_execution.get(c.execution_id, 0) >= cap:
            continue
        type_cap = type_caps.get(c.task_type, 0)
        if type_cap and per_type.get(c.task_type, 0) >= type_cap:
            continue
        key: str | None = None
        key_limit = key_limits.get(c.task_type, 0)
        if key_limit and key_of is not None:
            key = key_of(c)
            if per_key.get((c.task_type, key), 0) >= key_limit:
                continue
        out.append(Admitted(c, key))
        per_execution[c.execution_id] = per_execution.get(c.execution_id, 0) + 1
        per_type[c.task_type] = per_type.get(c.task_type, 0) + 1
        per_key[(c.task_type, key)] = per_key.get((c.task_type, key), 0) + 1
    return out


class Unlimited:
    """The ClaimPolicy of a claim with no task-type limits: only executions' caps."""

    excluded_types: frozenset[str] = frozenset()
    counted_types: frozenset[str] = frozenset()
    needs_input = False
    wait_hint: float | None = None

    def scan(self, limit: int) -> int:
        return limit

    def admit(
        self, candidates: Sequence[Candidate], counts: LeasedCounts, limit: int
    ) -> list[Admitted]:
        return admit(candidates, counts, limit)

    async def take_tokens(self, admitted: Sequence[Admitted]) -> list[Admitted]:
        return list(admitted)

    async def refund(self, taken: Sequence[Admitted]) -> None:
        return None


UNLIMITED = Unlimited()
