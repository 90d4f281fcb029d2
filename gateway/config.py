"""Gateway settings: parsed once from ``TRELLIS_GATEWAY_*`` environment variables."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

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
            if name == "max_body_bytes":
                if not raw.isdigit() or int(raw) < 1:
                    raise GatewayConfigError(
                        f"{env_name}={raw!r} must be a positive number of bytes"
                    )
                values[name] = int(raw)
            elif name in ("ready_timeout", "rpc_timeout"):
                m = _DURATION.match(raw)
                if not m:
                    raise GatewayConfigError(
                        f"{env_name}={raw!r} is not a duration; use e.g. 500ms or 2s"
                    )
                values[name] = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
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
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        try:
            return host, int(port)
        except ValueError:
            raise GatewayConfigError(
                f"TRELLIS_GATEWAY_LISTEN={self.listen!r} must be HOST:PORT"
            ) from None
