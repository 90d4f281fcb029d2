"""The memory store's smaller repositories: workflow definitions, workers, task-type limits
and dead letters (which transitions write, see ``_aggregate``)."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from coordinator import errors
from coordinator.model import (
    DeadLetter,
    TaskTypeLimits,
    WorkerInfo,
    WorkflowDef,
    WorkflowSummary,
)
from coordinator.store._memory import _copies
from coordinator.store._memory._leases import touch_worker
from coordinator.store._memory._state import DefinitionRow, State, newest_first


class MemoryWorkflows:
    """The ``WorkflowRepository`` port: a registration stores the next version of its name,
    or finds the one with equal content."""

    def __init__(self, state: State) -> None:
        self._state = state

    async def register_workflow(self, defn: WorkflowDef, now: datetime) -> tuple[WorkflowDef, bool]:
        state = self._state
        tenant = defn.tenant_id
        async with state.write():
            versions = state.versions.get((tenant, defn.name), {})
            for version, content_hash in versions.items():
                if content_hash == defn.content_hash:
                    found = state.workflows.get((tenant, defn.name, version))
                    assert found is not None
                    return _copies.definition_copy(found.defn), False
            version = max(versions, default=0) + 1
            stored = _copies.definition(defn, version=version, created_at=now)
            row = DefinitionRow(stored, defn.content_hash)
            state.workflows.put((tenant, defn.name, version), row)
        return _copies.definition_copy(stored), True

    async def get_workflow(self, tenant_id: str, name: str, version: int | None) -> WorkflowDef:
        state = self._state
        async with state.read():
            versions = state.versions.get((tenant_id, name), {})
            wanted = max(versions, default=None) if version is None else version
            found = None if wanted is None else state.workflows.get((tenant_id, name, wanted))
        if found is None:
            which = f"workflow {name!r}" + ("" if version is None else f" version {version}")
            raise errors.NotFound(f"{which} not found")
        return _copies.definition_copy(found.defn)

    async def list_workflows(
        self, tenant_id: str, limit: int, after_name: str | None
    ) -> list[WorkflowSummary]:
        state = self._state
        async with state.read():
            latest = [
                state.workflows.get((tenant, name, max(versions)))
                for (tenant, name), versions in state.versions.items()
                if tenant == tenant_id and versions and (after_name is None or name > after_name)
            ]
        summaries = [
            WorkflowSummary(r.defn.name, r.defn.version, r.defn.description)
            for r in latest
            if r is not None
        ]
        summaries.sort(key=lambda s: s.name)
        return summaries[:limit]

    async def list_workflow_versions(self, tenant_id: str, name: str) -> list[WorkflowDef]:
        state = self._state
        async with state.read():
            versions = sorted(state.versions.get((tenant_id, name), {}))
            found = [state.workflows.get((tenant_id, name, v)) for v in versions]
        return [_copies.definition_copy(r.defn) for r in found if r is not None]


class MemoryWorkers:
    """The ``WorkerRepository`` port."""

    def __init__(self, state: State) -> None:
        self._state = state

    async def upsert_worker(self, worker: WorkerInfo) -> None:
        async with self._state.write():
            self._state.workers.put((worker.tenant_id, worker.id), _copies.worker(worker))

    async def get_worker(self, tenant_id: str, worker_id: str) -> WorkerInfo:
        async with self._state.read():
            found = self._state.workers.get((tenant_id, worker_id))
        if found is None:
            raise errors.NotFound(f"worker {worker_id!r} not found")
        return _copies.worker_copy(found)

    async def touch_worker(self, tenant_id: str, worker_id: str, now: datetime) -> None:
        async with self._state.write():
            touch_worker(self._state, tenant_id, worker_id, _copies.ms(now))


def _no_limits(task_type: str) -> errors.NotFound:
    return errors.NotFound(
        f"no limits for task type {task_type!r}; set them with `trellis limits set {task_type} ...`"
    )


class MemoryLimits:
    """The ``LimitsRepository`` port: one row per (tenant, task type); the last set wins."""

    def __init__(self, state: State) -> None:
        self._state = state

    async def set_task_type_limits(self, limits: TaskTypeLimits, now: datetime) -> TaskTypeLimits:
        stored = _copies.truncated(
            dataclasses.replace(
                limits, rate_per_second=float(limits.rate_per_second), updated_at=now
            )
        )
        async with self._state.write():
            self._state.limits.put((limits.tenant_id, limits.task_type), stored)
        return stored

    async def get_task_type_limits(self, tenant_id: str, task_type: str) -> TaskTypeLimits:
        async with self._state.read():
            found = self._state.limits.get((tenant_id, task_type))
        if found is None:
            raise _no_limits(task_type)
        return found

    async def list_task_type_limits(self, tenant_id: str | None) -> list[TaskTypeLimits]:
        async with self._state.read():
            rows = self._state.limits.items()
        return [
            limits
            for (tenant, _), limits in sorted(rows, key=lambda kv: kv[0])
            if tenant_id is None or tenant == tenant_id
        ]

    async def delete_task_type_limits(self, tenant_id: str, task_type: str) -> None:
        async with self._state.write():
            if self._state.limits.delete((tenant_id, task_type)) is None:
                raise _no_limits(task_type)


class MemoryDeadLetters:
    """The ``DeadLetterRepository`` port."""

    def __init__(self, state: State) -> None:
        self._state = state

    async def list_dead_letters(
        self,
        tenant_id: str,
        *,
        workflow_name: str | None,
        task_type: str | None,
        include_redriven: bool,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[DeadLetter]:
        async with self._state.read():
            rows = [
                d
                for d in self._state.dead_letters.values()
                if d.tenant_id == tenant_id
                and (include_redriven or d.redriven_at is None)
                and (workflow_name is None or d.workflow_name == workflow_name)
                and (task_type is None or d.task_type == task_type)
            ]
        return newest_first(rows, before, limit)

    async def get_dead_letter(self, tenant_id: str, dead_letter_id: str) -> DeadLetter:
        async with self._state.read():
            found = self._state.dead_letters.get(dead_letter_id)
        if found is None or found.tenant_id != tenant_id:
            raise errors.NotFound(f"dead letter {dead_letter_id!r} not found")
        return found
