"""Cron schedules: creation and control, the pure fire planning, and the scheduler loop.

Every replica runs the loop. Each step over a schedule is one store transaction that locks
the schedule row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), starts the executions of its
due fire times (idempotency key ``schedule:<id>:<fire time>``), records the fires and
advances ``next_fire_at`` — so each fire time starts exactly one execution across
replicas and restarts.

Planning (``plan_fires``, ``apply_overlap``) is pure: ``now`` is an argument, so unit tests
move time freely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from coordinator import engine
from coordinator.cron import Cron
from coordinator.errors import InvalidArgument, TrellisError
from coordinator.model import (
    DEFAULT_MAX_CATCHUP,
    CatchupPolicy,
    ErrorInfo,
    Execution,
    ExecutionStatus,
    FireOutcome,
    FiringResult,
    OverlapPolicy,
    Schedule,
    ScheduleFire,
    Transition,
    WorkflowDef,
)
from coordinator.service._common import Clock
from coordinator.service._coordinator import Coordinator
from coordinator.service._notifier import task_key
from coordinator.service._rules import with_deliveries
from coordinator.service._schemas import INPUT_SCHEMA_VIOLATION, check_input, input_refusal
from coordinator.service._starting import failed_start
from coordinator.service.ports import TriggerRepository

log = logging.getLogger(__name__)

# A fire time later than this when the loop reaches it was missed (no coordinator ran):
# the catch-up policy decides about it. Fire times within it are on time and always fire.
MISFIRE_GRACE = timedelta(seconds=15)
# Notifier key: schedules changed (created, resumed); the loops re-read their next fire time.
SCHEDULES_KEY = "schedules"
MAX_CATCHUP_LIMIT = 10_000
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def fire_key(schedule_id: str, fire_at: datetime) -> str:
    """The idempotency key of the execution one fire time starts."""
    return f"schedule:{schedule_id}:{fire_at.astimezone(UTC).isoformat()}"


# -- pure planning ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FirePlan:
    """Fire times to act on now (oldest first), how many missed ones were dropped, and the
    next fire time after ``now``."""

    due: tuple[datetime, ...]
    missed: int
    next_fire_at: datetime


def plan_fires(
    cron: Cron,
    next_fire_at: datetime,
    now: datetime,
    catchup: CatchupPolicy,
    max_catchup: int,
    grace: timedelta = MISFIRE_GRACE,
) -> FirePlan:
    """Which of the fire times from ``next_fire_at`` up to ``now`` to act on.

    On-time fire times (at most ``grace`` old) always count. Older, missed ones follow
    ``catchup``: SKIP_MISSED drops them, RUN_ONCE keeps the latest, RUN_ALL the latest
    ``max_catchup``. ``missed`` counts the dropped ones (a lower bound past
    ``MAX_CATCHUP_LIMIT``).
    """
    following = cron.next_after(now)
    if next_fire_at > now:
        return FirePlan((), 0, next_fire_at)
    window = min(max(max_catchup, 1), MAX_CATCHUP_LIMIT)
    # Newest first; on-time ones are few (grace / the cron's period).
    found = cron.times_back(now, next_fire_at, window + MAX_CATCHUP_LIMIT)
    on_time = [t for t in found if now - t <= grace]
    missed = [t for t in found if now - t > grace]  # newest first
    if catchup is CatchupPolicy.SKIP_MISSED:
        kept: list[datetime] = []
    elif catchup is CatchupPolicy.RUN_ONCE:
        kept = missed[:1]
    else:
        kept = missed[:window]
    due = sorted(kept + on_time)
    return FirePlan(tuple(due), len(missed) - len(kept), following)


def apply_overlap(
    policy: OverlapPolicy,
    running: bool,
    buffered: bool,
    due: Sequence[datetime],
) -> list[tuple[datetime, FireOutcome]]:
    """The outcome of each due fire time (oldest first) given whether the schedule's last
    execution is still running and whether a fire is already buffered. A started fire
    makes the following ones overlap with it."""
    outcomes: list[tuple[datetime, FireOutcome]] = []
    for t in due:
        if policy is OverlapPolicy.ALLOW or not running:
            outcomes.append((t, FireOutcome.STARTED))
            running = True
        elif policy is OverlapPolicy.BUFFER_ONE and not buffered:
            outcomes.append((t, FireOutcome.BUFFERED))
            buffered = True
        else:
            outcomes.append((t, FireOutcome.SKIPPED))
    return outcomes


def unfinished(execution: Execution | None) -> bool:
    return execution is not None and not execution.status.terminal


# -- use cases ----------------------------------------------------------------------------


def _policy_values(enum_type: type[OverlapPolicy] | type[CatchupPolicy]) -> str:
    return ", ".join(m.value for m in enum_type)


class Schedules:
    """Schedule use cases (create, get, list, pause, resume, delete) and one scheduler step
    (``tick``) that ``Scheduler.run`` repeats."""

    def __init__(
        self, coordinator: Coordinator, store: TriggerRepository, *, clock: Clock | None = None
    ) -> None:
        self._c = coordinator
        self._store = store
        self._clock = clock or coordinator.clock

    @property
    def coordinator(self) -> Coordinator:
        return self._c

    @property
    def store(self) -> TriggerRepository:
        return self._store

    def now(self) -> datetime:
        return self._clock()

    async def create_schedule(
        self,
        tenant_id: str,
        schedule_id: str,
        cron_text: str,
        timezone: str,
        workflow_name: str,
        workflow_version: int,
        input: bytes,
        *,
        overlap: OverlapPolicy = OverlapPolicy.SKIP,
        catchup: CatchupPolicy = CatchupPolicy.RUN_ONCE,
        max_catchup: int = 0,
        paused: bool = False,
    ) -> Schedule:
        if not _ID.match(schedule_id):
            raise InvalidArgument(
                f"schedule id {schedule_id!r} must be 1-128 letters, digits, '.', '_' or '-' "
                "(starting with a letter or digit)"
            )
        if not workflow_name:
            raise InvalidArgument("workflow_name is required")
        if workflow_version < 0:
            raise InvalidArgument("workflow_version must be 0 (latest) or a version number")
        if max_catchup < 0 or max_catchup > MAX_CATCHUP_LIMIT:
            raise InvalidArgument(
                f"max_catchup must be between 0 (default) and {MAX_CATCHUP_LIMIT}"
            )
        cron = Cron.parse(cron_text, timezone)
        payload = self._c.check_payload("input", input)
        defn = await self._c.definitions.get_workflow(
            tenant_id, workflow_name, workflow_version or None
        )
        await check_input(defn, payload)
        now = self.now()
        schedule = Schedule(
            id=schedule_id,
            cron=cron.expression,
            timezone=cron.timezone,
            workflow_name=workflow_name,
            workflow_version=workflow_version,
            input=payload,
            overlap=overlap,
            catchup=catchup,
            max_catchup=max_catchup or DEFAULT_MAX_CATCHUP,
            created_at=now,
            updated_at=now,
            paused=paused,
            next_fire_at=None if paused else cron.next_after(now),
            tenant_id=tenant_id,
        )
        await self._store.create_schedule(schedule)
        await self._changed()
        log.info("schedule created", extra={"schedule_id": schedule_id, "cron": cron.expression})
        return schedule

    async def get_schedule(
        self, tenant_id: str, schedule_id: str, fires: int = 20
    ) -> tuple[Schedule, list[ScheduleFire]]:
        schedule = await self._store.get_schedule(tenant_id, schedule_id)
        recent = await self._store.list_schedule_fires(tenant_id, schedule_id, fires)
        return schedule, recent

    async def list_schedules(self, tenant_id: str) -> list[Schedule]:
        return await self._store.list_schedules(tenant_id)

    async def pause_schedule(self, tenant_id: str, schedule_id: str) -> Schedule:
        now = self.now()
        return await self._store.update_schedule(
            tenant_id,
            schedule_id,
            lambda s: replace(s, paused=True, next_fire_at=None, updated_at=now),
        )

    async def resume_schedule(self, tenant_id: str, schedule_id: str) -> Schedule:
        now = self.now()

        def resume(s: Schedule) -> Schedule:
            if not s.paused:
                return s
            following = Cron(s.cron, s.timezone).next_after(now)
            return replace(s, paused=False, next_fire_at=following, updated_at=now)

        schedule = await self._store.update_schedule(tenant_id, schedule_id, resume)
        await self._changed()
        return schedule

    async def delete_schedule(self, tenant_id: str, schedule_id: str) -> None:
        await self._store.delete_schedule(tenant_id, schedule_id)

    async def _changed(self) -> None:
        keys = [SCHEDULES_KEY]
        self._c.notifier.notify(keys)
        try:
            await self._c.store.wakeups.publish_wakeups(keys)
        except TrellisError as exc:
            log.warning("could not wake other replicas' schedulers: %s", exc)

    # -- the scheduler step ---------------------------------------------------------------

    async def tick(self, batch: int = 100) -> int:
        """Act on every due schedule once; returns how many executions were started."""
        started = 0
        now = self.now()
        for schedule in await self._store.find_due_schedules(now, batch):
            try:
                started += await self._fire(schedule, now)
            except Exception:
                log.exception(
                    "schedule step failed; retried at the next tick",
                    extra={"schedule_id": schedule.id},
                )
        return started

    async def _fire(self, found: Schedule, now: datetime) -> int:
        defn = await self._c.definitions.get_workflow(
            found.tenant_id, found.workflow_name, found.workflow_version or None
        )
        cron = Cron(found.cron, found.timezone)
        # The input was checked when the schedule was created, but against the version of
        # then: a schedule of the latest version may meet a newer schema.
        refused = await input_refusal(defn, found.input)

        rules = await self._c.rules.rules(found.tenant_id)

        def decide(schedule: Schedule, last: Execution | None) -> FiringResult | None:
            result = _decide(schedule, last, defn, cron, now, refused=refused)
            if result is None:
                return None
            # An execution that ends as it starts queues its notifications with it.
            starts = tuple(with_deliveries(t, None, rules) for t in result.starts)
            return replace(result, starts=starts)

        result = await self._store.fire_schedule(found.tenant_id, found.id, decide)
        if result is None:
            return 0
        for transition in result.starts:
            await self._woken(transition)
        for fire in result.fires:
            log.info(
                "schedule fired",
                extra={
                    "schedule_id": fire.schedule_id,
                    "fire_at": fire.fire_at.isoformat(),
                    "outcome": fire.outcome.value,
                    "execution_id": fire.execution_id,
                },
            )
        return len(result.starts)

    async def _woken(self, transition: Transition) -> None:
        keys = [task_key(t) for t in {n.task_type for n in transition.ready}]
        self._c.notifier.notify(keys)
        try:
            await self._c.store.wakeups.publish_wakeups(keys)
        except TrellisError as exc:
            log.warning("could not publish wake-ups to other replicas: %s", exc)


def _start(
    defn: WorkflowDef,
    schedule: Schedule,
    fire_at: datetime,
    now: datetime,
    refused: str | None = None,
) -> Transition:
    """The execution one fire time starts; FAILED at once (error InputSchemaViolation,
    ``refused`` says why) when the schedule's input does not match the input_schema."""
    shell = Execution(
        id=str(uuid.uuid4()),
        tenant_id=schedule.tenant_id,
        workflow_name=defn.name,
        workflow_version=defn.version,
        status=ExecutionStatus.PENDING,
        input=schedule.input,
        created_at=now,
        updated_at=now,
        idempotency_key=fire_key(schedule.id, fire_at),
        max_concurrency=defn.max_concurrency,
    )
    if refused is not None:
        return _failed_start(shell, refused, now)
    transition = engine.start_execution(defn, shell, now)
    if transition.start_children or defn.max_running_executions:
        # An entry node runs a sub-workflow (the coordinator's start path creates children),
        # or the workflow caps its running executions: store the execution as a start due
        # now and let the delayed-start sweeper run it (within the cap).
        return Transition(execution=replace(shell, start_at=now))
    return transition


