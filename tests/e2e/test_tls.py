"""TLS and mutual TLS with real processes: certificates made by the test (tests/support/certs),
a coordinator serving them, the Python SDK, the CLI and the Node worker connecting with
TRELLIS_CA_FILE and client certificates.

- TLS: a workflow runs with a Python worker over TLS, the CLI lists it, a plaintext client
  or one that does not trust the CA cannot connect.
- Mutual TLS: the workers present only a client certificate (no API key) and act as the
  certificate identity an admin registered for its common name; a client without a
  certificate, or with one from another CA, cannot connect.
- A renewed server certificate is served to new connections without a restart.
- `coordinator serve` with neither TLS files nor TRELLIS_PLAINTEXT refuses to start.

The store does not matter here: every coordinator runs on SQLite.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.certs import CertificateAuthority, PemFiles
from tests.support.faults import history
from tests.support.node import node_with_dependencies, spawn_node_worker
from tests.support.procs import ADMIN_KEY, ROOT, Proc, base_env, free_port, spawn_coordinator
from tests.support.procs import spawn_worker as spawn_python_worker
from tests.support.wait import wait_for
from trellis.v1 import identity_service_pb2 as ipb
from trellis.v1 import identity_service_pb2_grpc
from worker_sdk import Client, TlsSettings
from worker_sdk._channel import open_channel
from worker_sdk._settings import ConnectionSettings

pytestmark = pytest.mark.e2e

PYTHON_PART = ROOT / "tests/e2e/diamond_part_worker.py"
DIAMOND = ROOT / "examples/diamond.yaml"
# Which worker serves each task type of the diamond when a Python and a Node worker share it.
SERVED_BY = {
    "prepare": "python-worker",
    "square": "python-worker",
    "double": "node-worker",
    "combine": "node-worker",
}


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'trellis.db'}"


def tls_env(
    ca: Path, client: PemFiles | None = None, *, api_key: str = ADMIN_KEY
) -> dict[str, str]:
    """The TRELLIS_* variables of a process connecting over TLS (with a client certificate:
    mutual TLS); ``api_key=""`` sends no key."""
    env = {"TRELLIS_CA_FILE": str(ca), "TRELLIS_API_KEY": api_key}
    if client is not None:
        env["TRELLIS_CLIENT_CERT_FILE"] = str(client.cert)
        env["TRELLIS_CLIENT_KEY_FILE"] = str(client.key)
    return env


def channel_credentials(ca: Path | None, client: PemFiles | None = None) -> grpc.ChannelCredentials:
    """TLS trusting ``ca`` (None: the system's CAs), with ``client``'s certificate if any."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


def tls_settings(
    ca: Path, client: PemFiles | None = None, server_name: str | None = None
) -> TlsSettings:
    return TlsSettings(
        ca_file=str(ca),
        cert_file=str(client.cert) if client else None,
        key_file=str(client.key) if client else None,
        server_name=server_name,
    )


def trellis(address: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m trellis.cli --address ADDRESS ARGS`` with these TRELLIS_* variables."""
    return subprocess.run(
        [sys.executable, "-m", "trellis.cli", "--address", address, *args],
        env=base_env(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def refused_connection(address: str, credentials: grpc.ChannelCredentials | None) -> None:
    """A health check over a channel with these credentials (None: plaintext) fails with
    UNAVAILABLE: the connection itself is refused, before any RPC reaches the server."""
    if credentials is None:
        channel = grpc.aio.insecure_channel(address)
    else:
        channel = grpc.aio.secure_channel(address, credentials)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value


def served_certificate(port: int, ca: Path) -> x509.Certificate:
    """The certificate the coordinator presents to a new connection, verified against ``ca``
    for the name localhost."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def stop_all(workers: list[Proc], coordinator: Proc) -> tuple[list[int], int]:
    return [w.stop() for w in workers], coordinator.stop()


async def run_diamonds(client: Client, count: int) -> list[str]:
    """Registers the diamond and runs ``count`` of them to success; their execution ids."""
    await client.register_workflow(DIAMOND)
    started = await asyncio.gather(
        *(client.start_execution("diamond", {"n": n}) for n in range(count))
    )
    finished = await asyncio.gather(*(client.wait_for_execution(e.id, timeout=40) for e in started))
    for n, execution in enumerate(finished):
        assert execution.status == "SUCCEEDED", execution
        assert execution.output == {"sum": n * 2 + n * n}
    return [e.id for e in finished]


async def test_tls_runs_a_workflow_and_refuses_plaintext(tmp_path: Path) -> None:
    """Server TLS only: the Python worker, the SDK's Client and the CLI connect with
    TRELLIS_CA_FILE (and the API key); a plaintext client, and a TLS client that does not
    trust the CA, cannot connect."""
    ca = CertificateAuthority("trellis test CA")
    ca_file = ca.write(tmp_path, "ca")
    server = ca.issue_server().write(tmp_path, "server")
    coordinator, address = spawn_coordinator(
        sqlite_url(tmp_path),
        tmp_path,
        tls=channel_credentials(ca_file),
        tls_cert_file=str(server.cert),
        tls_key_file=str(server.key),
    )
    worker = spawn_python_worker(
        PYTHON_PART, address, tmp_path, "python-worker", **tls_env(ca_file)
    )
    try:
        async with Client(address, tls=tls_settings(ca_file)) as client:
            await run_diamonds(client, 3)

        await refused_connection(address, None)
        await refused_connection(address, channel_credentials(None))  # the system's CAs

        listed = await asyncio.to_thread(trellis, address, tls_env(ca_file), "workflow", "list")
        assert listed.returncode == 0, listed.stderr
        assert "diamond" in listed.stdout
        # The same command in plaintext (loopback: allowed by the SDK) cannot connect.
        plain = await asyncio.to_thread(
            trellis, address, {"TRELLIS_API_KEY": ADMIN_KEY}, "workflow", "list"
        )
        assert plain.returncode == 1, (plain.stdout, plain.stderr)
        assert "UNAVAILABLE" in plain.stderr, plain.stderr
    finally:
        (worker_exit,), coordinator_exit = stop_all([worker], coordinator)
    assert worker_exit == 0, worker.output()
    assert coordinator_exit == 0, coordinator.output()


async def test_mutual_tls_authenticates_python_and_node_workers_by_certificate(
    tmp_path: Path,
) -> None:
    """Mutual TLS: the admin (a client certificate and the admin key) registers the workers'
    common names as certificate identities with role worker, using the CLI. The Python and
    Node workers then connect with a client certificate and no API key, each is
    authenticated as its common name (the audit trail says who registered), and a diamond
    shared between them completes. A client without a certificate, with a certificate from
    another CA (even for a registered name), or with an unregistered name, is refused."""
    node = node_with_dependencies()
    ca = CertificateAuthority("trellis test CA")
    ca_file = ca.write(tmp_path, "ca")
    server = ca.issue_server().write(tmp_path, "server")
    admin = ca.issue_client("ops-admin").write(tmp_path, "ops-admin")
    python_cert = ca.issue_client("python-worker").write(tmp_path, "python-worker")
    node_cert = ca.issue_client("node-worker").write(tmp_path, "node-worker")
    stranger = ca.issue_client("stranger").write(tmp_path, "stranger")
    rogue = CertificateAuthority("rogue CA").issue_client("python-worker").write(tmp_path, "rogue")

    coordinator, address = spawn_coordinator(
        sqlite_url(tmp_path),
        tmp_path,
        tls=channel_credentials(ca_file, admin),
        tls_cert_file=str(server.cert),
        tls_key_file=str(server.key),
        tls_client_ca_file=str(ca_file),
    )
    workers: list[Proc] = []
    try:
        for name in ("python-worker", "node-worker"):
            added = await asyncio.to_thread(
                trellis, address, tls_env(ca_file, admin), "certs", "add", name, "--role", "worker"
            )
            assert added.returncode == 0, added.stderr
            assert name in added.stdout

        workers.append(
            spawn_python_worker(
                PYTHON_PART,
                address,
                tmp_path,
                "python-worker",
                WORKER_ID="python-worker",
                DIAMOND_TASKS="prepare,square",
                **tls_env(ca_file, python_cert, api_key=""),
            )
        )
        workers.append(
            spawn_node_worker(
                node,
                address,
                tmp_path,
                "node-worker",
                NODE_TASKS="double,combine",
                **tls_env(ca_file, node_cert, api_key=""),
            )
        )
        async with Client(address, tls=tls_settings(ca_file, admin)) as client:
            for execution_id in await run_diamonds(client, 4):
                leased = {
                    e.node_id: e.worker_id
                    for e in await history(client, execution_id)
                    if e.type == "NODE_LEASED"
                }
                assert leased == SERVED_BY

        admin_settings = ConnectionSettings(address, ADMIN_KEY, tls_settings(ca_file, admin))
        async with open_channel(admin_settings) as channel:
            identity = identity_service_pb2_grpc.IdentityServiceStub(channel)
            reply = await identity.ListAuditRecords(ipb.ListAuditRecordsRequest(), timeout=10)
        registered = {
            (r.actor, r.target)
            for r in reply.records
            if r.action == "RegisterWorker" and r.outcome == "ok"
        }
        assert registered == {
            ("python-worker", "worker/python-worker"),
            ("node-worker", "worker/node-worker"),
        }, reply

        # A registered name acts with its role only (worker: lease tasks, not read the audit).
        worker_settings = ConnectionSettings(address, "", tls_settings(ca_file, python_cert))
        async with open_channel(worker_settings) as channel:
            identity = identity_service_pb2_grpc.IdentityServiceStub(channel)
            me = await identity.WhoAmI(ipb.WhoAmIRequest(), timeout=10)
            assert (me.subject, list(me.roles)) == ("python-worker", ["worker"]), me
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await identity.ListAuditRecords(ipb.ListAuditRecordsRequest(), timeout=10)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # A certificate the CA signed, for a name nobody registered: authenticated by TLS,
        # refused by the coordinator.
        stranger_settings = ConnectionSettings(address, "", tls_settings(ca_file, stranger))
        async with open_channel(stranger_settings) as channel:
            identity = identity_service_pb2_grpc.IdentityServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await identity.WhoAmI(ipb.WhoAmIRequest(), timeout=10)
            assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED

        await refused_connection(address, channel_credentials(ca_file))  # no certificate
        await refused_connection(address, channel_credentials(ca_file, rogue))
        await refused_connection(address, None)
        # The CLI with the admin key but no client certificate cannot connect either.
        no_cert = await asyncio.to_thread(trellis, address, tls_env(ca_file), "workflow", "list")
        assert no_cert.returncode == 1, (no_cert.stdout, no_cert.stderr)
    finally:
        exit_codes, coordinator_exit = stop_all(workers, coordinator)
    assert exit_codes == [0, 0], [w.output() for w in workers]
    assert coordinator_exit == 0, coordinator.output()


async def test_workers_with_api_keys_over_tls_check_the_server_name(tmp_path: Path) -> None:
    """Server TLS with a certificate for coordinator.trellis.test only (no IP address): the
    Python and Node workers connect to 127.0.0.1 with TRELLIS_TLS_SERVER_NAME and an API key
    of role worker made with the CLI (the Node worker's rides as call credentials over TLS);
    a diamond shared between them completes and the audit trail names each key. A Node
    worker without the server name cannot connect: the certificate does not name 127.0.0.1."""
    node = node_with_dependencies()
    name = "coordinator.trellis.test"
    ca = CertificateAuthority("trellis test CA")
    ca_file = ca.write(tmp_path, "ca")
    server = ca.issue_server(hosts=(name,), ips=()).write(tmp_path, "server")
    coordinator, address = spawn_coordinator(
        sqlite_url(tmp_path),
        tmp_path,
        tls=channel_credentials(ca_file),
        tls_server_name=name,
        tls_cert_file=str(server.cert),
        tls_key_file=str(server.key),
    )
    admin_env = {**tls_env(ca_file), "TRELLIS_TLS_SERVER_NAME": name}
    workers: list[Proc] = []
    try:
        keys = {}
        for key_name in ("python-key", "node-key"):
            made = await asyncio.to_thread(
                trellis,
                address,
                admin_env,
                "keys",
                "create",
                "--name",
                key_name,
                "--role",
                "worker",
            )
            assert made.returncode == 0, made.stderr
            keys[key_name] = made.stdout.strip()
        workers.append(
            spawn_python_worker(
                PYTHON_PART,
                address,
                tmp_path,
                "python-worker",
                WORKER_ID="python-worker",
                DIAMOND_TASKS="prepare,square",
                **{**admin_env, "TRELLIS_API_KEY": keys["python-key"]},
            )
        )
        workers.append(
            spawn_node_worker(
                node,
                address,
                tmp_path,
                "node-worker",
                NODE_TASKS="double,combine",
                **{**admin_env, "TRELLIS_API_KEY": keys["node-key"]},
            )
        )
        lost = spawn_node_worker(
            node,
            address,
            tmp_path,
            "node-lost",
            NODE_TASKS="double",
            **tls_env(ca_file, api_key=keys["node-key"]),
        )
        try:

            async def lost_cannot_register() -> bool:
                assert lost.popen.poll() is None, lost.output()
                return "cannot register" in lost.output()

            await wait_for(lost_cannot_register, timeout=20)
            assert "UNAVAILABLE" in lost.output(), lost.output()
            assert "ERR_TLS_CERT_ALTNAME_INVALID" in lost.output(), lost.output()
            assert "registered with" not in lost.output(), lost.output()
        finally:
            lost.stop()

        tls = tls_settings(ca_file, server_name=name)
        async with Client(address, tls=tls) as client:
            for execution_id in await run_diamonds(client, 3):
                leased = {
                    e.node_id: e.worker_id
                    for e in await history(client, execution_id)
                    if e.type == "NODE_LEASED"
                }
                assert leased == SERVED_BY
        async with open_channel(ConnectionSettings(address, ADMIN_KEY, tls)) as channel:
            identity = identity_service_pb2_grpc.IdentityServiceStub(channel)
            reply = await identity.ListAuditRecords(ipb.ListAuditRecordsRequest(), timeout=10)
        registered = {
            (r.actor, r.target)
            for r in reply.records
            if r.action == "RegisterWorker" and r.outcome == "ok"
        }
        assert registered == {
            ("python-key", "worker/python-worker"),
            ("node-key", "worker/node-worker"),
        }, reply
    finally:
        exit_codes, coordinator_exit = stop_all(workers, coordinator)
    assert exit_codes == [0, 0], [w.output() for w in workers]
    assert coordinator_exit == 0, coordinator.output()


async def test_a_renewed_server_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    """The certificate and key files are replaced by a newly issued pair while the
    coordinator runs: new connections get the new certificate (another serial), a connection
    opened before keeps working, and the process is the same."""
    ca = CertificateAuthority("trellis test CA")
    ca_file = ca.write(tmp_path, "ca")
    first = ca.issue_server()
    files = first.write(tmp_path, "server")
    coordinator, address = spawn_coordinator(
        sqlite_url(tmp_path),
        tmp_path,
        tls=channel_credentials(ca_file),
        tls_cert_file=str(files.cert),
        tls_key_file=str(files.key),
    )
    port = int(address.rsplit(":", 1)[1])
    try:
        assert served_certificate(port, ca_file).serial_number == first.serial
        async with Client(address, tls=tls_settings(ca_file)) as before:
            await before.register_workflow(DIAMOND)

            renewed = ca.issue_server()
            assert renewed.serial != first.serial
            staged = renewed.write(tmp_path, "staged")
            # As a mounted Secret is updated: each file replaced whole, the key first.
            os.replace(staged.key, files.key)
            os.replace(staged.cert, files.cert)

            async def new_certificate_served() -> bool:
                served = await asyncio.to_thread(served_certificate, port, ca_file)
                return served.serial_number == renewed.serial

            await wait_for(new_certificate_served, timeout=15, interval=0.2)
            assert [w.name for w in await before.list_workflows()] == ["diamond"]
        async with Client(address, tls=tls_settings(ca_file)) as after:
            assert [w.name for w in await after.list_workflows()] == ["diamond"]
        assert coordinator.popen.poll() is None, coordinator.output()
    finally:
        coordinator_exit = coordinator.stop()
    assert coordinator_exit == 0, coordinator.output()
    assert "TLS certificate reloaded" in coordinator.output()


def test_serve_without_tls_or_plaintext_refuses_to_start(tmp_path: Path) -> None:
    """Neither TRELLIS_TLS_CERT_FILE nor TRELLIS_PLAINTEXT: `coordinator serve` exits 1 at once
    with a message naming both, and nothing listens on its port."""
    port = free_port()
    env = base_env(
        {
            "TRELLIS_DATABASE_URL": sqlite_url(tmp_path),
            "TRELLIS_LISTEN": f"127.0.0.1:{port}",
            "TRELLIS_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "trellis.cli", "coordinator", "serve"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    message = done.stderr.strip()
    assert "TRELLIS_TLS_CERT_FILE" in message, message
    assert "TRELLIS_PLAINTEXT" in message, message
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass
