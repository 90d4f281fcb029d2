"""Real coordinator and worker processes for e2e tests, stopped by the fixtures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.wait import WaitTimeout, wait_for_sync

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# The admin key of every coordinator the tests start (the bootstrap key: never stored), and
# the credential every process they start (workers, the CLI, the gateway) sends by default.
ADMIN_KEY = "trellis-test-admin-key-0123456789"


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRELLIS_")}
    env["PYTHONPATH"] = str(ROOT)
    env["TRELLIS_API_KEY"] = ADMIN_KEY
    env["TRELLIS_GATEWAY_API_KEY"] = ADMIN_KEY
    env.update(extra or {})
    return env


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def spawn(name: str, args: list[str], env: Mapping[str, str], log_dir: Path) -> Proc:
    log = log_dir / f"{name}.log"
    handle = log.open("wb")
    popen = subprocess.Popen(args, env=dict(env), stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    handle.close()
    return Proc(name, popen, log)


def spawn_coordinator(
    database_url: str,
    log_dir: Path,
    *,
    port: int | None = None,
    tls: grpc.ChannelCredentials | None = None,
    tls_server_name: str = "",
    **settings: str,
) -> tuple[Proc, str]:
    """A coordinator serving plaintext on 127.0.0.1, or with ``tls`` (the credentials the
    readiness check connects with, checking the certificate against ``tls_server_name`` when
    given) TLS: the TLS settings are then the caller's, e.g. ``tls_cert_file=...,
    tls_key_file=...``."""
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    env = base_env(
        {
            "TRELLIS_DATABASE_URL": database_url,
            "TRELLIS_LISTEN": address,
            "TRELLIS_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
            **{f"TRELLIS_{k.upper()}": v for k, v in settings.items()},
        }
    )
    if tls is None:
        env["TRELLIS_PLAINTEXT"] = "true"
    proc = spawn(
        f"coordinator-{port}",
        [sys.executable, "-m", "trellis.cli", "coordinator", "serve"],
        env,
        log_dir,
    )
    wait_serving(address, proc, tls=tls, tls_server_name=tls_server_name)
    return proc, address


def wait_serving(
    address: str,
    proc: Proc,
    timeout: float = 30.0,
    *,
    tls: grpc.ChannelCredentials | None = None,
    tls_server_name: str = "",
) -> None:
    """Block until the coordinator's gRPC health service answers SERVING (over TLS with
    these credentials when given)."""
    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        names = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(address, tls, options=names)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited early:\n{proc.output()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        try:
            wait_for_sync(serving, timeout=timeout, interval=0.1)
        except WaitTimeout:
            raise AssertionError(
                f"{proc.name} not serving after {timeout}s:\n{proc.output()}"
            ) from None


def spawn_worker(script: Path, address: str, log_dir: Path, name: str, **env_extra: str) -> Proc:
    env = base_env({"TRELLIS_ADDRESS": address, **env_extra})
    return spawn(name, [sys.executable, str(script)], env, log_dir)


def spawn_gateway(
    coordinator_address: str, log_dir: Path, *, name: str = "gateway", **settings: str
) -> tuple[Proc, str]:
    """A `trellis gateway serve` on a free loopback port, talking to the coordinator at
    ``coordinator_address``; ``settings`` become ``TRELLIS_GATEWAY_<NAME>`` variables.
    Returns the process and its base URL (not waited for: the caller polls /readyz)."""
    port = free_port()
    env = base_env(
        {
            "TRELLIS_GATEWAY_LISTEN": f"127.0.0.1:{port}",
            "TRELLIS_GATEWAY_COORDINATOR_ADDRESS": coordinator_address,
            **{f"TRELLIS_GATEWAY_{k.upper()}": v for k, v in settings.items()},
        }
    )
    proc = spawn(name, [sys.executable, "-m", "trellis.cli", "gateway", "serve"], env, log_dir)
    return proc, f"http://127.0.0.1:{port}"