def _failed_start(shell: Execution, why: str, now: datetime) -> Transition:
    error = ErrorInfo(INPUT_SCHEMA_VIOLATION, f"{why}; fix the schedule's input")
    return failed_start(shell, error, now)


def _decide(
    schedule: Schedule,
    last: Execution | None,
    defn: WorkflowDef,
    cron: Cron,
    now: datetime,
    *,
    refused: str | None = None,
) -> FiringResult | None:
    """One scheduler step over a locked schedule (pure): start a buffered fire whose
    predecessor ended, then act on the due fire times."""
    if schedule.paused:
        return None
    starts: list[Transition] = []
    fires: list[ScheduleFire] = []
    running = unfinished(last)
    buffered = schedule.buffered_fire_at
    changed = schedule
    if buffered is not None and not running:
        t = _start(defn, schedule, buffered, now, refused)
        starts.append(t)
        fires.append(
            ScheduleFire(
                schedule.id, buffered, FireOutcome.STARTED, now, t.execution.id, schedule.tenant_id
            )
        )
        changed = replace(
            changed,
            buffered_fire_at=None,
            last_execution_id=t.execution.id,
            started_fires=changed.started_fires + 1,
        )
        running = True
        buffered = None
    if schedule.next_fire_at is not None and schedule.next_fire_at <= now:
        plan = plan_fires(cron, schedule.next_fire_at, now, schedule.catchup, schedule.max_catchup)
        for fire_at, outcome in apply_overlap(
            schedule.overlap, running, buffered is not None, plan.due
        ):
            execution_id = None
            if outcome is FireOutcome.STARTED:
                t = _start(defn, schedule, fire_at, now, refused)
                starts.append(t)
                execution_id = t.execution.id
                changed = replace(
                    changed,
                    last_execution_id=execution_id,
                    started_fires=changed.started_fires + 1,
                )
            elif outcome is FireOutcome.BUFFERED:
                changed = replace(changed, buffered_fire_at=fire_at)
            else:
                changed = replace(changed, skipped_fires=changed.skipped_fires + 1)
            fires.append(
                ScheduleFire(schedule.id, fire_at, outcome, now, execution_id, schedule.tenant_id)
            )
            changed = replace(changed, last_fire_at=fire_at)
        changed = replace(
            changed,
            next_fire_at=plan.next_fire_at,
            missed_fires=changed.missed_fires + plan.missed,
        )
    if changed == schedule:
        return None
    return FiringResult(replace(changed, updated_at=now), tuple(starts), tuple(fires))


