"""Gateway settings: parsed once from ``TRELLIS_GATEWAY_*`` environment variables."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from worker_sdk._settings import ConnectionSettings, TlsSettings

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$")


class GatewayConfigError(ValueError):
    """A TRELLIS_GATEWAY_* variable has a value that cannot be used; the message names it."""


@dataclass(frozen=True)
class GatewayConfig:
    """``listen`` is where HTTP is served; ``coordinator_address`` the coordinator's gRPC."""

    listen: str = "127.0.0.1:8080"
    coordinator_address: str = "127.0.0.1:7400"
    # How long /readyz waits for the coordinator's health answer, in seconds.
    ready_timeout: float = 1.0
    log_level: str = "INFO"
    # Webhook and event bodies larger than this are refused (413) before reaching the
    # coordinator.
    max_body_bytes: int = 1024 * 1024
    # Bearer token guarding POST /api/events/{name}; empty disables event publishing.
    events_token: str = field(default="", repr=False)
    # How long a webhook or event call to the coordinator may take, in seconds.
    rpc_timeout: float = 10.0
    # Slow clients: a request's head (request line and headers) must arrive within
    # header_timeout of the connection opening (or of its first byte on a kept-alive one),
    # its body within body_timeout of the head (also a request pipelined behind another);
    # else 408 and the connection is closed.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    # Open connections at most; one more evicts the connection waiting longest for a head,
    # else the slowest one sending a body (503 only when every connection is busy with a
    # request the app is answering).
    max_connections: int = 1000
    # The gateway's own credential at the coordinator (an API key with the `gateway` role).
    api_key: str = field(default="", repr=False)
    # TLS to the coordinator: its CA, and a client certificate for mutual TLS.
    ca_file: str = ""
    client_cert_file: str = ""
    client_key_file: str = ""
    tls_server_name: str = ""
    # Plaintext to a coordinator that is not on this machine, chosen explicitly.
    coordinator_insecure: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> GatewayConfig:
        known = {f"TRELLIS_GATEWAY_{f.name.upper()}": f.name for f in fields(cls)}
        unknown = sorted(k for k in environ if k.startswith("TRELLIS_GATEWAY_") and k not in known)
        if unknown:
            raise GatewayConfigError(
                f"unknown setting {', '.join(unknown)}; known settings: {', '.join(sorted(known))}"
            )
        values: dict[str, str | float | int] = {}
        for env_name, name in known.items():
            raw = environ.get(env_name, "").strip()
            if not raw:
                continue
            if name in ("max_body_bytes", "max_connections"):
                unit = "bytes" if name == "max_body_bytes" else "connections"
                if not raw.isdigit() or len(raw) > 12 or int(raw) < 1:
                    raise GatewayConfigError(
                        f"{env_name}={raw!r} must be a positive number of {unit}"
                    )
                values[name] = int(raw)
            elif name in ("ready_timeout", "rpc_timeout", "header_timeout", "body_timeout"):
                m = _DURATION.match(raw)
                seconds = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1) if m else 0.0
                if not m or not 0 < seconds <= 86400:
                    raise GatewayConfigError(
                        f"{env_name}={raw!r} is not a duration; use e.g. 500ms or 2s "
                        "(more than 0, at most a day)"
                    )
                values[name] = seconds
            else:
                values[name] = raw
        config = cls(**values)  # type: ignore[arg-type]
        for env_name, value in (
            ("TRELLIS_GATEWAY_LISTEN", config.listen),
            ("TRELLIS_GATEWAY_COORDINATOR_ADDRESS", config.coordinator_address),
        ):
            if ":" not in value:
                raise GatewayConfigError(f"{env_name}={value!r} must be HOST:PORT")
        return config

    @property
    def connection(self) -> ConnectionSettings:
        """How the gateway reaches the coordinator (the SDK's settings; ``check`` refuses
        plaintext across a network unless ``coordinator_insecure``)."""
        tls = None
        if self.ca_file or self.client_cert_file:
            tls = TlsSettings(
                ca_file=self.ca_file or None,
                cert_file=self.client_cert_file or None,
                key_file=self.client_key_file or None,
                server_name=self.tls_server_name or None,
            )
        settings = ConnectionSettings(
            self.coordinator_address,
            api_key=self.api_key,
            tls=tls,
            insecure=self.coordinator_insecure.lower() in {"1", "true", "yes", "on"},
        )
        try:
            settings.check()
        except ValueError as exc:
            raise GatewayConfigError(str(exc).replace("TRELLIS_", "TRELLIS_GATEWAY_")) from None
        return settings

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        try:
            return host, int(port)
        except ValueError:
            raise GatewayConfigError(
                f"TRELLIS_GATEWAY_LISTEN={self.listen!r} must be HOST:PORT"
            ) from None
