"""The claim under dispatch limits (coordinator/store/_leasing.py claim_tasks with a ClaimPolicy):
priority ageing, execution caps, concurrency keys and type caps, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

from coordinator.dispatch import RedisLink, TokenBuckets
from coordinator.dispatch._control import ClaimPlan, compile_limit_expression
from coordinator.store import SqlStore
from tests.support.store_builders import NOW, T, make_execution, make_node, start


def plan(**fields: object) -> ClaimPlan:
    return ClaimPlan(TokenBuckets(RedisLink("")), T, 256, **fields)  # type: ignore[arg-type]


async def test_priority_ages_so_old_low_priority_work_goes_first(store: SqlStore) -> None:
    store.priority_aging_ms = 1000  # one priority step = 1 s of waiting
    await start(
        store,
        make_execution("e1"),
        (
            make_node("e1", "old-low", priority=0, available_at=NOW - timedelta(seconds=15)),
            make_node("e1", "new-high", priority=10, available_at=NOW),
            make_node("e1", "mid-low", priority=0, available_at=NOW - timedelta(seconds=5)),
        ),
    )
    claimed = [
        (await store.leases.claim_tasks(T, "w", ["work"], 1, NOW))[0].node_id for _ in range(3)
    ]
    # 15 s of waiting beats 10 priority steps; 5 s does not.
    assert claimed == ["old-low", "new-high", "mid-low"]


async def test_an_execution_cap_limits_its_leased_nodes(store: SqlStore) -> None:
    capped = dataclasses.replace(make_execution("e1"), max_concurrency=2)
    await start(store, capped, tuple(make_node("e1", f"n{i}") for i in range(5)))
    await start(store, make_execution("e2"), tuple(make_node("e2", f"m{i}") for i in range(2)))
    first = await store.leases.claim_tasks(T, "w", ["work"], 10, NOW)
    assert sorted((r.execution_id, r.node_id) for r in first) == [
        ("e1", "n0"),
        ("e1", "n1"),
        ("e2", "m0"),
        ("e2", "m1"),
    ]
    assert await store.leases.claim_tasks(T, "w", ["work"], 10, NOW) == []


async def test_a_concurrency_key_admits_one_per_key_and_records_it(store: SqlStore) -> None:
    nodes = tuple(
        dataclasses.replace(make_node("e1", f"n{i}"), input=f'{{"k": "{k}"}}'.encode())
        for i, k in enumerate("aabbbc")
    )
    await start(store, make_execution("e1"), nodes)
    mutex = plan(
        counted_types=frozenset({"work"}),
        needs_input=True,
        key_limits={"work": 1},
        key_exprs={"work": compile_limit_expression("input.k", "concurrency_key")},
    )
    first = await store.leases.claim_tasks(T, "w", ["work"], 10, NOW, mutex)
    assert sorted(r.node_id for r in first) == ["n0", "n2", "n5"]
    # The key is stored on the leased row and counted by the next claim.
    assert await store.leases.claim_tasks(T, "w", ["work"], 10, NOW, mutex) == []


async def test_an_excluded_type_is_not_claimed(store: SqlStore) -> None:
    await start(store, make_execution("e1"), (make_node("e1", "n0"),))
    held = plan(excluded_types=frozenset({"work"}))
    assert await store.leases.claim_tasks(T, "w", ["work"], 10, NOW, held) == []
    assert len(await store.leases.claim_tasks(T, "w", ["work"], 10, NOW)) == 1


async def test_concurrent_claims_never_exceed_a_type_cap(store: SqlStore) -> None:
    await start(store, make_execution("e1"), tuple(make_node("e1", f"n{i:02d}") for i in range(30)))
    capped = plan(counted_types=frozenset({"work"}), type_caps={"work": 3})
    results = await asyncio.gather(
        *(store.leases.claim_tasks(T, f"w{i}", ["work"], 2, NOW, capped) for i in range(10))
    )
    assert sum(len(r) for r in results) == 3


async def test_a_rate_limit_hands_out_only_the_tokens_in_the_bucket(store: SqlStore) -> None:
    from coordinator.model import TaskTypeLimits

    await start(store, make_execution("e1"), tuple(make_node("e1", f"n{i}") for i in range(10)))
    rated = plan(rated={"work": TaskTypeLimits("work", rate_per_second=1, burst=4)})
    assert len(await store.leases.claim_tasks(T, "w", ["work"], 10, NOW, rated)) == 4
    again = plan(rated={"work": TaskTypeLimits("work", rate_per_second=1, burst=4)})
    again.buckets = rated.buckets
    assert await store.leases.claim_tasks(T, "w", ["work"], 10, NOW, again) == []
    assert again.wait_hint is not None and 0 < again.wait_hint <= 1.0


async def test_a_rate_key_gives_each_value_its_own_bucket(store: SqlStore) -> None:
    from coordinator.model import TaskTypeLimits

    nodes = tuple(
        dataclasses.replace(make_node("e1", f"n{i}"), input=f'{{"c": "{c}"}}'.encode())
        for i, c in enumerate("aaaabbbb")
    )
    await start(store, make_execution("e1"), nodes)
    per_customer = plan(
        needs_input=True,
        rated={"work": TaskTypeLimits("work", rate_per_second=1, burst=2, rate_key="input.c")},
        rate_exprs={"work": compile_limit_expression("input.c", "rate_key")},
    )
    claimed = await store.leases.claim_tasks(T, "w", ["work"], 10, NOW, per_customer)
    # Two tokens per customer: n0, n1 of "a" and n4, n5 of "b".
    assert sorted(r.node_id for r in claimed) == ["n0", "n1", "n4", "n5"]


async def test_a_busy_rate_key_does_not_stall_the_others(store: SqlStore) -> None:
    from coordinator.model import TaskTypeLimits

    # Customer "a" has ten tasks ahead of customer "b"'s two, and only one token.
    nodes = tuple(
        dataclasses.replace(make_node("e1", f"n{i:02d}"), input=f'{{"c": "{c}"}}'.encode())
        for i, c in enumerate("a" * 10 + "bb")
    )
    await start(store, make_execution("e1"), nodes)
    limits = TaskTypeLimits("work", rate_per_second=0.001, burst=1, rate_key="input.c")
    per_customer = plan(
        needs_input=True,
        rated={"work": limits},
        rate_exprs={"work": compile_limit_expression("input.c", "rate_key")},
    )
    claimed = await store.leases.claim_tasks(T, "w", ["work"], 4, NOW, per_customer)
    assert sorted(r.node_id for r in claimed) == ["n00", "n10"]


async def test_a_task_without_a_token_holds_no_concurrency_slot(store: SqlStore) -> None:
    from coordinator.model import TaskTypeLimits

    nodes = tuple(
        dataclasses.replace(make_node("e1", f"n{i}"), input=f'{{"c": "{c}"}}'.encode())
        for i, c in enumerate("aaab")
    )
    await start(store, make_execution("e1"), nodes)
    limits = TaskTypeLimits("work", rate_per_second=0.001, burst=1, rate_key="input.c")

    def capped_per_customer() -> ClaimPlan:
        p = plan(
            counted_types=frozenset({"work"}),
            type_caps={"work": 2},
            needs_input=True,
            rated={"work": limits},
            rate_exprs={"work": compile_limit_expression("input.c", "rate_key")},
        )
        p.buckets = buckets
        return p

    buckets = TokenBuckets(RedisLink(""))
    first = await store.leases.claim_tasks(T, "w", ["work"], 1, NOW, capped_per_customer())
    assert [r.node_id for r in first] == ["n0"]
    # "a" is out of tokens; its READY tasks must not fill the cap ahead of "b" (whose
    # token, taken and not used by the first claim, was given back).
    second = await store.leases.claim_tasks(T, "w", ["work"], 4, NOW, capped_per_customer())
    assert [r.node_id for r in second] == ["n3"]
