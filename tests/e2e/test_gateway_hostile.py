"""Hostile input at the gateway and at webhook verification, against real gateway and
coordinator processes, each watched for responsiveness and memory growth throughout.

Every input a hostile-input review found is replayed: an unsigned deeply nested body, a
400-digit signature timestamp, millions of ``v1=`` values, a signed delivery replayed
inside its tolerance window (on SQLite and PostgreSQL, and across two replicas at once),
bodies that are not JSON anyone can take, and clients sending their request a byte at a
time (also behind a pipelined request), opening too many connections, or filling every
connection with a stalled body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import select
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.support.hostile import grpc_health, http_health, watched
from tests.support.http import until
from tests.support.procs import (
    ADMIN_KEY,
    ROOT,
    Proc,
    spawn_coordinator,
    spawn_gateway,
)
from tests.support.wait import wait_for_sync
from trellis.v1 import trigger_service_pb2 as tpb
from trellis.v1 import trigger_service_pb2_grpc as tgrpc
from worker_sdk import Client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SECRET = "hostile-webhook-secret-0123456789"
EVENTS_TOKEN = "hostile-events-token-0123456789"
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MAX_CONNECTIONS = 16
AUTH = (("authorization", f"Bearer {ADMIN_KEY}"),)


@dataclass
class Stack:
    coordinator: Proc
    address: str
    gateway: Proc
    base: str
    tmp_path: Path

    @property
    def healthz(self) -> str:
        return f"{self.base}/healthz"


def hardened_gateway(
    address: str,
    tmp_path: Path,
    name: str = "gateway",
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
) -> tuple[Proc, str]:
    """A gateway with short slow-client timeouts and a small connection limit, ready."""
    proc, base = spawn_gateway(
        address,
        tmp_path,
        name=name,
        events_token=EVENTS_TOKEN,
        header_timeout=f"{header_timeout}s",
        body_timeout=f"{body_timeout}s",
        max_connections=str(MAX_CONNECTIONS),
        rpc_timeout="5s",
    )
    until(f"{base}/readyz", 200, proc)
    return proc, base


async def create_trigger(address: str, path: str) -> None:
    """A webhook trigger without an idempotency expression: only the replay record stands
    between a replayed delivery and a second execution."""
    async with Client(address) as client:
        await client.register_workflow(ROOT / "examples/diamond.yaml")
    async with grpc.aio.insecure_channel(address) as channel:
        await tgrpc.TriggerServiceStub(channel).CreateWebhookTrigger(
            tpb.CreateWebhookTriggerRequest(path=path, workflow_name="diamond", hmac_secret=SECRET),
            metadata=AUTH,
        )


async def executions(address: str) -> int:
    async with Client(address) as client:
        return len(await client.list_executions(workflow_name="diamond"))


@contextlib.contextmanager
def stack(
    database_url: str,
    tmp_path: Path,
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
) -> Iterator[Stack]:
    coordinator, address = spawn_coordinator(database_url, tmp_path)
    gateway = None
    try:
        gateway, base = hardened_gateway(
            address, tmp_path, header_timeout=header_timeout, body_timeout=body_timeout
        )
        yield Stack(coordinator, address, gateway, base, tmp_path)
    finally:
        gateway_exit = gateway.stop() if gateway is not None else 0
        coordinator.stop()
    assert gateway_exit == 0, gateway.output() if gateway is not None else ""


@contextlib.asynccontextmanager
async def both_watched(s: Stack) -> AsyncIterator[None]:
    async with (
        watched(s.gateway, http_health(s.healthz)),
        watched(s.coordinator, grpc_health(s.address)),
    ):
        yield


def post(
    url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    """Status and JSON body; every answer of the gateway, errors too, must be JSON."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=15) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def apost(
    url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    return await asyncio.to_thread(post, url, body, headers)


