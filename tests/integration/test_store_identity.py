"""The identity and audit repositories (``IdentityRepository``, ``AuditRepository``) on every
store: tenants, credentials, custom roles, the server secret, the audit chain, and the
call's pending audit entry appended by the write transaction that carries its effect."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command

from coordinator import errors
from coordinator.model import (
    AuditEntry,
    Credential,
    CredentialKind,
    Grant,
    Permission,
    Role,
    TaskTypeLimits,
    Tenant,
    WorkerInfo,
    audit_hash,
)
from coordinator.service import PENDING_AUDIT, Store
from coordinator.store import SqlStore, open_store
from coordinator.store._open import alembic_config
from tests.support.store_builders import NOW, T


def api_key(key_id: str = "k1", *, tenant: str = T, **fields: object) -> Credential:
    values: dict[str, object] = {
        "id": key_id,
        "tenant_id": tenant,
        "kind": CredentialKind.API_KEY,
        "name": f"key {key_id}",
        "roles": ("operator", "auditors"),
        "created_at": NOW,
        "created_by": "admin@example.com",
        "secret_hash": "5e1f" * 16,
        "hash_key_id": "main",
        "expires_at": NOW + timedelta(days=30),
    }
    values.update(fields)
    return Credential(**values)  # type: ignore[arg-type]


def certificate(credential_id: str, subject: str, *, tenant: str = T) -> Credential:
    return Credential(
        id=credential_id,
        tenant_id=tenant,
        kind=CredentialKind.CERTIFICATE,
        name=f"cert {subject}",
        roles=("worker",),
        created_at=NOW,
        subject=subject,
    )


def entry(action: str = "CancelExecution", *, tenant: str = T, actor: str = "ann") -> AuditEntry:
    return AuditEntry(
        tenant_id=tenant,
        actor=actor,
        credential="k1",
        action=action,
        target="execution/e1",
        request_id=f"req-{action}",
    )


@contextmanager
def pending(audit: AuditEntry) -> Iterator[AuditEntry]:
    """``audit`` as the served call's pending entry while the block runs."""
    token = PENDING_AUDIT.set(audit)
    try:
        yield audit
    finally:
        PENDING_AUDIT.reset(token)


def worker(worker_id: str = "w1", *, credential: str = "k1") -> WorkerInfo:
    return WorkerInfo(
        id=worker_id, task_types=("work",), capacity=4, last_seen=NOW, credential=credential
    )


# -- tenants ------------------------------------------------------------------------------


async def test_tenants_are_created_listed_and_unique(store: Store) -> None:
    identity = store.identity
    # The default tenant exists from the start (the migration inserts it).
    assert await identity.tenant_exists(T)
    assert not await identity.tenant_exists("acme")
    acme = Tenant("acme", NOW, created_by="root")
    await identity.create_tenant(acme)
    await identity.create_tenant(Tenant("beta", NOW + timedelta(seconds=1)))
    assert await identity.tenant_exists("acme")
    listed = await identity.list_tenants()
    assert [t.id for t in listed] == ["acme", "beta", T]
    assert listed[0] == acme
    with pytest.raises(errors.AlreadyExists, match="tenant 'acme' exists already"):
        await identity.create_tenant(Tenant("acme", NOW))
    with pytest.raises(errors.AlreadyExists):
        await identity.create_tenant(Tenant(T, NOW))


# -- credentials --------------------------------------------------------------------------


async def test_credentials_round_trip_and_are_found_by_id_and_subject(store: Store) -> None:
    identity = store.identity
    key = api_key("k1")
    cert = certificate("c1", "worker-7.example.com", tenant="acme")
    await identity.create_credential(key)
    await identity.create_credential(cert)
    await identity.create_credential(api_key("k2", tenant="acme", expires_at=None))
    assert await identity.get_credential("k1") == key
    # By id across tenants: what a key presents before its tenant is known.
    assert await identity.get_credential("c1") == cert
    assert await identity.find_certificate("worker-7.example.com") == cert
    assert [c.id for c in await identity.list_credentials("acme")] == ["c1", "k2"]
    assert await identity.list_credentials(T) == [key]
    assert await identity.list_credentials("nobody") == []
    with pytest.raises(errors.NotFound, match="credential 'nope' not found"):
        await identity.get_credential("nope")
    with pytest.raises(errors.NotFound, match="no certificate credential for subject 'x'"):
        await identity.find_certificate("x")
    # An API key's subject is not a certificate's.
    await identity.create_credential(api_key("k3", subject="worker-8"))
    with pytest.raises(errors.NotFound):
        await identity.find_certificate("worker-8")


