"""``MemoryTriggers``: the ``TriggerRepository`` port in memory — webhook and event triggers,
schedules and their fires. A scheduler step (``fire_schedule``) is one atomic write, so two
schedulers stepping one store never act on a schedule twice."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

from coordinator import errors
from coordinator.model import (
    EventTrigger,
    Execution,
    FiringResult,
    Schedule,
    ScheduleFire,
    Transition,
    WebhookTrigger,
)
from coordinator.store._memory import _aggregate, _copies
from coordinator.store._memory._state import State


class MemoryTriggers:
    """The ``TriggerRepository`` port."""

    def __init__(self, state: State) -> None:
        self._state = state

    # -- webhooks -------------------------------------------------------------------------

    async def create_webhook_trigger(self, trigger: WebhookTrigger) -> None:
        key = (trigger.tenant_id, trigger.path)
        async with self._state.write():
            if key in self._state.webhooks:
                raise errors.AlreadyExists(
                    f"a webhook trigger at path {trigger.path!r} exists; delete it first or "
                    "choose another path"
                )
            self._state.webhooks.put(key, _copies.truncated(trigger))

    async def get_webhook_trigger(self, tenant_id: str, path: str) -> WebhookTrigger:
        async with self._state.read():
            found = self._state.webhooks.get((tenant_id, path))
        if found is None:
            raise errors.NotFound(f"webhook trigger {path!r} not found")
        return found

    async def list_webhook_triggers(self, tenant_id: str) -> list[WebhookTrigger]:
        async with self._state.read():
            found = [t for t in self._state.webhooks.values() if t.tenant_id == tenant_id]
        return sorted(found, key=lambda t: t.path)

    async def delete_webhook_trigger(self, tenant_id: str, path: str) -> None:
        async with self._state.write():
            if self._state.webhooks.delete((tenant_id, path)) is None:
                raise errors.NotFound(f"webhook trigger {path!r} not found")

    # -- webhook replays -------------------------------------------------------------------

    async def record_webhook_delivery(
        self, tenant_id: str, digest: str, expires_at: datetime, now: datetime
    ) -> bool:
        key = (tenant_id, digest)
        async with self._state.write(audit=False):
            found = self._state.webhook_replays.get(key)
            if found is not None and found > now:
                return False
            self._state.webhook_replays.put(key, expires_at)
            return True

    async def forget_webhook_delivery(self, tenant_id: str, digest: str) -> None:
        async with self._state.write(audit=False):
            self._state.webhook_replays.delete((tenant_id, digest))

    async def delete_expired_webhook_deliveries(self, now: datetime, limit: int) -> int:
        async with self._state.write(audit=False):
            expired = sorted(
                (at, key) for key, at in self._state.webhook_replays.items() if at <= now
            )[:limit]
            for _, key in expired:
                self._state.webhook_replays.delete(key)
        return len(expired)

    # -- events ---------------------------------------------------------------------------

    async def create_event_trigger(self, trigger: EventTrigger) -> None:
        async with self._state.write():
            if trigger.id in self._state.event_triggers:
                raise errors.AlreadyExists(f"event trigger {trigger.id!r} exists")
            self._state.event_triggers.put(trigger.id, _copies.truncated(trigger))

    async def list_event_triggers(
        self, tenant_id: str, event_name: str | None
    ) -> list[EventTrigger]:
        async with self._state.read():
            found = [
                t
                for t in self._state.event_triggers.values()
                if t.tenant_id == tenant_id and (event_name is None or t.event_name == event_name)
            ]
        return sorted(found, key=lambda t: (t.event_name, t.created_at, t.id))

    async def delete_event_trigger(self, tenant_id: str, trigger_id: str) -> None:
        async with self._state.write():
            found = self._state.event_triggers.get(trigger_id)
            if found is None or found.tenant_id != tenant_id:
                raise errors.NotFound(f"event trigger {trigger_id!r} not found")
            self._state.event_triggers.delete(trigger_id)

    # -- schedules ------------------------------------------------------------------------

    async def create_schedule(self, schedule: Schedule) -> None:
        key = (schedule.tenant_id, schedule.id)
        async with self._state.write():
            if key in self._state.schedules:
                raise errors.AlreadyExists(
                    f"schedule {schedule.id!r} exists; delete it first or choose another id"
                )
            self._state.schedules.put(key, _copies.truncated(schedule))

    async def get_schedule(self, tenant_id: str, schedule_id: str) -> Schedule:
        async with self._state.read():
            found = self._state.schedules.get((tenant_id, schedule_id))
        if found is None:
            raise errors.NotFound(f"schedule {schedule_id!r} not found")
        return found

    async def list_schedules(self, tenant_id: str) -> list[Schedule]:
        async with self._state.read():
            found = [s for s in self._state.schedules.values() if s.tenant_id == tenant_id]
        return sorted(found, key=lambda s: s.id)

    async def update_schedule(
        self, tenant_id: str, schedule_id: str, change: Callable[[Schedule], Schedule]
    ) -> Schedule:
        async with self._state.write():
            found = self._state.schedules.get((tenant_id, schedule_id))
            if found is None:
                raise errors.NotFound(f"schedule {schedule_id!r} not found")
            changed = change(found)
            if changed != found:
                self._write_schedule(changed)
        return changed

    def _write_schedule(self, schedule: Schedule) -> None:
        """Store ``schedule`` over its row: everything but its key and creation time."""
        key = (schedule.tenant_id, schedule.id)
        current = self._state.schedules.get(key)
        if current is not None:  # else an UPDATE of no row
            written = _copies.truncated(schedule)
            self._state.schedules.put(key, replace(written, created_at=current.created_at))

    async def delete_schedule(self, tenant_id: str, schedule_id: str) -> None:
        state = self._state
        async with state.write():
            for key, _ in state.fires.items():
                if key[:2] == (tenant_id, schedule_id):
                    state.fires.delete(key)
            if state.schedules.delete((tenant_id, schedule_id)) is None:
                raise errors.NotFound(f"schedule {schedule_id!r} not found")

    async def list_schedule_fires(
        self, tenant_id: str, schedule_id: str, limit: int
    ) -> list[ScheduleFire]:
        async with self._state.read():
            fires = [
                fire
                for (tenant, sid, _), fire in self._state.fires.items()
                if (tenant, sid) == (tenant_id, schedule_id)
            ]
        fires.sort(key=lambda f: f.fire_at, reverse=True)
        return fires[:limit]

    async def find_due_schedules(self, now: datetime, limit: int) -> list[Schedule]:
        at = _copies.ms(now)
        async with self._state.read():
            due = [
                s
                for s in self._state.schedules.values()
                if not s.paused
                and (
                    (s.next_fire_at is not None and s.next_fire_at <= at)
                    or s.buffered_fire_at is not None
                )
            ]
        due.sort(key=lambda s: (s.next_fire_at is None, s.next_fire_at or at, s.tenant_id, s.id))
        return due[:limit]

    async def next_schedule_fire_at(self) -> datetime | None:
        async with self._state.read():
            times = [
                s.next_fire_at
                for s in self._state.schedules.values()
                if not s.paused and s.next_fire_at is not None
            ]
        return min(times, default=None)

    async def has_buffered_fires(self) -> bool:
        async with self._state.read():
            return any(
                not s.paused and s.buffered_fire_at is not None
                for s in self._state.schedules.values()
            )

    async def fire_schedule(
        self,
        tenant_id: str,
        schedule_id: str,
        decide: Callable[[Schedule, Execution | None], FiringResult | None],
    ) -> FiringResult | None:
        state = self._state
        async with state.write():
            found = state.schedules.get((tenant_id, schedule_id))
            if found is None:
                return None  # deleted meanwhile
            last = None
            if found.last_execution_id is not None:
                last = state.execution(tenant_id, found.last_execution_id)
            result = decide(found, last)
            if result is None:
                return None
            inserted = tuple(t for t in result.starts if self._insert_start(t))
            for fire in result.fires:
                key = (fire.tenant_id, fire.schedule_id, _copies.ms(fire.fire_at))
                state.fires.put(key, _copies.truncated(fire))
            self._write_schedule(result.schedule)
        return FiringResult(result.schedule, inserted, result.fires)

    def _insert_start(self, transition: Transition) -> bool:
        """Insert a fire's execution (its row, node runs, events and deliveries) unless its
        idempotency key is taken: False then."""
        execution = transition.execution
        key = execution.idempotency_key
        state = self._state
        if key is not None and _aggregate.by_idempotency_key(state, execution.tenant_id, key):
            return False
        taken = f"execution {execution.id!r} already exists"
        _aggregate.insert_execution(state, transition, taken=taken)
        return True
