"""Workflow definitions: ``SqlWorkflows``. A definition is immutable once registered; a
registration stores the next version of its name, or finds the one with equal content."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from coordinator import errors
from coordinator.model import WorkflowDef, WorkflowSummary
from coordinator.store import _rows
from coordinator.store._db import Database
from coordinator.store._tables import workflow_definitions

# Bounded retries of registrations racing for a version number.
REGISTER_MAX_TRIES = 10

# Built once with bound parameters (no per-call construction or cache-key generation).
_LATEST_WORKFLOW = (
    sa.select(workflow_definitions)
    .where(
        workflow_definitions.c.tenant_id == sa.bindparam("b_tenant_id"),
        workflow_definitions.c.name == sa.bindparam("b_name"),
    )
    .order_by(workflow_definitions.c.version.desc())
    .limit(1)
)
_WORKFLOW_VERSION = sa.select(workflow_definitions).where(
    workflow_definitions.c.tenant_id == sa.bindparam("b_tenant_id"),
    workflow_definitions.c.name == sa.bindparam("b_name"),
    workflow_definitions.c.version == sa.bindparam("b_version"),
)


class SqlWorkflows:
    """The ``WorkflowRepository`` port."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def register_workflow(self, defn: WorkflowDef, now: datetime) -> tuple[WorkflowDef, bool]:
        t = workflow_definitions
        tenant = defn.tenant_id
        for _ in range(REGISTER_MAX_TRIES):
            try:
                async with self._db.tx(write=True) as conn:
                    same = await conn.execute(
                        sa.select(t).where(
                            t.c.tenant_id == tenant,
                            t.c.name == defn.name,
                            t.c.content_hash == defn.content_hash,
                        )
                    )
                    row = same.mappings().first()
                    if row is not None:
                        return _rows.definition_from_row(row), False
                    latest = await conn.scalar(
                        sa.select(sa.func.max(t.c.version)).where(
                            t.c.tenant_id == tenant, t.c.name == defn.name
                        )
                    )
                    values = _rows.definition_values(
                        defn, version=(latest or 0) + 1, created_at=now
                    )
                    await conn.execute(sa.insert(t).values(values))
                    return _rows.definition_from_row(values), True
            except sa_exc.IntegrityError:
                # A concurrent registration took this version (or stored this content):
                # look again.
                continue
        raise errors.Conflict(f"workflow {defn.name!r}: too many concurrent registrations; retry")

    async def get_workflow(self, tenant_id: str, name: str, version: int | None) -> WorkflowDef:
        params: dict[str, Any] = {"b_tenant_id": tenant_id, "b_name": name}
        if version is None:
            query = _LATEST_WORKFLOW
        else:
            query = _WORKFLOW_VERSION
            params["b_version"] = version
        async with self._db.tx(write=False) as conn:
            row = (await conn.execute(query, params)).mappings().first()
        if row is None:
            which = f"workflow {name!r}" + ("" if version is None else f" version {version}")
            raise errors.NotFound(f"{which} not found")
        return _rows.definition_from_row(row)

    async def list_workflows(
        self, tenant_id: str, limit: int, after_name: str | None
    ) -> list[WorkflowSummary]:
        t = workflow_definitions
        d = t.alias("d")
        latest = (
            sa.select(sa.func.max(t.c.version))
            .where(t.c.tenant_id == d.c.tenant_id, t.c.name == d.c.name)
            .scalar_subquery()
        )
        query = (
            sa.select(d.c.name, d.c.version, d.c.description)
            .where(d.c.tenant_id == tenant_id, d.c.version == latest)
            .order_by(d.c.name)
            .limit(limit)
        )
        if after_name is not None:
            query = query.where(d.c.name > after_name)
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.summary_from_row(r) for r in rows]

    async def list_workflow_versions(self, tenant_id: str, name: str) -> list[WorkflowDef]:
        t = workflow_definitions
        query = (
            sa.select(t).where(t.c.tenant_id == tenant_id, t.c.name == name).order_by(t.c.version)
        )
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.definition_from_row(r) for r in rows]