async def test_a_certificate_subject_and_a_credential_id_are_taken_once(store: Store) -> None:
    identity = store.identity
    await identity.create_credential(certificate("c1", "cn-a"))
    with pytest.raises(errors.AlreadyExists, match="subject 'cn-a' exists already"):
        await identity.create_credential(certificate("c2", "cn-a", tenant="acme"))
    with pytest.raises(errors.AlreadyExists, match="credential 'c1' exists already"):
        await identity.create_credential(api_key("c1"))
    # Nothing of the refused ones was stored.
    with pytest.raises(errors.NotFound):
        await identity.get_credential("c2")
    assert (await identity.get_credential("c1")).kind is CredentialKind.CERTIFICATE


@pytest.mark.sql_only("the partial unique index decides a race between replicas")
async def test_racing_certificates_of_one_subject_store_one(store: SqlStore) -> None:
    results = await asyncio.gather(
        *(store.identity.create_credential(certificate(f"c{i}", "cn")) for i in range(5)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, errors.AlreadyExists) for r in results if r is not None)


async def test_revoking_a_credential(store: Store) -> None:
    identity = store.identity
    await identity.create_credential(api_key("k1"))
    with pytest.raises(errors.NotFound, match="credential 'k1' not found in tenant 'acme'"):
        await identity.revoke_credential("acme", "k1", NOW)
    with pytest.raises(errors.NotFound):
        await identity.revoke_credential(T, "nope", NOW)
    assert (await identity.get_credential("k1")).revoked_at is None
    await identity.revoke_credential(T, "k1", NOW + timedelta(minutes=1))
    revoked = await identity.get_credential("k1")
    assert revoked.revoked_at == NOW + timedelta(minutes=1)
    assert not revoked.usable(NOW + timedelta(minutes=2))
    # A second revocation keeps the first time.
    await identity.revoke_credential(T, "k1", NOW + timedelta(minutes=5))
    assert (await identity.get_credential("k1")).revoked_at == NOW + timedelta(minutes=1)


async def test_touching_a_credential_records_its_last_use(store: Store) -> None:
    identity = store.identity
    await identity.create_credential(api_key("k1"))
    later = NOW + timedelta(seconds=90)
    await identity.touch_credential("k1", later)
    assert (await identity.get_credential("k1")).last_used_at == later
    # Never back (another replica's clock), and an unknown id is no error.
    await identity.touch_credential("k1", NOW)
    assert (await identity.get_credential("k1")).last_used_at == later
    await identity.touch_credential("nope", later)


# -- roles --------------------------------------------------------------------------------


async def test_roles_are_put_replaced_listed_and_deleted(store: Store) -> None:
    identity = store.identity
    auditors = Role(T, "auditors", frozenset({Grant(Permission.AUDIT_READ)}))
    starters = Role(
        T,
        "starters",
        frozenset(
            {
                Grant(Permission.EXECUTIONS_START, "orders-*"),
                Grant(Permission.WORKFLOWS_READ),
            }
        ),
    )
    await identity.put_role(starters)
    await identity.put_role(auditors)
    await identity.put_role(Role("acme", "auditors", frozenset()))
    assert await identity.list_roles(T) == [auditors, starters]
    # A put replaces the role's grants.
    wider = Role(
        T, "auditors", frozenset({Grant(Permission.AUDIT_READ), Grant(Permission.KEYS_READ)})
    )
    await identity.put_role(wider)
    assert await identity.list_roles(T) == [wider, starters]
    assert await identity.list_roles("acme") == [Role("acme", "auditors", frozenset())]
    await identity.delete_role(T, "auditors")
    assert await identity.list_roles(T) == [starters]
    with pytest.raises(errors.NotFound, match="role 'auditors' not found in tenant 'default'"):
        await identity.delete_role(T, "auditors")
    assert len(await identity.list_roles("acme")) == 1


# -- the server secret ----------------------------------------------------------------------


