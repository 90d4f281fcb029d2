"""`trellis audit list|verify` against a real coordinator whose audit trail is then changed
behind its back, straight in the database (SQLite and PostgreSQL): a changed row and a
row removed from the end are found and named; the other tenants' chains stay intact."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.cli import cli, trellis
from tests.support.procs import spawn_coordinator

pytestmark = pytest.mark.e2e

SYSTEM = "default"  # the bootstrap admin's tenant


def execute(db_url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """``statement`` (``%s`` placeholders) on the coordinator's database, committed."""
    if db_url.startswith("sqlite:///"):
        path = db_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as db, db:
            return db.execute(statement.replace("%s", "?"), params).fetchall()
    with psycopg.connect(db_url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


def audit_rows(out: str) -> list[list[str]]:
    """``trellis audit list`` as [seq, time, actor, action, target, outcome] rows."""
    return [line.split() for line in out.splitlines()[1:]]


def verify(address: str, *args: str) -> tuple[int, str]:
    done = trellis(address, "audit", "verify", *args)
    assert not done.stderr, done.stderr
    return done.returncode, done.stdout.strip()


def test_audit_verify_finds_rows_changed_in_the_database(db_url: str, tmp_path: Path) -> None:
    coordinator, address = spawn_coordinator(db_url, tmp_path)
    try:
        cli(address, "tenants", "create", "acme")
        developer = cli(
            address, "keys", "create", "--tenant", "acme", "--role", "developer", "--name", "dev"
        ).splitlines()[0]
        cli(address, "roles", "put", "auditor", "--permission", "audit.read")
        cli(address, "keys", "create", "--role", "auditor", "--name", "compliance")
        # The developer acts in its tenant, and tries something it may not.
        cli(address, "workflow", "apply", "examples/diamond.yaml", api_key=developer)
        refused = trellis(address, "tenants", "create", "evil", api_key=developer)
        assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr

        assert verify(address) == (0, "audit trail intact: 4 records, every hash matches")
        assert verify(address, "--tenant", "acme") == (
            0,
            "audit trail intact: 2 records, every hash matches",
        )
        admin_calls = audit_rows(cli(address, "audit", "list", "--actor", "bootstrap-admin"))
        assert [(r[0], r[3], r[4], r[5]) for r in admin_calls] == [
            ("1", "CreateTenant", "tenant/acme", "ok"),
            ("2", "CreateApiKey", "key/dev", "ok"),
            ("3", "PutRole", "role/auditor", "ok"),
            ("4", "CreateApiKey", "key/compliance", "ok"),
        ]
        developer_calls = audit_rows(
            cli(address, "audit", "list", "--tenant", "acme", "--actor", "dev")
        )
        assert [(r[3], r[4], r[5]) for r in developer_calls] == [
            ("RegisterWorkflow", "workflow/diamond", "ok"),
            ("CreateTenant", "tenant/evil", "denied"),
        ]
        assert audit_rows(cli(address, "audit", "list", "--actor", "nobody")) == []

        # Someone with database access rewrites what record 2 says.
        changed = "UPDATE audit_records SET target = 'forged' WHERE tenant_id = %s AND seq = 2"
        execute(db_url, changed, SYSTEM)
        code, out = verify(address)
        assert code == 1, out
        assert out.startswith("audit trail BROKEN at record 2: record 2 was changed"), out
        assert verify(address, "--tenant", "acme")[0] == 0  # another tenant's chain
        # Put back, the chain holds again: the check is of the content.
        restored = "UPDATE audit_records SET target = 'key/dev' WHERE tenant_id = %s AND seq = 2"
        execute(db_url, restored, SYSTEM)
        assert verify(address)[0] == 0

        # ... or removes the last record.
        execute(db_url, "DELETE FROM audit_records WHERE tenant_id = %s AND seq = 4", SYSTEM)
        code, out = verify(address)
        assert code == 1, out
        assert out.startswith("audit trail BROKEN at record 4: the chain ends at record 3"), out
        left = audit_rows(cli(address, "audit", "list"))
        assert [r[0] for r in left] == ["1", "2", "3"]
    finally:
        assert coordinator.stop() == 0, coordinator.output()[-3000:]