def signed(body: bytes, at: int | None = None) -> dict[str, str]:
    t = int(time.time()) if at is None else at
    mac = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Trellis-Signature": f"t={t},v1={mac}"}


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_hostile_webhooks_get_clear_errors_and_a_replay_starts_nothing(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path}/trellis.db"
        if backend == "sqlite"
        else request.getfixturevalue("fresh_postgres_url")
    )
    with stack(url, tmp_path) as s:
        await create_trigger(s.address, "hooks/orders")
        hook = f"{s.base}/api/webhooks/hooks/orders"
        async with both_watched(s):
            # Unsigned and deeply nested: the signature is checked first, nothing parsed.
            status, reply = await apost(hook, DEEP, {"Content-Type": "application/json"})
            assert status == 401, reply
            assert "missing X-Trellis-Signature" in str(reply["error"])

            # A 400-digit timestamp: a clear refusal, not an overflow.
            header = f"t={'9' * 400},v1={'0' * 64}"
            status, reply = await apost(hook, b"{}", {"X-Trellis-Signature": header})
            assert status == 401, reply
            assert "up to 12 digits" in str(reply["error"])

            # Nine v1 values: over the bound of eight.
            many = f"t={int(time.time())}," + ",".join([f"v1={'0' * 64}"] * 9)
            status, reply = await apost(hook, b"{}", {"X-Trellis-Signature": many})
            assert status == 401, reply
            assert "more than 8 v1 values" in str(reply["error"])

            # 3,000,000 v1 values (12 MB of header): refused at the gateway's head limit.
            huge = "t=1," + "v1=," * 3_000_000
            status, reply = await asyncio.to_thread(raw_request, s.base, huge)
            assert status == 400, reply
            assert "larger than 16384 bytes" in str(reply["error"])

            # Signed, then not JSON the coordinator takes: 400 naming why, never 500.
            for body, fragment in (
                (DEEP, "deeper than 128 levels"),
                (b'{"amount": NaN}', "contains NaN, which is not JSON"),
                (b'{"amount": 1e999}', "too large for a double"),
                (b'{"id": ' + b"9" * 4000 + b"}", "4000 digits, more than 100"),
                (b"\xff\xfe", "not UTF-8 text"),
            ):
                status, reply = await apost(hook, body, signed(body))
                assert status == 400, (body[:20], reply)
                assert fragment in str(reply["error"]), reply

            # A signed delivery, then the very same request again inside the window.
            body = json.dumps({"order": 1}).encode()
            headers = signed(body)
            status, reply = await apost(hook, body, headers)
            assert status == 202, reply
            assert reply["created"] is True
            status, reply = await apost(hook, body, headers)
            assert status == 409, reply
            assert "replay" in str(reply["error"])
        assert await executions(s.address) == 1, "the replay started nothing"


async def test_millions_of_signatures_sent_to_the_coordinator_directly(tmp_path: Path) -> None:
    """Past the gateway (the gateway role may call FireWebhook itself): the header is
    refused by its length before it is split; 12 MB of it by the request limits already
    (a header value is at most 8192 characters), a shorter one by the verifier's 1024."""
    coordinator, address = spawn_coordinator(f"sqlite:///{tmp_path}/trellis.db", tmp_path)
    try:
        await create_trigger(address, "orders")
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
        async with (
            watched(coordinator, grpc_health(address)),
            grpc.aio.insecure_channel(address, options=options) as channel,
        ):
            refusals = []
            for signature in ("t=1," + "v1=," * 3_000_000, "t=1," + "v1=," * 500):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await tgrpc.TriggerServiceStub(channel).FireWebhook(
                        tpb.FireWebhookRequest(
                            path="orders", headers={"x-trellis-signature": signature}, body=b"{}"
                        ),
                        metadata=AUTH,
                        timeout=30,
                    )
                refusals.append((refused.value.code(), refused.value.details() or ""))
        (huge_code, huge_details), (long_code, long_details) = refusals
        assert huge_code == grpc.StatusCode.INVALID_ARGUMENT, huge_details
        assert "headers['x-trellis-signature']: 12000004 characters, at most 8192" in huge_details
        assert long_code == grpc.StatusCode.UNAUTHENTICATED, long_details
        assert "over the limit of 1024" in long_details
        assert await executions(address) == 0
    finally:
        coordinator.stop()