async def test_the_first_server_secret_stored_wins(store: Store) -> None:
    first, second = await asyncio.gather(
        store.identity.server_secret("candidate-a"), store.identity.server_secret("candidate-b")
    )
    assert first == second
    assert first in {"candidate-a", "candidate-b"}
    assert await store.identity.server_secret("candidate-c") == first


@pytest.mark.postgres
@pytest.mark.sql_only("two replicas: two stores on one database")
async def test_replicas_agree_on_the_server_secret(store: SqlStore) -> None:
    if not store.db.postgres:
        pytest.skip("PostgreSQL: one process owns a SQLite file")
    other = await open_store(store.engine.url.render_as_string(hide_password=False))
    try:
        secrets = await asyncio.gather(
            *(s.identity.server_secret(f"from-{i}") for i, s in enumerate([store, other] * 4))
        )
    finally:
        await other.close()
    assert len(set(secrets)) == 1


# -- workers keep the credential that registered them ----------------------------------------


async def test_migration_0007_downgrades_and_upgrades_keeping_workers(db_url: str) -> None:
    store = await open_store(db_url)
    try:
        await store.workers.upsert_worker(worker("w1", credential="k1"))
        await store.audit.append(entry(), NOW)

        def down_and_up(connection: sa.Connection) -> tuple[list[str], list[str]]:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "0006")
            inspector = sa.inspect(connection)
            tables = inspector.get_table_names()
            columns = [c["name"] for c in inspector.get_columns("workers")]
            command.upgrade(config, "head")
            return tables, columns

        tables, columns = await store.run_sync(down_and_up, write=True)
        assert "credential" not in columns and "audit_records" not in tables
        # The worker survives (its credential forgotten); the upgrade seeds the default tenant.
        assert (await store.workers.get_worker(T, "w1")).credential == ""
        assert [t.id for t in await store.identity.list_tenants()] == [T]
        assert await store.audit.verify(T) == (0, None)
    finally:
        await store.close()


async def test_a_worker_keeps_the_credential_that_registered_it(store: Store) -> None:
    await store.workers.upsert_worker(worker("w1", credential="k1"))
    assert (await store.workers.get_worker(T, "w1")).credential == "k1"
    await store.workers.upsert_worker(worker("w1", credential="k2"))
    assert (await store.workers.get_worker(T, "w1")).credential == "k2"


# -- the audit chain --------------------------------------------------------------------------


async def test_appends_number_and_chain_each_tenants_records(store: Store) -> None:
    audit = store.audit
    assert await audit.verify(T) == (0, None)
    first = entry("CreateKey")
    await audit.append(first, NOW)
    assert first.written
    await audit.append(entry("StartExecution", tenant="acme"), NOW)
    await audit.append(entry("CancelExecution", actor="bob"), NOW + timedelta(seconds=1))
    records = await audit.list_records(T)
    assert [(r.seq, r.action, r.actor) for r in records] == [
        (1, "CreateKey", "ann"),
        (2, "CancelExecution", "bob"),
    ]
    one, two = records
    assert one.at == NOW
    assert (one.credential, one.target, one.outcome, one.request_id) == (
        "k1",
        "execution/e1",
        "ok",
        "req-CreateKey",
    )
    assert one.prev_hash == ""
    assert two.prev_hash == one.hash
    at_ms = int(one.at.timestamp() * 1000)
    fields = ("ann", "k1", "CreateKey", "execution/e1", "ok", "req-CreateKey")
    assert one.hash == audit_hash("", T, 1, at_ms, fields)
    [acme] = await audit.list_records("acme")
    assert (acme.seq, acme.prev_hash) == (1, "")
    assert await audit.verify(T) == (2, None)
    assert await audit.verify("acme") == (1, None)


async def test_listing_filters_by_time_actor_and_position(store: Store) -> None:
    audit = store.audit
    for i in range(6):
        actor = "ann" if i % 2 == 0 else "bob"
        await audit.append(entry(f"A{i}", actor=actor), NOW + timedelta(minutes=i))
    seqs = [r.seq for r in await audit.list_records(T)]
    assert seqs == [1, 2, 3, 4, 5, 6]
    assert [r.seq for r in await audit.list_records(T, limit=2)] == [1, 2]
    assert [r.seq for r in await audit.list_records(T, after_seq=4)] == [5, 6]
    since = NOW + timedelta(minutes=3)
    assert [r.seq for r in await audit.list_records(T, since=since)] == [4, 5, 6]
    assert [r.seq for r in await audit.list_records(T, actor="bob")] == [2, 4, 6]
    bob_since = await audit.list_records(T, actor="bob", since=since, after_seq=4, limit=5)
    assert [r.seq for r in bob_since] == [6]
    assert await audit.list_records("acme") == []


