"""Secrets through real processes, on SQLite and on PostgreSQL: a coordinator with an
encryption key, a real worker whose node config references ``${secret:stripe_key}``, a
webhook receiver for the failure notification, and the ``trellis`` command line.

The worker receives the value; nothing the coordinator returns, logs, notifies or stores
carries any secret set in the test (the database is read raw: the SQLite files' bytes, a
``pg_dump``); a key rotation re-encrypts everything, and the old key can then go.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy.engine import make_url

from coordinator.signing import sign
from tests.support.cli import trellis_cli
from tests.support.grpc_api import channel_to
from tests.support.hostile import grpc_health, watched
from tests.support.procs import ROOT, Proc, base_env, free_port, spawn_coordinator, spawn_worker
from tests.support.wait import wait_for
from trellis.v1 import common_pb2
from trellis.v1 import notification_service_pb2 as npb
from trellis.v1 import notification_service_pb2_grpc as ngrpc
from trellis.v1 import secret_service_pb2 as spb
from trellis.v1 import secret_service_pb2_grpc as sgrpc
from trellis.v1 import trigger_service_pb2 as tpb
from trellis.v1 import trigger_service_pb2_grpc as tgrpc
from trellis.v1 import workflow_service_pb2 as fpb
from trellis.v1 import workflow_service_pb2_grpc as fgrpc
from worker_sdk import Client, Workflow

pytestmark = pytest.mark.e2e

WORKER = Path(__file__).with_name("secret_worker.py")
STRIPE = "sk_live_e2e_7f3a9c1d5b"
HMAC_SECRET = "hmac-e2e-secret-4b8e2d6f0a"
CHANNEL_SECRET = "whsec-e2e-channel-9c7d5e3f1a"
SMTP_PASSWORD = "smtp-pass-e2e-2a4c6e8g0i"
HEADER_VALUE = "Bearer sms-token-e2e-1b3d5f7h9j"
SECRETS = (STRIPE, HMAC_SECRET, CHANNEL_SECRET, SMTP_PASSWORD, HEADER_VALUE)
REFERENCE = "${secret:stripe_key}"


class Receiver:
    """A webhook endpoint on a local port: the bodies it was sent."""

    def __init__(self) -> None:
        bodies: list[bytes] = []
        self.bodies = bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                bodies.append(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def new_key(kid: str) -> str:
    return f"{kid}:{base64.b64encode(os.urandom(32)).decode()}"


def database_bytes(db_url: str) -> bytes:
    """The whole database as bytes: the SQLite file with its WAL, or a pg_dump."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        path = Path(str(url.database))
        parts = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
        return b"".join(p.read_bytes() for p in parts if p.exists())
    pg_dump = shutil.which("pg_dump")
    assert pg_dump is not None, "pg_dump is needed to read the PostgreSQL database raw"
    libpq = url.set(drivername="postgresql").render_as_string(hide_password=False)
    done = subprocess.run(
        [pg_dump, "--data-only", "--no-owner", libpq], capture_output=True, timeout=60, check=True
    )
    return done.stdout


