"""Coordinator configuration: parsed once from ``TRELLIS_*`` environment variables.

Every setting, its default and its meaning is listed in docs/operations.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta

from coordinator.errors import InvalidArgument

DEFAULT_LISTEN = "127.0.0.1:7400"
DEFAULT_DATABASE_URL = "sqlite:///trellis.db"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ConfigError(InvalidArgument):
    """A TRELLIS_* variable has a value that cannot be used; the message names it."""


def parse_duration(name: str, raw: str) -> timedelta:
    """``"250ms"``, ``"30s"``, ``"5m"``, ``"1h"`` or a bare number of seconds."""
    m = _DURATION.match(raw)
    if not m:
        raise ConfigError(f"{name}={raw!r} is not a duration; use e.g. 250ms, 30s, 5m or 1h")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def _parse_int(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def _parse_bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use true or false")


@dataclass(frozen=True)
class CoordinatorConfig:
    """Typed settings for one coordinator process."""

    listen: str = DEFAULT_LISTEN
    database_url: str = DEFAULT_DATABASE_URL
    auto_migrate: bool = True
    max_payload_bytes: int = 1024 * 1024
    poll_max_wait: timedelta = timedelta(seconds=30)
    heartbeat_interval: timedelta = timedelta(seconds=5)
    worker_liveness_timeout: timedelta = timedelta(seconds=15)
    sweep_interval: timedelta = timedelta(seconds=1)
    shutdown_grace: timedelta = timedelta(seconds=10)
    log_level: str = "INFO"
    log_format: str = "text"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> CoordinatorConfig:
        """Read ``TRELLIS_<FIELD>`` for each field; unknown TRELLIS_ names are rejected."""
        known = {f"TRELLIS_{f.name.upper()}": f for f in fields(cls)}
        accepted = known.keys() | _OTHER_SETTINGS
        extra = sorted(
            k
            for k in environ
            if k.startswith("TRELLIS_") and k not in accepted and not k.startswith(_GATEWAY)
        )
        if extra:
            raise ConfigError(
                f"unknown setting {', '.join(extra)}; known settings: {', '.join(sorted(known))}"
            )
        values: dict[str, object] = {}
        for env_name, f in known.items():
            raw = environ.get(env_name)
            if raw is None or raw == "":
                continue
            default = f.default
            if isinstance(default, bool):
                values[f.name] = _parse_bool(env_name, raw)
            elif isinstance(default, int):
                values[f.name] = _parse_int(env_name, raw, 1)
            elif isinstance(default, timedelta):
                values[f.name] = parse_duration(env_name, raw)
            else:
                values[f.name] = raw.strip()
        config = cls(**values)  # type: ignore[arg-type]
        config._check()
        return config

    def _check(self) -> None:
        if self.log_format not in {"text", "json"}:
            raise ConfigError(f"TRELLIS_LOG_FORMAT={self.log_format!r} must be text or json")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(
                f"TRELLIS_LOG_LEVEL={self.log_level!r} must be DEBUG, INFO, WARNING or ERROR"
            )
        if ":" not in self.listen:
            raise ConfigError(f"TRELLIS_LISTEN={self.listen!r} must be HOST:PORT")
        if self.poll_max_wait <= timedelta(0) or self.sweep_interval <= timedelta(0):
            raise ConfigError("TRELLIS_POLL_MAX_WAIT and TRELLIS_SWEEP_INTERVAL must be positive")


# Variables read by other entry points (the CLI's client commands, the gateway).
_OTHER_SETTINGS = frozenset({"TRELLIS_ADDRESS"})
_GATEWAY = "TRELLIS_GATEWAY_"