async def test_a_write_transaction_appends_the_calls_pending_entry(store: Store) -> None:
    with pending(entry("RegisterWorker")) as audit:
        await store.workers.upsert_worker(worker())
    assert audit.written
    [record] = await store.audit.list_records(T)
    assert (record.seq, record.action, record.request_id) == (
        1,
        "RegisterWorker",
        "req-RegisterWorker",
    )
    # Once: later writes of the same call append nothing more.
    with pending(audit):
        await store.workers.touch_worker(T, "w1", NOW + timedelta(seconds=1))
    assert len(await store.audit.list_records(T)) == 1
    assert await store.audit.verify(T) == (1, None)


async def test_reads_and_bookkeeping_leave_the_pending_entry(store: Store) -> None:
    await store.identity.create_credential(api_key("k1"))
    with pending(entry("CancelExecution")) as audit:
        await store.identity.list_roles(T)
        await store.identity.get_credential("k1")
        await store.identity.touch_credential("k1", NOW)
        await store.identity.server_secret("s")
        assert not audit.written
        await store.audit.append(entry("Refused"), NOW)  # another call's, appended alone
        assert not audit.written
        # The call's effect takes it.
        await store.limits.set_task_type_limits(TaskTypeLimits(task_type="work", tenant_id=T), NOW)
    assert audit.written
    assert [r.action for r in await store.audit.list_records(T)] == ["Refused", "CancelExecution"]


async def test_a_failed_write_leaves_the_entry_for_the_gateway_to_record(store: Store) -> None:
    # The delete finds nothing: the call fails, its transaction wrote nothing and took no
    # entry, so the gRPC layer records the refusal itself.
    with pending(entry("DeleteRole")) as audit:
        with pytest.raises(errors.NotFound):
            await store.identity.delete_role(T, "nope")
        with pytest.raises(errors.NotFound):
            await store.limits.delete_task_type_limits(T, "nope")
        with pytest.raises(errors.AlreadyExists):
            await store.identity.create_tenant(Tenant(T, NOW))
    assert not audit.written
    assert await store.audit.list_records(T) == []
    failed = dataclasses.replace(audit, outcome="error: NOT_FOUND")
    await store.audit.append(failed, NOW)
    assert [r.outcome for r in await store.audit.list_records(T)] == ["error: NOT_FOUND"]


@pytest.mark.sql_only("a commit that fails after the append: the SQL store's transaction")
async def test_an_append_rolled_back_with_its_transaction_is_unwritten_again(
    store: SqlStore,
) -> None:
    # The append succeeds, then the commit fails, so neither the effect nor the record
    # exists; the entry is unwritten again, for the call's retry or the gRPC layer.
    db = store.db
    async with db.tx(write=True, audit=False) as conn:
        await conn.execute(sa.text("CREATE TABLE probe (id TEXT PRIMARY KEY)"))
    audit = entry("Probe")
    with pending(audit), pytest.raises(errors.Conflict):
        async with db.tx(write=True) as conn:
            await conn.execute(sa.text("INSERT INTO probe VALUES ('a')"))
            # Fails the transaction once the block has ended (after the append).
            raise_at_commit(conn)
    assert not audit.written
    assert await store.audit.list_records(T) == []
    # The retry of the call appends it with its effect.
    with pending(audit):
        async with db.tx(write=True) as conn:
            await conn.execute(sa.text("INSERT INTO probe VALUES ('b')"))
    assert audit.written
    assert [r.action for r in await store.audit.list_records(T)] == ["Probe"]


def raise_at_commit(conn: object) -> None:
    """Make the commit of ``conn``'s transaction fail with a conflict."""
    sync = conn.sync_connection  # type: ignore[attr-defined]

    def fail(_conn: object) -> None:
        raise errors.Conflict("commit refused (test)")

    sa.event.listen(sync, "commit", fail, once=True)


