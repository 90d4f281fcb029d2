"""The secret store and ``${secret:NAME}`` references on a ``MemoryStore``; sealing.

Values resolve only into the lease handed to a worker, and whatever a worker sends back
carrying a value is recorded with the reference in its place.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from coordinator import engine, errors
from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.model import (
    DeadLetter,
    ErrorInfo,
    ExecutionStatus,
    NodeSpec,
    NodeStatus,
    WorkflowDef,
    malformed_reference,
    redact,
    resolve_references,
    secret_references,
)
from coordinator.notify import redacted
from coordinator.sealing import Sealer, SealingError, parse_keys
from coordinator.service import Coordinator, ServiceSettings
from coordinator.store import MemoryStore
from trellis.cli import _dev_encryption_keys

TENANT = "default"
T0 = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
STRIPE = "sk_live_51H-very-secret-value"
CONFIG = b'{"auth": "Bearer ${secret:stripe_key}", "url": "https://api.example", "n": 1}'


def key(fill: int) -> bytes:
    return bytes([fill]) * 32


@pytest.fixture
async def c() -> Coordinator:
    c = Coordinator(MemoryStore(), ServiceSettings(), clock=lambda: T0)
    await c.leasing.register_worker(TENANT, "w1", ["pay"], 10)
    return c


def pay(config: bytes = CONFIG, retries: int = 1) -> WorkflowDef:
    from coordinator.model import RetryPolicy

    return WorkflowDef(
        name="pay",
        nodes=(
            NodeSpec(
                id="charge",
                task_type="pay",
                config=config,
                retry_policy=RetryPolicy(max_attempts=retries),
            ),
        ),
        edges=(),
    )


# -- references -----------------------------------------------------------------------------


def test_references_are_found_resolved_and_redacted() -> None:
    assert secret_references(CONFIG) == ("stripe_key",)
    assert secret_references(b'{"a": "plain"}') == ()
    assert NodeSpec(id="x", task_type="t", config=CONFIG).secret_refs == ("stripe_key",)
    resolved = resolve_references(CONFIG, {"stripe_key": STRIPE})
    assert json.loads(resolved)["auth"] == f"Bearer {STRIPE}"
    back = redact(json.dumps({"e": f"401 for {STRIPE}", "k": [STRIPE]}).encode(), {"s": STRIPE})
    assert STRIPE not in back.decode()
    assert json.loads(back) == {"e": "401 for ${secret:s}", "k": ["${secret:s}"]}


@pytest.mark.parametrize(
    "config",
    [b'{"a": "${secret:}"}', b'{"a": "${secret:bad name}"}', b'{"a": "${secret:x"}'],
)
def test_malformed_references_are_refused_at_registration(config: bytes) -> None:
    assert malformed_reference(config) is not None


async def test_registration_refuses_a_malformed_reference(c: Coordinator) -> None:
    with pytest.raises(errors.InvalidArgument, match="malformed secret reference"):
        await c.definitions.register_workflow(pay(b'{"a": "${secret:no spaces}"}'))


# -- the store and the lease ----------------------------------------------------------------


async def test_a_lease_carries_the_value_and_nothing_recorded_does(c: Coordinator) -> None:
    info, created = await c.secrets.set_secret(TENANT, "stripe_key", STRIPE)
    assert created and info.size == len(STRIPE)
    assert [s.name for s in await c.secrets.list_secrets(TENANT)] == ["stripe_key"]
    await c.definitions.register_workflow(pay())
    stored = await c.definitions.get_workflow(TENANT, "pay", None)
    assert STRIPE.encode() not in stored.nodes[0].config
    execution, _ = await c.starts.start_execution(TENANT, "pay", None, b"{}")

    (task,) = await c.leasing.poll_tasks(TENANT, "w1", ["pay"], 1, timedelta(0))
    assert json.loads(task.config)["auth"] == f"Bearer {STRIPE}"

    details = json.dumps({"request": {"authorization": f"Bearer {STRIPE}"}}).encode()
    failure = ErrorInfo(type="HTTPError", message=f"401 with key {STRIPE}", details=details)
    assert await c.results.fail_task(TENANT, task.token, failure, False) == (False, False)

    view = await c.executions.get_execution(TENANT, execution.id)
    assert view.execution.status is ExecutionStatus.FAILED
    events = await c.store.executions.list_events(TENANT, execution.id, 0, 100)
    letters = await c.store.dead_letters.list_dead_letters(
        TENANT, workflow_name=None, task_type=None, include_redriven=True, limit=10, before=None
    )
    recorded = repr((view, events, letters))
    assert STRIPE not in recorded
    assert "401 with key ${secret:stripe_key}" in recorded
    assert len(letters) == 1 and isinstance(letters[0], DeadLetter)


async def test_an_output_carrying_a_value_is_recorded_redacted(c: Coordinator) -> None:
    await c.secrets.set_secret(TENANT, "stripe_key", STRIPE)
    await c.definitions.register_workflow(pay())
    execution, _ = await c.starts.start_execution(TENANT, "pay", None, b"{}")
    (task,) = await c.leasing.poll_tasks(TENANT, "w1", ["pay"], 1, timedelta(0))
    await c.results.complete_task(TENANT, task.token, json.dumps({"echo": STRIPE}).encode(), "w1")
    view = await c.executions.get_execution(TENANT, execution.id)
    assert json.loads(view.execution.output or b"") == {"echo": "${secret:stripe_key}"}


async def test_a_missing_secret_fails_the_attempt_naming_it(c: Coordinator) -> None:
    await c.definitions.register_workflow(pay(retries=3))
    execution, _ = await c.starts.start_execution(TENANT, "pay", None, b"{}")
    assert await c.leasing.poll_tasks(TENANT, "w1", ["pay"], 1, timedelta(0)) == []
    view = await c.executions.get_execution(TENANT, execution.id)
    (node,) = view.nodes
    assert node.status is NodeStatus.FAILED  # not retried: the secret would still be missing
    assert node.error is not None and node.error.type == "SecretNotFound"
    assert "'stripe_key'" in node.error.message and "trellis secrets set" in node.error.message


async def test_set_replaces_delete_forgets_and_values_are_bounded(c: Coordinator) -> None:
    await c.secrets.set_secret(TENANT, "k", "value-one")
    assert await c.vault.values(TENANT, ["k"]) == {"k": "value-one"}
    _, created = await c.secrets.set_secret(TENANT, "k", "value-two")
    assert not created
    assert await c.vault.values(TENANT, ["k"]) == {"k": "value-two"}  # the cache was dropped
    await c.secrets.delete_secret(TENANT, "k")
    assert await c.vault.values(TENANT, ["k"]) == {}
    with pytest.raises(errors.NotFound, match="secret 'k' not found"):
        await c.secrets.delete_secret(TENANT, "k")
    with pytest.raises(errors.InvalidArgument, match="at most 65536"):
        await c.secrets.set_secret(TENANT, "big", "x" * (64 * 1024 + 1))
    # Too short to redact without rewriting ordinary text ("1", "true").
    for short in ("", "1", "true", "seven77"):
        with pytest.raises(errors.InvalidArgument, match="at least 8"):
            await c.secrets.set_secret(TENANT, "short", short)
    with pytest.raises(errors.InvalidArgument, match="not a valid secret name"):
        await c.secrets.set_secret(TENANT, "../etc", "long-enough-value")
    assert await c.secrets.list_secrets("other") == []  # per tenant


# -- channels are shown without their secrets ---------------------------------------------


def test_channel_secrets_and_header_values_show_as_set() -> None:
    shown = redacted(
        {"url": "https://sms.example", "headers": {"Authorization": "Basic abc"}, "secret": ""}
    )
    assert shown == {
        "url": "https://sms.example",
        "headers": {"Authorization": "<set>"},
        "secret": "",
    }
    assert redacted({"password": "hunter2"})["password"] == "<set>"


# -- sealing -----------------------------------------------------------------------------


def test_sealed_values_are_bound_to_their_cell_and_key() -> None:
    sealer = Sealer([("k1", key(1))])
    plain = "the-plaintext-value"
    sealed = sealer.seal(plain, "t1", "secrets", "a", "value")
    assert sealed.startswith("enc1:k1:") and plain not in sealed
    assert sealer.seal(plain, "t1", "secrets", "a", "value") != sealed  # random nonce
    assert sealer.open(sealed, "t1", "secrets", "a", "value") == plain
    for cell in (("t2", "secrets", "a", "value"), ("t1", "secrets", "b", "value")):
        with pytest.raises(SealingError, match="altered or moved"):
            sealer.open(sealed, *cell)
    with pytest.raises(SealingError, match="not configured"):
        Sealer([("k2", key(2))]).open(sealed, "t1", "secrets", "a", "value")
    rotated = Sealer([("k2", key(2)), ("k1", key(1))])
    assert rotated.open(sealed, "t1", "secrets", "a", "value") == plain
    assert rotated.seal(plain, "t1", "secrets", "a", "value").startswith("enc1:k2:")
    assert sealer.open("legacy plaintext", "t1", "secrets", "a", "value") == "legacy plaintext"
    sealer.accept_plaintext = False  # once the store has sealed what older releases wrote
    with pytest.raises(SealingError, match="stored unencrypted"):
        sealer.open("planted plaintext", "t1", "secrets", "a", "value")
    assert sealer.open("legacy", "t1", "secrets", "a", "value", plaintext_ok=True) == "legacy"


def test_key_settings_are_checked() -> None:
    good = base64.b64encode(key(3)).decode()
    assert parse_keys(f"a:{good}, b:{good}")[1] == ("b", key(3))
    for bad, match in (
        ("", "no encryption key"),
        (f"{good}", "expected kid:base64key"),
        ("a:c2hvcnQ=", "must be 32 bytes"),
        (f"a:{good},a:{good}", "appears twice"),
    ):
        with pytest.raises(SealingError, match=match):
            parse_keys(bad)


def test_a_key_setting_error_never_quotes_the_key() -> None:
    good = base64.b64encode(key(5)).decode()
    for bad in (good, f"k1: {good}", f"k1:{good},{good}"):
        with pytest.raises(SealingError) as refused:
            parse_keys(bad)
        assert good[:8] not in str(refused.value), refused.value


# -- settings --------------------------------------------------------------------------


def test_encryption_keys_come_from_the_variable_or_a_file(tmp_path: Path) -> None:
    text = f"k1:{base64.b64encode(key(4)).decode()}"
    assert CoordinatorConfig.from_env({"TRELLIS_ENCRYPTION_KEYS": text}).encryption_key_text() == (
        text
    )
    mounted = tmp_path / "keys"
    mounted.write_text(text + "\n")
    config = CoordinatorConfig.from_env({"TRELLIS_ENCRYPTION_KEYS_FILE": str(mounted)})
    assert parse_keys(config.encryption_key_text()) == [("k1", key(4))]
    assert CoordinatorConfig.from_env({}).encryption_key_text() == ""
    with pytest.raises(ConfigError, match="not both"):
        CoordinatorConfig.from_env(
            {"TRELLIS_ENCRYPTION_KEYS": text, "TRELLIS_ENCRYPTION_KEYS_FILE": str(mounted)}
        )
    missing = CoordinatorConfig.from_env({"TRELLIS_ENCRYPTION_KEYS_FILE": str(tmp_path / "no")})
    with pytest.raises(ConfigError, match=r"TRELLIS_ENCRYPTION_KEYS_FILE=.*cannot be read"):
        missing.encryption_key_text()


def test_trellis_dev_keeps_its_key_outside_the_database(tmp_path: Path) -> None:
    path = tmp_path / ".trellis" / "dev-encryption-keys"
    assert _dev_encryption_keys({}, path) == {"encryption_keys_file": str(path)}
    first = path.read_text()
    assert len(parse_keys(first)) == 1 and path.stat().st_mode & 0o077 == 0
    assert _dev_encryption_keys({}, path) == {"encryption_keys_file": str(path)}
    assert path.read_text() == first  # kept across runs
    assert _dev_encryption_keys({"TRELLIS_ENCRYPTION_KEYS": "k:x"}, path) == {}


async def test_a_worker_cannot_add_a_node_that_would_receive_a_secret(c: Coordinator) -> None:
    await c.secrets.set_secret(TENANT, "stripe_key", STRIPE)
    await c.definitions.register_workflow(pay(b'{"plain": true}'))
    execution, _ = await c.starts.start_execution(TENANT, "pay", None, b"{}")
    (task,) = await c.leasing.poll_tasks(TENANT, "w1", ["pay"], 1, timedelta(0))
    thief = NodeSpec(id="steal", task_type="pay", config=CONFIG)
    with pytest.raises(errors.InvalidArgument, match="nodes added at run time cannot use"):
        await c.results.complete_task(
            TENANT,
            task.token,
            b"{}",
            "w1",
            expansion=engine.Expansion(nodes=(thief,), edges=(("charge", "steal"),)),
        )
    # Refused, nothing changed: the lease is still held and completes normally.
    await c.results.complete_task(TENANT, task.token, b"{}", "w1")
    view = await c.executions.get_execution(TENANT, execution.id)
    assert [n.node_id for n in view.nodes] == ["charge"]


async def test_a_value_copied_into_an_added_node_is_refused_unrecorded(c: Coordinator) -> None:
    await c.secrets.set_secret(TENANT, "stripe_key", STRIPE)
    await c.definitions.register_workflow(pay())
    execution, _ = await c.starts.start_execution(TENANT, "pay", None, b"{}")
    (task,) = await c.leasing.poll_tasks(TENANT, "w1", ["pay"], 1, timedelta(0))
    copied = NodeSpec(id="next", task_type="pay", config=json.dumps({"key": STRIPE}).encode())
    # The copy is redacted to its reference, and a node added at run time may not have one.
    with pytest.raises(errors.InvalidArgument, match=r"adds node 'next'.*\$\{secret:stripe_key\}"):
        await c.results.complete_task(
            TENANT,
            task.token,
            b"{}",
            "w1",
            expansion=engine.Expansion(nodes=(copied,), edges=(("charge", "next"),)),
        )
    await c.results.complete_task(TENANT, task.token, b"{}", "w1")
    view = await c.executions.get_execution(TENANT, execution.id)
    assert [n.node_id for n in view.nodes] == ["charge"] and STRIPE not in repr(view)