def raw_request(base: str, signature: str) -> tuple[int, dict[str, object]]:
    """POST with an X-Trellis-Signature too large for urllib's own checks, over a socket."""
    host, port = base.removeprefix("http://").split(":")
    head = (
        f"POST /api/webhooks/hooks/orders HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Length: 2\r\nX-Trellis-Signature: {signature}\r\n\r\n{{}}"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        with contextlib.suppress(OSError):  # the gateway may close before reading it all
            sock.sendall(head)
        return parse_response(read_all(sock))


def read_all(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def parse_response(data: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


async def test_event_and_approval_bodies_are_parsed_strictly(tmp_path: Path) -> None:
    """Event bodies reach the coordinator's strict decoder (after the events token); an
    approval's body is read by the gateway itself, for its comment only."""
    with stack(f"sqlite:///{tmp_path}/trellis.db", tmp_path) as s:
        event = f"{s.base}/api/events/orders.created"
        approve = f"{s.base}/api/executions/e-1/nodes/n-1/approve"
        async with both_watched(s):
            for body, fragment in (
                (DEEP, "deeper than 128 levels"),
                (b'{"a": Infinity}', "contains Infinity, which is not JSON"),
                (b'{"a": -1e400}', "too large for a double"),
                (b'{"a": ' + b"1" * 5000 + b"}", "5000 digits, more than 100"),
            ):
                status, reply = await apost(
                    event, body, {"Authorization": f"Bearer {EVENTS_TOKEN}"}
                )
                assert status == 400, reply
                assert fragment in str(reply["error"]), reply
            for body in (DEEP, b"{", b'{"a": ' + b"1" * 5000 + b"}", b'"text"'):
                status, reply = await apost(approve, body, {"Authorization": f"Bearer {ADMIN_KEY}"})
                assert status == 400, reply
                assert "a JSON object like" in str(reply["error"]), reply


def slow_send(base: str, data: bytes, pause: float) -> tuple[bytes, int]:
    """Send ``data`` a byte every ``pause`` seconds until the gateway closes the
    connection; returns what it answered and how many bytes had been sent."""
    host, port = base.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.settimeout(pause)
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sent += 1
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue  # not answered yet: the next byte (the attack's pace)
            except ConnectionResetError:
                return b"", sent
            sock.settimeout(15)
            return answer + read_all(sock), sent
    return b"", sent


async def test_slow_heads_and_bodies_are_cut_off_while_healthz_answers(tmp_path: Path) -> None:
    with stack(f"sqlite:///{tmp_path}/trellis.db", tmp_path) as s:
        # 200 bytes at 0.05 s each would take 10 s: the gateway must answer long before.
        head = (
            "POST /api/events/orders HTTP/1.1\r\nHost: x\r\n"
            f"X-Padding: {'p' * 150}\r\nContent-Length: 2\r\n\r\n"
        ).encode()
        body_first = (
            f"POST /api/events/orders HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {EVENTS_TOKEN}\r\nContent-Length: 400\r\n\r\n"
        ).encode()
        async with watched(s.gateway, http_health(s.healthz)):
            answer, sent = await asyncio.to_thread(slow_send, s.base, head, 0.05)
            assert sent < len(head), "the whole slow head was taken"
            status, reply = parse_response(answer)
            assert status == 408, reply
            assert "TRELLIS_GATEWAY_HEADER_TIMEOUT" in str(reply["error"])

            # The head at once, then the body a byte at a time.
            answer, sent = await asyncio.to_thread(slow_body, s.base, body_first, 400)
            assert sent < 400, "the whole slow body was taken"
            status, reply = parse_response(answer)
            assert status == 408, reply
            assert "TRELLIS_GATEWAY_BODY_TIMEOUT" in str(reply["error"])


def slow_body(base: str, head: bytes, length: int) -> tuple[bytes, int]:
    """Send ``head`` at once, then ``length`` body bytes, one every 0.05 s."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(head)
        sock.settimeout(0.05)
        for sent in range(length):
            try:
                sock.sendall(b"x")
            except OSError:
                return b"", sent
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            sock.settimeout(15)
            return answer + read_all(sock), sent + 1
    return b"", length


async def test_a_connection_flood_does_not_starve_healthz(tmp_path: Path) -> None:
    # A head timeout longer than the test: only eviction closes the flood's connections.
    with stack(f"sqlite:///{tmp_path}/trellis.db", tmp_path, header_timeout=60) as s:
        host, port = s.base.removeprefix("http://").split(":")
        flood: list[socket.socket] = []
        try:
            async with watched(s.gateway, http_health(s.healthz)):
                for _ in range(MAX_CONNECTIONS * 4):
                    sock = socket.create_connection((host, int(port)), timeout=15)
                    sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # a head never finished
                    flood.append(sock)
                    await asyncio.sleep(0.01)  # the attack's pace, not synchronisation

            # Each connection past the limit evicted the oldest idle one (and so did each
            # health probe): all but at most MAX_CONNECTIONS of the flood were answered.
            def answered() -> list[socket.socket] | None:
                readable, _, _ = select.select(flood, [], [], 0)
                return readable if len(readable) >= len(flood) - MAX_CONNECTIONS else None

            evicted = await asyncio.to_thread(wait_for_sync, answered, timeout=30)
            assert flood[0] in evicted, "the oldest idle connection goes first"
            for sock in evicted:
                answer = read_all(sock)
                assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
                assert b"to make room" in answer, answer
        finally:
            for sock in flood:
                sock.close()


def pipelined_slow_body(base: str, length: int, pause: float) -> tuple[bytes, int, bool]:
    """A GET and a POST pipelined in one write, then the POST's ``length`` body bytes one
    every ``pause`` seconds until the gateway closes the connection; returns everything it
    answered, how many body bytes were sent, and whether it closed the connection."""
    host, port = base.removeprefix("http://").split(":")
    answers = b""
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            + f"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        for sent in range(length):
            try:
                sock.sendall(b"x")
                readable, _, _ = select.select([sock], [], [], pause)  # the attack's pace
                chunk = sock.recv(65536) if readable else None
            except OSError:  # reset by the gateway
                return answers, sent + 1, True
            if chunk == b"":
                return answers, sent + 1, True
            answers += chunk or b""
    return answers, length, False


async def test_a_pipelined_request_sending_its_body_slowly_is_cut_off(tmp_path: Path) -> None:
    """The second request of a pipelined pair is picked up after the first is answered, not
    when its bytes arrive: its body is held to the same deadline."""
    with stack(f"sqlite:///{tmp_path}/trellis.db", tmp_path) as s:
        async with watched(s.gateway, http_health(s.healthz)):
            # 1000 bytes at 0.05 s each would take 50 s: the gateway must close long before.
            answers, sent, closed = await asyncio.to_thread(pipelined_slow_body, s.base, 1000, 0.05)
        assert closed, answers
        assert sent < 1000, "the whole slow body was taken"
        # Both requests were answered (the POST before its body, as /healthz takes none).
        assert answers.startswith(b"HTTP/1.1 200 "), answers[:200]
        assert answers.count(b"HTTP/1.1 ") == 2, answers


async def test_slow_bodies_are_evicted_slowest_first_and_healthz_answers(tmp_path: Path) -> None:
    # Timeouts longer than the test: only eviction closes the slow bodies.
    with stack(
        f"sqlite:///{tmp_path}/trellis.db", tmp_path, header_timeout=60, body_timeout=60
    ) as s:
        host, port = s.base.removeprefix("http://").split(":")
        head = (
            f"POST /api/events/orders HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {EVENTS_TOKEN}\r\nContent-Length: 1000\r\n\r\n"
        ).encode()
        steady: list[socket.socket] = []
        slow: list[socket.socket] = []
        try:
            async with watched(s.gateway, http_health(s.healthz)):
                # Four bodies well under way, then a flood of bodies stalled after a byte.
                for _ in range(4):
                    sock = socket.create_connection((host, int(port)), timeout=15)
                    sock.sendall(head + b"x" * 900)
                    steady.append(sock)
                for _ in range(MAX_CONNECTIONS * 2):
                    sock = socket.create_connection((host, int(port)), timeout=15)
                    sock.sendall(head + b"x")
                    slow.append(sock)
                    await asyncio.sleep(0.01)  # the attack's pace, not synchronisation

            # Each connection past the limit (health probes too) evicted the slowest body:
            # all but at most the room the steady bodies leave of the flood were answered.
            room = MAX_CONNECTIONS - len(steady)

            def answered() -> list[socket.socket] | None:
                readable, _, _ = select.select(slow, [], [], 0)
                return readable if len(readable) >= len(slow) - room else None

            evicted = await asyncio.to_thread(wait_for_sync, answered, timeout=30)
            for sock in evicted:
                answer = read_all(sock)
                assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
                assert b"the slowest sending its request body" in answer, answer
            readable, _, _ = select.select(steady, [], [], 0)
            assert not readable, "a body well under way was evicted before the stalled ones"
        finally:
            for sock in steady + slow:
                sock.close()


@pytest.mark.postgres
async def test_a_replay_to_two_replicas_at_once_starts_one_execution(
    fresh_postgres_url: str, tmp_path: Path
) -> None:
    a, address_a = spawn_coordinator(fresh_postgres_url, tmp_path)
    b, address_b = spawn_coordinator(fresh_postgres_url, tmp_path)
    gateways: list[Proc] = []
    try:
        gateway_a, base_a = hardened_gateway(address_a, tmp_path, "gateway-a")
        gateways.append(gateway_a)
        gateway_b, base_b = hardened_gateway(address_b, tmp_path, "gateway-b")
        gateways.append(gateway_b)
        await create_trigger(address_a, "orders")
        for n in range(5):
            body = json.dumps({"order": n}).encode()
            headers = signed(body)
            replies = await asyncio.gather(
                *(
                    apost(f"{base}/api/webhooks/orders", body, headers)
                    for base in (base_a, base_b, base_a, base_b)
                )
            )
            statuses = sorted(status for status, _ in replies)
            assert statuses == [202, 409, 409, 409], replies
        assert await executions(address_b) == 5
    finally:
        for gateway in gateways:
            gateway.stop()
        a.stop()
        b.stop()