@pytest.mark.sql_only("an explicit rollback inside Database.tx")
async def test_an_explicitly_rolled_back_transaction_takes_no_entry(store: SqlStore) -> None:
    audit = entry("Skipped")
    with pending(audit):
        async with store.db.tx(write=True) as conn:
            await conn.execute(sa.text("DELETE FROM workers WHERE id = 'none'"))
            await conn.rollback()
    assert not audit.written
    assert await store.audit.list_records(T) == []


# -- verify finds what was changed behind the store's back ------------------------------------


async def _chain(store: Store, count: int) -> None:
    for i in range(count):
        await store.audit.append(entry(f"A{i}"), NOW + timedelta(seconds=i))
    assert await store.audit.verify(T) == (count, None)


async def _sql(store: SqlStore, statement: str) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(statement))


@pytest.mark.sql_only("tampering with the rows directly")
async def test_verify_finds_a_changed_record(store: SqlStore) -> None:
    await _chain(store, 9)
    await _sql(store, "UPDATE audit_records SET target = 'x' WHERE seq = 7")
    assert await store.audit.verify(T) == (
        7,
        "record 7 was changed (its hash does not match its fields)",
    )


@pytest.mark.sql_only("tampering with the rows directly")
async def test_verify_finds_a_record_replaced_with_a_recomputed_hash(store: SqlStore) -> None:
    await _chain(store, 5)
    [third] = await store.audit.list_records(T, after_seq=2, limit=1)
    fields = (third.actor, third.credential, third.action, "x", third.outcome, third.request_id)
    forged = audit_hash(third.prev_hash, T, 3, int(third.at.timestamp() * 1000), fields)
    await _sql(store, f"UPDATE audit_records SET target = 'x', hash = '{forged}' WHERE seq = 3")
    seq, problem = await store.audit.verify(T)
    assert seq == 4
    assert problem is not None and problem.startswith("record 4 does not follow record 3")


@pytest.mark.sql_only("tampering with the rows directly")
async def test_verify_finds_a_removed_record(store: SqlStore) -> None:
    await _chain(store, 9)
    await _sql(store, "DELETE FROM audit_records WHERE seq = 5")
    seq, problem = await store.audit.verify(T)
    assert (seq, problem) == (5, "record 5 is missing (the next record is 6)")


@pytest.mark.sql_only("tampering with the rows directly")
async def test_verify_finds_records_removed_from_the_end(store: SqlStore) -> None:
    await _chain(store, 10)
    await _sql(store, "DELETE FROM audit_records WHERE seq = 10")
    assert await store.audit.verify(T) == (
        10,
        "the chain ends at record 9 but its head says 10 (records were removed from the end)",
    )
    await _sql(store, "DELETE FROM audit_records")
    seq, problem = await store.audit.verify(T)
    assert seq == 1 and problem is not None and "no records but its head says 10" in problem


@pytest.mark.sql_only("tampering with the rows directly")
async def test_verify_finds_a_removed_head_and_a_replaced_last_record(store: SqlStore) -> None:
    await _chain(store, 3)
    await _sql(store, "UPDATE audit_heads SET hash = 'f00d'")
    seq, problem = await store.audit.verify(T)
    assert seq == 3 and problem is not None and "the last record was replaced" in problem
    await _sql(store, "DELETE FROM audit_heads")
    seq, problem = await store.audit.verify(T)
    assert seq == 3 and problem is not None and "no head" in problem


# -- concurrency --------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.sql_only("appends from many connections at once")
async def test_concurrent_appends_make_one_valid_chain(store: SqlStore) -> None:
    if not store.db.postgres:
        pytest.skip("PostgreSQL: SQLite has one writer")

    async def through_a_write(i: int) -> AuditEntry:
        # Half appended alone, half by the write that carries the call's effect.
        audit = entry(f"A{i}", actor=f"actor-{i}")
        if i % 2 == 0:
            await store.audit.append(audit, NOW)
        else:
            with pending(audit):
                await store.workers.upsert_worker(worker(f"w{i}"))
        return audit

    # A fresh tenant: the first appends race to create its chain head too.
    entries = await asyncio.gather(*(through_a_write(i) for i in range(20)))
    assert all(e.written for e in entries)
    records = await store.audit.list_records(T, limit=100)
    assert [r.seq for r in records] == list(range(1, 21))
    assert sorted(r.actor for r in records) == sorted(f"actor-{i}" for i in range(20))
    assert await store.audit.verify(T) == (20, None)
