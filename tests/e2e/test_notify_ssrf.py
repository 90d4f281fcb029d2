"""No SSRF through notifications, through a real coordinator process: webhook, SMS and SMTP
channels reach only public addresses unless TRELLIS_NOTIFY_ALLOW_HOSTS /
TRELLIS_NOTIFY_ALLOW_NETWORKS allow more, and what an endpoint answers is never shown back
beyond its status.

- forbidden IP literals (127.0.0.1, [::1], 169.254.169.254, 10.x, ...) are refused when the
  channel is created (INVALID_ARGUMENT naming the field), over gRPC and the CLI;
- a host name resolving to loopback (``localhost``) is refused when it is resolved: the
  delivery fails at once with the reason, and the local receiver gets nothing;
- a channel made while loopback was allowed is refused by a coordinator that no longer
  allows it (the check is at every connect, not only at creation);
- a redirect from an allowed receiver to a forbidden address is not followed;
- a failing receiver's body, reason phrase or malformed status line never appear in
  ListDeliveries, in ``trellis notifications deliveries`` or in the coordinator's log.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.cli import trellis_cli
from tests.support.grpc_api import channel_to, definition, expect_status
from tests.support.hostile import grpc_health, watched
from tests.support.procs import Proc, spawn_coordinator
from tests.support.wait import wait_for
from trellis.v1 import notification_service_pb2 as npb
from trellis.v1 import notification_service_pb2_grpc as ngrpc
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import worker_service_pb2_grpc as wgrpc
from trellis.v1 import workflow_service_pb2 as fpb
from trellis.v1 import workflow_service_pb2_grpc as fgrpc

pytestmark = pytest.mark.e2e

# What a receiver puts in its reply: none of it may come back.
LEAK = "internal-secret-7f3a9c"
FAST = {
    "notify_poll_interval": "100ms",
    "notify_backoff_initial": "100ms",
    "notify_backoff_max": "200ms",
    "notify_backoff_jitter": "0",
    "notify_max_attempts": "3",
    "notify_send_timeout": "2s",
}


class Receiver:
    """An HTTP endpoint on ``host``: records each request, answers with ``reply``."""

    def __init__(
        self, reply: Callable[[BaseHTTPRequestHandler], None], host: str = "127.0.0.1"
    ) -> None:
        self.requests: list[str] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                requests.append(self.path)
                reply(self)

            do_POST = do_GET = do_PUT = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server_class = ThreadingHTTPServer
        if ":" in host:

            class V6(ThreadingHTTPServer):
                address_family = socket.AF_INET6

            server_class = V6
        self.server = server_class((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def ok(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(204)
    handler.end_headers()


def leaky_error(handler: BaseHTTPRequestHandler) -> None:
    body = f"database password is {LEAK}".encode()
    handler.send_response(500, f"Failed {LEAK}")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def broken_http(handler: BaseHTTPRequestHandler) -> None:
    handler.wfile.write(f"SSH-2.0-{LEAK}\r\n\r\n".encode())
    handler.close_connection = True


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.stop()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class Api:
    def __init__(self, address: str) -> None:
        self.channel = channel_to(address)
        self.notes = ngrpc.NotificationServiceStub(self.channel)
        self.workflows = fgrpc.WorkflowServiceStub(self.channel)
        self.workers = wgrpc.WorkerServiceStub(self.channel)

    async def webhook(self, name: str, url: str) -> npb.Channel:
        reply = await self.notes.CreateChannel(
            npb.CreateChannelRequest(
                channel=npb.Channel(name=name, webhook=npb.WebhookChannel(url=url, secret="s"))
            ),
            timeout=10,
        )
        return reply.channel

    async def fail_one(self, workflow: str, channels: list[str]) -> str:
        """Register ``workflow`` with a rule per channel, run it and fail its task."""
        await self.workflows.RegisterWorkflow(
            fpb.RegisterWorkflowRequest(definition=definition(workflow, ["a"], [])), timeout=10
        )
        for name in channels:
            await self.notes.CreateNotificationRule(
                npb.CreateNotificationRuleRequest(channel=name, workflow_name=workflow),
                timeout=10,
            )
        started = await self.workflows.StartExecution(
            fpb.StartExecutionRequest(workflow_name=workflow, input=b"{}"), timeout=10
        )
        polled = await self.workers.PollTasks(
            wpb.PollTasksRequest(worker_id="w1", task_types=["t"], max_tasks=1), timeout=10
        )
        (task,) = polled.tasks
        await self.workers.FailTask(
            wpb.FailTaskRequest(
                lease_token=task.lease_token,
                error=wpb.TaskError(type="Boom", message="boom", non_retryable=True),
            ),
            timeout=10,
        )
        return str(started.execution.id)

    async def deliveries(self, execution_id: str) -> list[npb.Delivery]:
        reply = await self.notes.ListDeliveries(
            npb.ListDeliveriesRequest(execution_id=execution_id), timeout=10
        )
        return list(reply.deliveries)

    async def settled(self, execution_id: str, count: int) -> list[npb.Delivery]:
        """The execution's ``count`` deliveries once none is pending any more."""

        async def done() -> list[npb.Delivery] | None:
            found = await self.deliveries(execution_id)
            pending = npb.DELIVERY_STATUS_PENDING
            return (
                found if len(found) == count and all(d.status != pending for d in found) else None
            )

        return await wait_for(done, timeout=30)