def assert_clean(where: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    found = [s for s in SECRETS if s.encode() in data]
    assert not found, f"{where} carries secret values {found}"


async def set_secret_from_stdin(address: str, name: str, value: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trellis.cli", "--address", address, "secrets", "set", name,
        env=base_env(), cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate(value.encode() + b"\n")
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def cli_ok(address: str, *args: str) -> str:
    done = await trellis_cli(address, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def coordinator_logs(log_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in log_dir.glob("coordinator-*.log"))


def recorded(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_secrets_reach_the_worker_and_nowhere_else_and_rotation_drops_the_old_key(
    db_url: str, tmp_path: Path
) -> None:
    k1, k2 = new_key("k1"), new_key("k2")
    receiver = Receiver()
    settings = {
        "notify_poll_interval": "100ms",
        "log_level": "DEBUG",
        "notify_allow_networks": "127.0.0.1/32",  # the receiver is on loopback
    }
    port = free_port()
    coordinator, address = spawn_coordinator(
        db_url, tmp_path, port=port, encryption_keys=k1, **settings
    )
    record = tmp_path / "received.txt"
    worker: Proc | None = None
    channel = channel_to(address)
    workflows = fgrpc.WorkflowServiceStub(channel)
    notifications = ngrpc.NotificationServiceStub(channel)
    triggers = tgrpc.TriggerServiceStub(channel)
    secrets = sgrpc.SecretServiceStub(channel)
    try:
        # The secret store, from the command line (the value on stdin).
        assert "secret stripe_key created" in await set_secret_from_stdin(
            address, "stripe_key", STRIPE
        )
        listed = await cli_ok(address, "secrets", "list", "--output", "json")
        (shown,) = json.loads(listed)
        assert shown["name"] == "stripe_key" and shown["size"] == len(STRIPE)
        assert_clean("trellis secrets list", listed)

        # Workflows referencing the secret; secrets of a trigger and of channels.
        async with Client(address) as client:
            ok = Workflow("charge-ok")
            ok.node("charge", "stripe.echo", config={"key": REFERENCE})
            await client.register_workflow(ok)
            bad = Workflow("charge-fail")
            bad.node("charge", "stripe.fail", config={"key": REFERENCE}, retries=2)
            await client.register_workflow(bad)
        await triggers.CreateWebhookTrigger(
            tpb.CreateWebhookTriggerRequest(
                path="pay/hook", workflow_name="charge-ok", hmac_secret=HMAC_SECRET
            )
        )
        hook = npb.Channel(
            name="hook",
            webhook=npb.WebhookChannel(
                url=f"http://127.0.0.1:{receiver.port}/hooks",
                secret=CHANNEL_SECRET,
                headers={"X-Team": "payments"},
            ),
        )
        sms = npb.Channel(
            name="sms",
            sms=npb.SmsChannel(
                url="https://sms.example/send",
                headers={"Authorization": HEADER_VALUE},
                body_template="{status}",
                to=["+15550001"],
            ),
        )
        mail = npb.Channel(
            name="mail",
            smtp=npb.SmtpChannel(
                host="127.0.0.1", port=2525, from_address="t@example.com",
                to=["o@example.com"], username="trellis", password=SMTP_PASSWORD,
            ),
        )  # fmt: skip
        for c in (hook, sms, mail):
            await notifications.CreateChannel(npb.CreateChannelRequest(channel=c))
        await notifications.CreateNotificationRule(
            npb.CreateNotificationRuleRequest(
                channel="hook",
                workflow_name="charge-fail",
                statuses=[common_pb2.EXECUTION_STATUS_FAILED],
            )
        )

        # A real worker runs both workflows.
        worker = spawn_worker(WORKER, address, tmp_path, "worker", RECORD_FILE=str(record))
        async with Client(address) as client:
            good = await client.start_execution("charge-ok", {"amount": 5})
            failed = await client.start_execution("charge-fail", {"amount": 6})
            assert (await client.wait_for_execution(good.id, timeout=60)).status == ("SUCCEEDED")
            assert (await client.wait_for_execution(failed.id, timeout=60)).status == ("FAILED")
        # The worker received the value, once per workflow.
        assert recorded(record) == [STRIPE, STRIPE]

        # Nothing returned carries a secret, but the references are there.
        replies: list[str] = []
        for name in ("charge-ok", "charge-fail"):
            got = await workflows.GetWorkflow(fpb.GetWorkflowRequest(name=name))
            assert REFERENCE in str(got)
            replies.append(str(got))
        for execution_id in (good.id, failed.id):
            replies.append(
                str(
                    await workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
                )
            )
            events = workflows.WatchExecution(fpb.WatchExecutionRequest(execution_id=execution_id))
            replies.extend([str(e) async for e in events])
        fail_view = await workflows.GetExecution(fpb.GetExecutionRequest(execution_id=failed.id))
        assert "card declined for api key " + REFERENCE in str(fail_view)
        good_view = await workflows.GetExecution(fpb.GetExecutionRequest(execution_id=good.id))
        assert json.loads(good_view.execution.output) == {"charged": True, "echo": REFERENCE}
        letters = await workflows.ListDeadLetters(fpb.ListDeadLettersRequest())
        assert len(letters.dead_letters) == 1
        replies.append(str(letters))

        async def notified() -> bool:
            return bool(receiver.bodies)

        await wait_for(notified, timeout=30)
        body = receiver.bodies[0]
        assert REFERENCE.encode() in body  # the error, redacted
        replies.append(body.decode())
        deliveries = await notifications.ListDeliveries(npb.ListDeliveriesRequest())
        replies.append(str(deliveries))

        channels = await notifications.ListChannels(npb.ListChannelsRequest())
        by_name = {c.name: c for c in channels.channels}
        assert by_name["hook"].webhook.secret == "<set>"
        assert dict(by_name["hook"].webhook.headers) == {"X-Team": "<set>"}
        assert dict(by_name["sms"].sms.headers) == {"Authorization": "<set>"}
        assert by_name["mail"].smtp.password == "<set>"
        replies.append(str(channels))
        replies.append(str(await notifications.GetChannel(npb.GetChannelRequest(channel="sms"))))
        replies.append(str(await triggers.ListWebhookTriggers(tpb.ListWebhookTriggersRequest())))
        replies.append(await cli_ok(address, "notifications", "channel", "list"))
        for i, reply in enumerate(replies):
            assert_clean(f"reply {i}", reply)

        # The raw database holds none of the values.
        dump = database_bytes(db_url)
        assert b"stripe_key" in dump  # the dump is readable: the reference is in it
        assert_clean("the database", dump)
        assert b"enc1:k1:" in dump

        # Rotate to k2 (k1 still configured to read), then drop k1.
        coordinator.stop()
        coordinator, _ = spawn_coordinator(
            db_url, tmp_path, port=port, encryption_keys=f"{k2},{k1}", **settings
        )
        rotated = json.loads(await cli_ok(address, "secrets", "rotate-key", "--output", "json"))
        assert rotated["key_id"] == "k2"
        assert {k: int(v) for k, v in rotated["reencrypted"].items()} == {
            "secrets": 1,
            "webhook_triggers": 1,
            "notification_channels": 3,
        }
        coordinator.stop()
        after = database_bytes(db_url)
        assert b"enc1:k2:" in after and b"enc1:k1:" not in after
        assert_clean("the database after rotation", after)

        coordinator, _ = spawn_coordinator(
            db_url, tmp_path, port=port, encryption_keys=k2, **settings
        )
        async with Client(address) as client:
            again = await client.start_execution("charge-ok", {"amount": 7})
            assert (await client.wait_for_execution(again.id, timeout=60)).status == "SUCCEEDED"
        assert recorded(record)[-1] == STRIPE  # still decrypts with k2 alone
        body = b'{"amount": 8}'
        fired = await triggers.FireWebhook(
            tpb.FireWebhookRequest(
                path="pay/hook",
                headers={"X-Trellis-Signature": sign(HMAC_SECRET, body, int(time.time()))},
                body=body,
            )
        )
        assert fired.execution_id  # the HMAC key decrypts with k2 alone
        names = await secrets.ListSecrets(spb.ListSecretsRequest())
        assert [s.name for s in names.secrets] == ["stripe_key"]
    finally:
        await channel.close()
        receiver.stop()
        if worker is not None:
            worker.stop()
        coordinator.stop()

    logs = coordinator_logs(tmp_path)
    assert "coordinator listening" in logs  # the logs are there to search
    assert_clean("the coordinator's log", logs)


async def test_only_allowed_callers_manage_secrets_and_bad_input_is_refused(
    db_url: str, tmp_path: Path
) -> None:
    coordinator, address = spawn_coordinator(db_url, tmp_path, encryption_keys=new_key("k1"))
    channel = channel_to(address)
    secrets = sgrpc.SecretServiceStub(channel)
    try:
        async with watched(coordinator, grpc_health(address)):
            for request, fragment in (
                (spb.SetSecretRequest(name="bad name", value="v"), "not a valid secret name"),
                (spb.SetSecretRequest(name="x" * 64, value="v"), "not a valid secret name"),
                (spb.SetSecretRequest(name="big", value="v" * (64 * 1024 + 1)), "at most 65536"),
                (spb.SetSecretRequest(name="empty", value=""), "at least 8"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await secrets.SetSecret(request)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert fragment in (refused.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await secrets.DeleteSecret(spb.DeleteSecretRequest(name="nope"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert (await secrets.ListSecrets(spb.ListSecretsRequest())).secrets == []

            # A viewer may not list names, a developer may list but not set.
            for role, allowed in (("viewer", ()), ("developer", ("list",))):
                created = json.loads(
                    await cli_ok(address, "keys", "create", "--role", role, "--output", "json")
                )
                limited = channel_to(address, created["key"])
                stub = sgrpc.SecretServiceStub(limited)
                try:
                    calls = {
                        "list": stub.ListSecrets(spb.ListSecretsRequest()),
                        "set": stub.SetSecret(spb.SetSecretRequest(name="a", value="b")),
                        "rotate": stub.RotateKey(spb.RotateKeyRequest()),
                    }
                    for what, call in calls.items():
                        if what in allowed:
                            await call
                            continue
                        with pytest.raises(grpc.aio.AioRpcError) as denied:
                            await call
                        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, what
                finally:
                    await limited.close()
    finally:
        await channel.close()
        coordinator.stop()
