"""The webhook replay record (``record_webhook_delivery``) on SQLite, PostgreSQL and in
memory: a delivery is admitted once inside its window, concurrent admissions of one
delivery let exactly one through, and expired records are taken over and swept."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from coordinator.service.ports import Store

NOW = datetime(2030, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)


async def test_a_delivery_is_admitted_once_until_it_expires(store: Store) -> None:
    triggers = store.triggers
    assert await triggers.record_webhook_delivery("default", "d1", LATER, NOW)
    assert not await triggers.record_webhook_delivery("default", "d1", LATER, NOW)
    # Another tenant, another digest: separate records.
    assert await triggers.record_webhook_delivery("other", "d1", LATER, NOW)
    assert await triggers.record_webhook_delivery("default", "d2", LATER, NOW)
    # Once expired the record no longer refuses (the timestamp check does by then).
    assert await triggers.record_webhook_delivery(
        "default", "d1", LATER + timedelta(minutes=5), LATER
    )
    assert not await triggers.record_webhook_delivery("default", "d1", LATER, LATER)


async def test_forgetting_a_delivery_admits_it_again(store: Store) -> None:
    triggers = store.triggers
    assert await triggers.record_webhook_delivery("default", "d1", LATER, NOW)
    await triggers.forget_webhook_delivery("default", "d1")
    assert await triggers.record_webhook_delivery("default", "d1", LATER, NOW)
    await triggers.forget_webhook_delivery("default", "never-recorded")


async def test_concurrent_admissions_let_exactly_one_through(store: Store) -> None:
    results = await asyncio.gather(
        *(store.triggers.record_webhook_delivery("default", "d1", LATER, NOW) for _ in range(8))
    )
    assert sorted(results) == [False] * 7 + [True]


async def test_expired_deliveries_are_swept_in_batches(store: Store) -> None:
    triggers = store.triggers
    for i in range(5):
        assert await triggers.record_webhook_delivery(
            "default", f"old{i}", NOW + timedelta(seconds=i), NOW
        )
    assert await triggers.record_webhook_delivery("default", "live", LATER, NOW)
    sweep_at = NOW + timedelta(minutes=1)
    assert await triggers.delete_expired_webhook_deliveries(sweep_at, 3) == 3
    assert await triggers.delete_expired_webhook_deliveries(sweep_at, 3) == 2
    assert await triggers.delete_expired_webhook_deliveries(sweep_at, 3) == 0
    # The live record is still there: its replay is refused.
    assert not await triggers.record_webhook_delivery("default", "live", LATER, sweep_at)
