"""Notifications through real processes: a coordinator, an SDK worker whose handler fails,
a local SMTP server (aiosmtpd) and a local webhook receiver that is down for a while."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from coordinator.notify import SIGNATURE_HEADER, verify
from tests.support.cli import trellis_cli
from tests.support.faults import FAULT_WORKER
from tests.support.grpc_api import channel_to
from tests.support.procs import free_port, spawn_coordinator, spawn_worker
from tests.support.wait import wait_for
from trellis.v1 import notification_service_pb2 as npb
from trellis.v1 import notification_service_pb2_grpc as ngrpc
from worker_sdk import Client, Workflow

pytestmark = pytest.mark.e2e

SECRET = "whsec-e2e"


@dataclass
class Mailbox:
    messages: list[bytes] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(bytes(envelope.original_content or envelope.content))
        return "250 OK"


@pytest.fixture
def smtp_server() -> Iterator[tuple[Mailbox, int]]:
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A webhook endpoint on a fixed port, started only when the test says so (until then
    connections to the port are refused)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: list[Received] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                requests.append(Received(self.path, dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)


async def deliveries(stub: ngrpc.NotificationServiceStub, **filters: str) -> list[npb.Delivery]:
    reply = await stub.ListDeliveries(
        npb.ListDeliveriesRequest(**filters), timeout=10, wait_for_ready=True
    )
    return list(reply.deliveries)


async def test_a_failing_workflow_notifies_by_mail_and_by_webhook_after_it_recovers(
    db_url: str, tmp_path: Path, smtp_server: tuple[Mailbox, int]
) -> None:
    mailbox, smtp_port = smtp_server
    receiver = Receiver(free_port())  # not listening yet: the webhook is down
    settings = {
        "notify_poll_interval": "100ms",
        "notify_backoff_initial": "200ms",
        "notify_backoff_max": "500ms",
        "notify_backoff_jitter": "0",
        "notify_max_attempts": "1000",
        "notify_breaker_threshold": "1000",
        # A claim held by a killed coordinator comes back after 3 x 1 s + 5 s.
        "notify_send_timeout": "1s",
        # The receivers are local: loopback has to be allowed (it is refused by default,
        # tests/e2e/test_notify_ssrf.py).
        "notify_allow_networks": "127.0.0.1/32",
    }
    port = free_port()
    coordinator, address = spawn_coordinator(db_url, tmp_path, port=port, **settings)
    worker = spawn_worker(
        FAULT_WORKER,
        address,
        tmp_path,
        "worker",
        FAULT_TASKS="boom",
        RECORD_FILE=str(tmp_path / "calls.txt"),
    )
    channel = channel_to(address)
    stub = ngrpc.NotificationServiceStub(channel)
    try:
        async with Client(address) as client:
            wf = Workflow("checkout")
            wf.node("charge", "boom")
            await client.register_workflow(wf)

            hook_url = f"http://127.0.0.1:{receiver.port}/hooks/trellis"
            for args in (
                ("channel", "create", "webhook", "hook", "--url", hook_url, "--secret", SECRET),
                (
                    "channel", "create", "smtp", "mail", "--host", "127.0.0.1",
                    "--port", str(smtp_port), "--from", "trellis@example.com",
                    "--to", "oncall@example.com", "--to", "lead@example.com",
                    "--subject", "{workflow_name} {status}: {execution_id}",
                ),
                ("rule", "create", "--channel", "hook", "--workflow", "checkout", "--on", "FAILED"),
                ("rule", "create", "--channel", "mail", "--workflow", "checkout", "--on", "FAILED"),
            ):  # fmt: skip
                cli = await trellis_cli(address, "notifications", *args)
                assert cli.returncode == 0, cli.stderr
            bad = await trellis_cli(
                address, "notifications", "channel", "create", "webhook", "x",
                "--url", "not-a-url", "--secret", "s",
            )  # fmt: skip
            assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
            assert "webhook.url" in bad.stderr

            started = await client.start_execution("checkout", {"cart": 42})
            execution = await client.wait_for_execution(started.id, timeout=60)
            assert execution.status == "FAILED"

            # The e-mail arrives (the SMTP server is up from the start).
            await wait_for(lambda: len(mailbox.messages) >= 1, timeout=30)
            mail = message_from_bytes(mailbox.messages[0])
            assert mail["Subject"] == f"checkout FAILED: {execution.id}"
            assert "oncall@example.com" in mail["To"] and "lead@example.com" in mail["To"]
            assert "boom on attempt 1" in mail.get_payload()

            # The webhook keeps failing while nothing listens, each attempt recorded.
            async def failing() -> bool:
                found = await deliveries(stub, channel="hook")
                return bool(found) and len(found[0].attempts) >= 2

            await wait_for(failing, timeout=30)
            (down,) = await deliveries(stub, channel="hook")
            assert down.status == npb.DELIVERY_STATUS_PENDING
            assert not any(a.ok for a in down.attempts) and down.last_error

            # The outbox is rows: a coordinator killed now and restarted carries on.
            assert coordinator.stop(signal.SIGKILL) == -signal.SIGKILL
            coordinator, _ = spawn_coordinator(db_url, tmp_path, port=port, **settings)
            receiver.start()  # the endpoint comes back

            async def delivered() -> npb.Delivery | None:
                (d,) = await deliveries(stub, channel="hook")
                return d if d.status == npb.DELIVERY_STATUS_DELIVERED else None

            hook = await wait_for(delivered, timeout=45)
            assert len(hook.attempts) > 1
            assert [a.ok for a in hook.attempts].count(True) == 1 and hook.attempts[-1].ok
            assert hook.execution_id == execution.id

            assert receiver.requests, "the receiver got nothing"
            got = receiver.requests[0]
            assert got.path == "/hooks/trellis"
            assert got.headers["X-Trellis-Delivery"] == hook.id
            assert verify(SECRET, got.body, got.headers[SIGNATURE_HEADER], now=int(time.time()))
            assert not verify(
                "wrong", got.body, got.headers[SIGNATURE_HEADER], now=int(time.time())
            )
            doc = json.loads(got.body)
            assert doc["delivery_id"] == hook.id and doc["execution_id"] == execution.id
            assert doc["status"] == "FAILED" and doc["workflow_name"] == "checkout"
            assert doc["error"]["node_id"] == "charge"
            assert "boom on attempt 1" in doc["error"]["message"]

            # Both deliveries, through the CLI.
            cli = await trellis_cli(
                address, "notifications", "deliveries", "--execution", execution.id,
                "--output", "json",
            )  # fmt: skip
            assert cli.returncode == 0, cli.stderr
            shown = {d["channel_id"]: d for d in json.loads(cli.stdout)}
            assert len(shown) == 2
            assert {d["status"] for d in shown.values()} == {"DELIVERED"}
            assert shown[hook.channel_id]["notification"]["execution_id"] == execution.id
    finally:
        await channel.close()
        receiver.stop()
        worker.stop()
        coordinator.stop()
