"""The secret store and sealed columns on SQLite, PostgreSQL (and the memory store where
it applies): values are never in the database as plaintext, ciphertexts are bound to their
row, rows written before encryption keep working and are sealed, and a key rotation
re-seals everything so the old key can be dropped."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from coordinator import errors
from coordinator.model import (
    Channel,
    ChannelKind,
    SecretEntry,
    WebhookAuth,
    WebhookTrigger,
)
from coordinator.service import Store
from coordinator.store import SqlStore, open_store

T0 = datetime(2030, 1, 1, tzinfo=UTC)
HMAC = "hmac-key-0123456789-abcdef"
PASSWORD = "smtp-password-zyxw"
TOKEN = "sms-token-qwerty-12345"
VALUE = "sk_live_store_contract_value"


def keys(*kids: str) -> str:
    return ",".join(f"{k}:{base64.b64encode(os.urandom(32)).decode()}" for k in kids)


def entry(tenant: str, name: str, value: str) -> SecretEntry:
    return SecretEntry(tenant, name, value, T0, T0)


async def seed(store: Store) -> None:
    await store.secrets.put_secret(entry("default", "stripe", VALUE))
    await store.triggers.create_webhook_trigger(
        WebhookTrigger("hooks/pay", "pay", 0, WebhookAuth.HMAC_SHA256, HMAC, T0)
    )
    await store.notifications.create_channel(
        Channel(
            "ch-1",
            "ops",
            ChannelKind.SMS,
            {"url": "https://sms.example", "headers": {"Authorization": TOKEN}, "to": ["1"]},
            T0,
            "default",
        )
    )
    await store.notifications.create_channel(
        Channel("ch-2", "mail", ChannelKind.SMTP, {"password": PASSWORD}, T0, "default")
    )


async def check_readable(store: Store) -> None:
    assert await store.secrets.get_secrets("default", ["stripe", "nope"]) == {"stripe": VALUE}
    trigger = await store.triggers.get_webhook_trigger("default", "hooks/pay")
    assert trigger.secret == HMAC
    sms = await store.notifications.get_channel("default", "ops")
    assert sms.config["headers"] == {"Authorization": TOKEN}
    mail = await store.notifications.get_channel("default", "mail")
    assert mail.config["password"] == PASSWORD


def _sealed_columns(conn: sa.Connection) -> dict[str, list[str]]:
    return {
        "secrets": list(conn.execute(sa.text("SELECT value FROM secrets")).scalars()),
        "webhook_triggers": list(
            conn.execute(sa.text("SELECT secret FROM webhook_triggers")).scalars()
        ),
        "notification_channels": list(
            conn.execute(sa.text("SELECT config FROM notification_channels")).scalars()
        ),
    }


async def raw(store: Store) -> dict[str, list[str]]:
    """Every sealed column as stored."""
    assert isinstance(store, SqlStore)
    return await store.run_sync(_sealed_columns, write=False)


async def test_secrets_are_set_listed_replaced_and_deleted_per_tenant(store: Store) -> None:
    assert await store.secrets.put_secret(entry("default", "b", "1")) is True
    assert await store.secrets.put_secret(entry("default", "a", "2")) is True
    assert await store.secrets.put_secret(entry("other", "a", "3")) is True
    later = SecretEntry("default", "a", "22", datetime(2031, 1, 1, tzinfo=UTC), T0)
    replaced = SecretEntry("default", "a", "22", later.created_at, datetime(2031, 1, 1, tzinfo=UTC))
    assert await store.secrets.put_secret(replaced) is False
    listed = await store.secrets.list_secrets("default")
    assert [(s.name, s.value) for s in listed] == [("a", "22"), ("b", "1")]
    assert listed[0].created_at == T0  # kept from the first set
    assert await store.secrets.get_secrets("other", ["a", "b"]) == {"a": "3"}
    await store.secrets.delete_secret("default", "a")
    with pytest.raises(errors.NotFound):
        await store.secrets.delete_secret("default", "a")
    assert [s.name for s in await store.secrets.list_secrets("default")] == ["b"]


@pytest.mark.sql_only("sealing is about what is at rest")
async def test_no_value_is_stored_in_plaintext_and_rotation_lets_the_old_key_go(
    db_url: str,
) -> None:
    first = keys("k1")
    store = await open_store(db_url, encryption_keys=first)
    try:
        await seed(store)
        before = await raw(store)
        text = repr(before)
        for value in (VALUE, HMAC, PASSWORD, TOKEN):
            assert value not in text
        assert all(v.startswith("enc1:k1:") for vs in before.values() for v in vs)
        await check_readable(store)
    finally:
        await store.close()

    second = keys("k2")
    store = await open_store(db_url, encryption_keys=f"{second},{first}")
    try:
        await check_readable(store)  # the old key still opens
        kid, counts = await store.secrets.rotate_key(batch_size=1)  # batches of one row
        assert (kid, counts) == (
            "k2",
            {"secrets": 1, "webhook_triggers": 1, "notification_channels": 2},
        )
        after = await raw(store)
        assert all(v.startswith("enc1:k2:") for vs in after.values() for v in vs)
        assert set(after["secrets"]).isdisjoint(before["secrets"])
    finally:
        await store.close()

    store = await open_store(db_url, encryption_keys=second)  # the old key is gone
    try:
        await check_readable(store)
    finally:
        await store.close()


@pytest.mark.sql_only("sealing is about what is at rest")
async def test_a_ciphertext_moved_to_another_row_does_not_open(db_url: str) -> None:
    store = await open_store(db_url, encryption_keys=keys("k1"))
    assert isinstance(store, SqlStore)
    try:
        await store.secrets.put_secret(entry("default", "a", "value-a"))
        await store.secrets.put_secret(entry("default", "b", "value-b"))

        def swap(conn: sa.Connection) -> None:
            a = conn.execute(sa.text("SELECT value FROM secrets WHERE name = 'a'")).scalar()
            conn.execute(sa.text("UPDATE secrets SET value = :v WHERE name = 'b'"), {"v": a})

        await store.run_sync(swap, write=True)
        with pytest.raises(errors.FailedPrecondition, match="altered or moved"):
            await store.secrets.get_secrets("default", ["b"])
    finally:
        await store.close()


@pytest.mark.sql_only("sealing is about what is at rest")
async def test_rows_from_before_encryption_are_sealed_at_open_and_plaintext_refused_after(
    db_url: str,
) -> None:
    key = keys("k1")
    store = await open_store(db_url, encryption_keys=key)
    assert isinstance(store, SqlStore)
    try:

        def legacy(conn: sa.Connection) -> None:
            conn.execute(
                sa.text(
                    "INSERT INTO webhook_triggers (tenant_id, path, workflow_name, "
                    "workflow_version, auth, secret, tolerance_ms, idempotency_expr, "
                    "input_expr, created_at) VALUES ('default', 'old', 'w', 0, 'HMAC_SHA256', "
                    ":s, 300000, '', '', 0)"
                ),
                {"s": HMAC},
            )

        await store.run_sync(legacy, write=True)
        # Written in plaintext behind the store's back (once the store has sealed what older
        # releases wrote): refused, so that plaintext cannot stand in for a sealed value.
        with pytest.raises(errors.FailedPrecondition, match="stored unencrypted"):
            await store.triggers.get_webhook_trigger("default", "old")
    finally:
        await store.close()
    # As after an upgrade: the next open seals what was plaintext, and it reads.
    store = await open_store(db_url, encryption_keys=key)
    try:
        stored = (await raw(store))["webhook_triggers"]
        assert stored and HMAC not in repr(stored)
        assert stored[0].startswith("enc1:k1:")
        assert (await store.triggers.get_webhook_trigger("default", "old")).secret == HMAC
        # A rotation seals plaintext too (what an older replica wrote during an upgrade).

        def older_release(conn: sa.Connection) -> None:
            conn.execute(sa.text("UPDATE webhook_triggers SET secret = :s"), {"s": HMAC})

        await store.run_sync(older_release, write=True)
        _, counts = await store.secrets.rotate_key(batch_size=10)
        assert counts["webhook_triggers"] == 1
        assert (await store.triggers.get_webhook_trigger("default", "old")).secret == HMAC
    finally:
        await store.close()


@pytest.mark.sql_only("sealing is about what is at rest")
async def test_without_a_key_values_are_sealed_with_the_derived_key_then_resealed(
    db_url: str,
) -> None:
    store = await open_store(db_url)
    assert isinstance(store, SqlStore)
    try:
        assert store.secrets.key_configured is False
        await seed(store)
        stored = await raw(store)
        assert VALUE not in repr(stored) and stored["secrets"][0].startswith("enc1:db:")
        # Sealed under the derived key by whoever can write the database (and so read the
        # server secret the key derives from): what a configured key must not accept.
        forged = store.db.seal("planted-hmac", "default", "secrets", "forged", "value")
    finally:
        await store.close()
    # Configuring a key later: opening the store re-seals under it and forgets the derived key.
    store = await open_store(db_url, encryption_keys=keys("k1"))
    try:
        assert store.secrets.key_configured is True
        assert all(v.startswith("enc1:k1:") for vs in (await raw(store)).values() for v in vs)
        await check_readable(store)

        def plant(conn: sa.Connection) -> None:
            conn.execute(
                sa.text(
                    "INSERT INTO secrets (tenant_id, name, value, created_at, updated_at) "
                    "VALUES ('default', 'forged', :v, 0, 0)"
                ),
                {"v": forged},
            )

        await store.run_sync(plant, write=True)
        with pytest.raises(errors.FailedPrecondition):
            await store.secrets.get_secrets("default", ["forged"])
    finally:
        await store.close()