def coordinator(db_url: str, tmp_path: Path, **settings: str) -> tuple[Proc, str]:
    return spawn_coordinator(db_url, tmp_path, **{**FAST, **settings})


async def test_forbidden_ip_literals_are_refused_when_the_channel_is_created(
    db_url: str, tmp_path: Path
) -> None:
    proc, address = coordinator(db_url, tmp_path)
    api = Api(address)
    try:
        async with watched(proc, grpc_health(address)):
            for i, url in enumerate(
                [
                    "http://127.0.0.1:8080/hook",
                    "http://[::1]:8080/hook",
                    "http://169.254.169.254/latest/meta-data/iam/",
                    "http://10.0.0.1/internal",
                    "http://[::ffff:127.0.0.1]/hook",
                    "https://[fd00:ec2::254]/",
                    "http://0.0.0.0:7400/",
                ]
            ):
                await expect_status(
                    api.webhook(f"bad-{i}", url),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "webhook.url: ",
                    "TRELLIS_NOTIFY_ALLOW_NETWORKS",
                )
            sms = npb.Channel(
                name="sms",
                sms=npb.SmsChannel(url="http://192.168.1.1/send", body_template="x", to=["+1"]),
            )
            smtp = npb.Channel(
                name="mail",
                smtp=npb.SmtpChannel(
                    host="127.0.0.1", port=25, from_address="a@b.example", to=["c@d.example"]
                ),
            )
            for channel, field in ((sms, "sms.url: "), (smtp, "smtp.host: ")):
                await expect_status(
                    api.notes.CreateChannel(npb.CreateChannelRequest(channel=channel)),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    field,
                )
            cli = await trellis_cli(
                address, "notifications", "channel", "create", "webhook", "meta",
                "--url", "http://169.254.169.254/", "--secret", "s",
            )  # fmt: skip
            assert cli.returncode == 1 and "INVALID_ARGUMENT" in cli.stderr, cli.stderr
            assert "169.254.169.254 is a cloud metadata address" in cli.stderr
        listed = await api.notes.ListChannels(npb.ListChannelsRequest(), timeout=10)
        assert list(listed.channels) == []  # nothing was written
    finally:
        await api.channel.close()
        proc.stop()