class Scheduler:
    """The loop every replica runs: a step, then sleep until the next fire time (capped,
    and woken at once when a schedule is created or resumed on any replica)."""

    def __init__(
        self,
        schedules: Schedules,
        *,
        max_sleep: timedelta = timedelta(seconds=10),
        buffered_poll: timedelta = timedelta(seconds=1),
    ) -> None:
        self._s = schedules
        self._max_sleep = max_sleep.total_seconds()
        self._buffered_poll = buffered_poll.total_seconds()

    async def run(self) -> None:
        coordinator = self._s.coordinator
        store = self._s.store
        while not coordinator.draining:
            with coordinator.notifier.listen([SCHEDULES_KEY]) as wake:
                delay = self._max_sleep
                try:
                    await self._s.tick()
                    next_at = await store.next_schedule_fire_at()
                    if next_at is not None:
                        delay = min(delay, (next_at - self._s.now()).total_seconds())
                    if await store.has_buffered_fires():
                        # A buffered fire starts when its predecessor ends: look each second.
                        delay = min(delay, self._buffered_poll)
                except TrellisError as exc:
                    log.warning("scheduler step failed: %s", exc)
                    delay = 1.0
                except Exception:
                    log.exception("scheduler step failed")
                    delay = 1.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), max(delay, 0.01))


__all__ = [
    "MISFIRE_GRACE",
    "FirePlan",
    "Scheduler",
    "Schedules",
    "apply_overlap",
    "fire_key",
    "plan_fires",
    "unfinished",
]
