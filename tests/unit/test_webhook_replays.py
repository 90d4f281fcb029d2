"""A replayed signed webhook delivery, with the in-memory store and a fake clock: refused
inside its window (without an idempotency expression), forgotten when its execution could
not start, swept once its window has passed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from coordinator.errors import AlreadyExists, Unauthenticated, Unavailable
from coordinator.model import ExecutionFilter, NodeSpec, WorkflowDef
from coordinator.service import Coordinator, ServiceSettings, Sweeper, Triggers
from coordinator.signing import sign
from coordinator.store import MemoryStore

TENANT = "default"
SECRET = "replay-secret-0123456789"
T0 = datetime(2030, 1, 1, tzinfo=UTC)
BODY = b'{"order": 1}'


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def setup() -> tuple[Coordinator, Triggers, Clock]:
    clock = Clock()
    c = Coordinator(MemoryStore(), ServiceSettings(), clock=clock)
    await c.definitions.register_workflow(
        WorkflowDef(name="wf", nodes=(NodeSpec(id="a", task_type="t"),))
    )
    triggers = Triggers(c, c.store.triggers)
    await triggers.create_webhook_trigger(TENANT, "orders", "wf", 0, hmac_secret=SECRET)
    return c, triggers, clock


def signed(at: datetime, body: bytes = BODY) -> dict[str, str]:
    return {"X-Trellis-Signature": sign(SECRET, body, int(at.timestamp()))}


async def count(c: Coordinator) -> int:
    found, _ = await c.executions.list_executions(
        TENANT, ExecutionFilter(workflow_name="wf"), page_size=100, page_token=""
    )
    return len(found)


async def test_a_replay_inside_the_window_is_refused(
    setup: tuple[Coordinator, Triggers, Clock],
) -> None:
    c, triggers, clock = setup
    headers = signed(T0)
    _, created = await triggers.fire_webhook(TENANT, "orders", headers, BODY)
    assert created
    clock.now = T0 + timedelta(seconds=299)
    with pytest.raises(AlreadyExists, match="replay"):
        await triggers.fire_webhook(TENANT, "orders", headers, BODY)
    # The same signature with an extra v1 value is the same delivery.
    extra = {"X-Trellis-Signature": headers["X-Trellis-Signature"] + ",v1=00"}
    with pytest.raises(AlreadyExists):
        await triggers.fire_webhook(TENANT, "orders", extra, BODY)
    # The same body signed at another time is another delivery.
    _, created = await triggers.fire_webhook(TENANT, "orders", signed(clock.now), BODY)
    assert created
    assert await count(c) == 2


async def test_a_delivery_that_started_nothing_may_be_retried(
    setup: tuple[Coordinator, Triggers, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    c, triggers, _ = setup
    headers = signed(T0)
    real = c.starts.start_execution

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise Unavailable("the store is down")

    monkeypatch.setattr(c.starts, "start_execution", down)
    with pytest.raises(Unavailable):
        await triggers.fire_webhook(TENANT, "orders", headers, BODY)
    monkeypatch.setattr(c.starts, "start_execution", real)
    _, created = await triggers.fire_webhook(TENANT, "orders", headers, BODY)
    assert created


async def test_records_are_swept_once_the_window_has_passed(
    setup: tuple[Coordinator, Triggers, Clock],
) -> None:
    c, triggers, clock = setup
    headers = signed(T0)
    await triggers.fire_webhook(TENANT, "orders", headers, BODY)
    sweeper = Sweeper(c)
    clock.now = T0 + timedelta(seconds=300)
    assert await sweeper.delete_expired_webhook_deliveries() == (0, 0)  # still inside
    clock.now = T0 + timedelta(seconds=300 + 61)
    assert await sweeper.delete_expired_webhook_deliveries() == (1, 1)
    # By now the timestamp refuses the replay.
    with pytest.raises(Unauthenticated, match="away from the coordinator's clock"):
        await triggers.fire_webhook(TENANT, "orders", headers, BODY)