async def test_names_resolving_to_loopback_are_refused_when_sending(
    db_url: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    receivers.append(Receiver(ok))  # listening on 127.0.0.1, where localhost points
    port = receivers[0].port
    proc, address = coordinator(db_url, tmp_path)
    api = Api(address)
    try:
        async with watched(proc, grpc_health(address)):
            await api.webhook("hook", f"http://localhost:{port}/hook")
            await api.notes.CreateChannel(
                npb.CreateChannelRequest(
                    channel=npb.Channel(
                        name="sms",
                        sms=npb.SmsChannel(
                            url=f"http://localhost:{port}/sms/{{to}}", body_template="x", to=["+1"]
                        ),
                    )
                ),
                timeout=10,
            )
            await api.notes.CreateChannel(
                npb.CreateChannelRequest(
                    channel=npb.Channel(
                        name="mail",
                        smtp=npb.SmtpChannel(
                            host="localhost", port=port, from_address="a@b.example",
                            to=["c@d.example"],
                        ),
                    )
                ),
                timeout=10,
            )  # fmt: skip
            execution_id = await api.fail_one("checkout", ["hook", "sms", "mail"])
            found = await api.settled(execution_id, 3)
        for d in found:
            # Failed at once: a refused destination is not retried.
            assert d.status == npb.DELIVERY_STATUS_FAILED and len(d.attempts) == 1, d
            assert d.last_error == "destination refused: localhost resolves to a loopback address"
        assert receivers[0].requests == []  # nothing reached the local receiver
    finally:
        await api.channel.close()
        proc.stop()


async def test_the_allow_setting_opens_loopback_and_its_removal_closes_it(
    db_url: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    receivers.append(Receiver(ok))
    url = f"http://127.0.0.1:{receivers[0].port}/hook"
    allowed, address = coordinator(db_url, tmp_path, notify_allow_networks="127.0.0.1/32")
    api = Api(address)
    try:
        await api.webhook("hook", url)
        first = await api.fail_one("checkout", ["hook"])
        (d,) = await api.settled(first, 1)
        assert d.status == npb.DELIVERY_STATUS_DELIVERED, d
        assert receivers[0].requests == ["/hook"]
    finally:
        await api.channel.close()
        allowed.stop()
    # The same database, a coordinator without the setting: the stored channel is refused
    # when it connects.
    closed, address = coordinator(db_url, tmp_path)
    api = Api(address)
    try:
        async with watched(closed, grpc_health(address)):
            second = await api.fail_one("checkout", [])
            (d,) = await api.settled(second, 1)
        assert d.status == npb.DELIVERY_STATUS_FAILED and len(d.attempts) == 1
        assert d.last_error == "destination refused: 127.0.0.1 is a loopback address"
        assert receivers[0].requests == ["/hook"]  # only the first delivery
    finally:
        await api.channel.close()
        closed.stop()


async def test_redirects_to_forbidden_addresses_are_not_followed(
    db_url: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    # The target: the metadata address, and a real listener on a loopback address the
    # setting does not cover ([::1] or 127.0.0.2).
    target_host = "::1" if ipv6_loopback() else "127.0.0.2"
    target = Receiver(ok, host=target_host)
    receivers.append(target)
    shown = f"[{target_host}]" if ":" in target_host else target_host
    locations = [f"http://{shown}:{target.port}/stolen", "http://169.254.169.254/latest/"]

    def redirect(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(307)
        handler.send_header("Location", locations[len(receiver.requests) % 2])
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    receiver = Receiver(redirect)
    receivers.append(receiver)
    proc, address = coordinator(db_url, tmp_path, notify_allow_networks="127.0.0.1/32")
    api = Api(address)
    try:
        async with watched(proc, grpc_health(address)):
            await api.webhook("hook", f"http://127.0.0.1:{receiver.port}/hook")
            execution_id = await api.fail_one("checkout", ["hook"])
            (d,) = await api.settled(execution_id, 1)
        assert d.status == npb.DELIVERY_STATUS_FAILED and len(d.attempts) == 3
        for attempt in d.attempts:
            assert attempt.error == (
                "HTTP 307 Temporary Redirect (redirects are not followed: give the channel "
                "the final URL)"
            )
        assert len(receiver.requests) == 3 and target.requests == []
    finally:
        await api.channel.close()
        proc.stop()


async def test_a_failing_receivers_reply_is_never_shown_back(
    db_url: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    receivers.extend([Receiver(leaky_error), Receiver(broken_http)])
    leaky, broken = receivers
    proc, address = coordinator(db_url, tmp_path, notify_allow_networks="127.0.0.1/32")
    api = Api(address)
    try:
        async with watched(proc, grpc_health(address)):
            await api.webhook("leaky", f"http://127.0.0.1:{leaky.port}/hook")
            await api.webhook("broken", f"http://127.0.0.1:{broken.port}/hook")
            execution_id = await api.fail_one("checkout", ["leaky", "broken"])
            found = await api.settled(execution_id, 2)
            cli_json = await trellis_cli(
                address, "notifications", "deliveries", "--execution", execution_id,
                "--output", "json",
            )  # fmt: skip
            cli_text = await trellis_cli(
                address, "notifications", "deliveries", "--execution", execution_id
            )
        assert leaky.requests and broken.requests  # both were contacted
        errors = {d.channel_id: {a.error for a in d.attempts} for d in found}
        by_name = {
            c.name: c.id
            for c in (await api.notes.ListChannels(npb.ListChannelsRequest(), timeout=10)).channels
        }
        assert errors[by_name["leaky"]] == {"HTTP 500 Internal Server Error"}
        assert errors[by_name["broken"]] == {
            "RemoteProtocolError: the endpoint broke the HTTP protocol"
        }
        assert cli_json.returncode == 0 and cli_text.returncode == 0, cli_json.stderr
        assert len(json.loads(cli_json.stdout)) == 2
        for shown in (str(found), cli_json.stdout, cli_text.stdout, cli_text.stderr):
            assert LEAK not in shown
        assert "HTTP 500 Internal Server Error" in cli_text.stdout
    finally:
        await api.channel.close()
        proc.stop()
    assert LEAK not in proc.output()  # nor in the coordinator's log
