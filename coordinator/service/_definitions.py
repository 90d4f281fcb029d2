"""Workflow definitions: registered (validated, references checked), read, listed, and
kept in memory once read (a registered version never changes)."""

from __future__ import annotations

from coordinator import engine
from coordinator.errors import NotFound
from coordinator.model import Execution, WorkflowDef, WorkflowSummary
from coordinator.service._common import Clock, ServiceSettings, clamp_page_size
from coordinator.service._references import check_references
from coordinator.service._schemas import check_definition_schemas
from coordinator.service.ports import WorkflowRepository


class Definitions:
    def __init__(self, store: WorkflowRepository, settings: ServiceSettings, clock: Clock) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._cache: dict[tuple[str, str, int], WorkflowDef] = {}

    async def register_workflow(self, defn: WorkflowDef) -> tuple[WorkflowDef, bool]:
        engine.validate_definition(defn, self._settings.limits)
        check_definition_schemas(defn)
        await check_references(
            defn,
            lambda name, version: self.get_workflow(defn.tenant_id, name, version),
            self._settings.max_workflow_depth,
        )
        stored, created = await self._store.register_workflow(defn, self._clock())
        self._cache[(stored.tenant_id, stored.name, stored.version)] = stored
        return stored, created

    async def get_workflow(self, tenant_id: str, name: str, version: int | None) -> WorkflowDef:
        """The given version (the latest when None). Raises ``NotFound``."""
        if version is not None:
            cached = self._cache.get((tenant_id, name, version))
            if cached is not None:
                return cached
        defn = await self._store.get_workflow(tenant_id, name, version)
        self._cache[(tenant_id, defn.name, defn.version)] = defn
        return defn

    async def of(self, execution: Execution) -> WorkflowDef:
        """The definition version ``execution`` runs."""
        return await self.get_workflow(
            execution.tenant_id, execution.workflow_name, execution.workflow_version
        )

    def cached(self, tenant_id: str, name: str, version: int) -> WorkflowDef | None:
        """The definition when it was read on this replica (no I/O)."""
        return self._cache.get((tenant_id, name, version))

    def task_types(self, execution: Execution) -> set[str]:
        """The task types of an execution's definition, when it is cached (it is after any
        transition of the execution on this replica)."""
        defn = self.cached(execution.tenant_id, execution.workflow_name, execution.workflow_version)
        if defn is None:
            return set()
        types = {n.task_type for n in defn.nodes if n.task_type}
        return types | {n.compensation_task_type for n in defn.nodes if n.compensation_task_type}

    async def list_workflows(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[WorkflowSummary], str]:
        limit = clamp_page_size(page_size)
        rows = await self._store.list_workflows(tenant_id, limit + 1, page_token or None)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1].name if more else "")

    async def list_workflow_versions(self, tenant_id: str, name: str) -> list[WorkflowDef]:
        versions = await self._store.list_workflow_versions(tenant_id, name)
        if not versions:
            raise NotFound(f"workflow '{name}' not found; register it first")
        return versions
