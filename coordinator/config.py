"""Coordinator configuration: parsed once from ``TRELLIS_*`` environment variables.

Every setting, its default and its meaning is listed in docs/operations.md.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta

from coordinator.errors import InvalidArgument

DEFAULT_LISTEN = "127.0.0.1:7400"
DEFAULT_DATABASE_URL = "sqlite:///trellis.db"
# Sub-workflows nest at most this deep whatever TRELLIS_MAX_WORKFLOW_DEPTH says.
MAX_WORKFLOW_DEPTH_CEILING = 100

_ALLOWED_HOST = re.compile(
    r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?$|^\[?[0-9A-Fa-f:.]+\]?$"
)
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


def _parse_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{name}={raw!r} must be a finite number, at least 0")
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
    # Deepest chain of sub-workflows: a root execution has depth 0, its children 1, ...
    max_workflow_depth: int = 10
    # A repeated StartExecution idempotency key within this window returns the first
    # execution; after it, the key starts a new one.
    idempotency_window: timedelta = timedelta(hours=24)
    # Notifications (docs/notifications.md): the delivery loop on every replica.
    notify_poll_interval: timedelta = timedelta(seconds=1)
    notify_max_attempts: int = 10
    notify_max_age: timedelta = timedelta(hours=24)
    notify_backoff_initial: timedelta = timedelta(seconds=1)
    notify_backoff_max: timedelta = timedelta(minutes=5)
    notify_backoff_multiplier: float = 2.0
    notify_backoff_jitter: float = 0.2
    notify_breaker_threshold: int = 5
    notify_breaker_reset: timedelta = timedelta(seconds=30)
    notify_send_timeout: timedelta = timedelta(seconds=10)
    # Notifications go only to public addresses; these comma-separated host names
    # (``*.example.com`` for a domain's names) and CIDRs may be reached besides.
    notify_allow_hosts: str = ""
    notify_allow_networks: str = ""
    # Dispatch control (docs/dispatch.md). Redis shares rate-limit buckets and breaker state
    # between replicas; without it (or while it is unreachable) each replica enforces them
    # on its own and readiness says so.
    redis_url: str = ""
    # How long a degraded replica waits between attempts to reach Redis again.
    redis_retry_interval: timedelta = timedelta(seconds=2)
    # How often a replica re-reads the task-type limits (changes on another replica show
    # up within this; changes made through this replica at once).
    limits_refresh: timedelta = timedelta(seconds=1)
    # Ageing: one priority step is worth this much waiting (dispatch order is
    # available_at - priority * aging), so low-priority work is never starved for ever.
    priority_aging: timedelta = timedelta(seconds=60)
    # Most candidates one claim examines when limits hold some back.
    claim_scan: int = 256
    # Backpressure, per replica: long polls waiting at once, and starts per second (0 =
    # unlimited) with their burst. Beyond them RPCs answer RESOURCE_EXHAUSTED with a hint.
    max_poll_waiters: int = 1000
    max_start_rate: float = 0.0
    start_burst: int = 100
    # WatchExecution streams open at once on a replica, and for one caller (tenant and
    # subject); beyond either, RESOURCE_EXHAUSTED.
    max_watches: int = 1000
    max_watches_per_caller: int = 100
    # Transport (docs/security.md): TLS from these PEM files, re-read when they change;
    # with a client CA, mutual TLS (clients must present a certificate it signed).
    # Plaintext must be chosen (`coordinator serve` refuses to start with neither).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    plaintext: bool = False
    # Authentication: every RPC needs a credential unless insecure_open (local experiments
    # only: every caller acts as an admin of the default tenant).
    insecure_open: bool = False
    # An admin key of the system tenant that is never stored (first setup, `trellis dev`).
    bootstrap_admin_key: str = ""
    # "kid:secret,kid:secret" (first = current): API-key hashes and lease-token signatures.
    # Empty: a secret generated once and kept in the database.
    secret_keys: str = ""
    # A resolved credential is trusted this long (revocation reaches other replicas within).
    auth_cache_ttl: timedelta = timedelta(seconds=5)
    # gRPC server reflection (needs a credential too).
    reflection: bool = False
    # JWT bearer tokens from an OIDC issuer: its issuer and audience, and its keys from a
    # JWKS URL or a PEM file; the tenant and roles from these claims.
    oidc_issuer: str = ""
    oidc_audience: str = ""
    oidc_jwks_url: str = ""
    oidc_public_key_file: str = ""
    oidc_tenant_claim: str = "trellis_tenant"
    oidc_roles_claim: str = "trellis_roles"
    # Encryption at rest of secrets (docs/security.md, "Secrets"): "kid:base64key,..."
    # (32-byte AES keys; the first encrypts, every one decrypts), or a file holding that
    # text (a mounted Kubernetes Secret). Neither: a key derived from the database's server
    # secret, which does not protect a database dump (the coordinator warns).
    encryption_keys: str = ""
    encryption_keys_file: str = ""
    # Secret values are cached this long per replica (another replica's change is seen
    # within it; a change on this replica at once).
    secret_cache_ttl: timedelta = timedelta(seconds=5)

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
            elif isinstance(default, float):
                values[f.name] = _parse_float(env_name, raw)
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
        self._check_notify()
        self._check_security()
        if self.idempotency_window <= timedelta(0):
            raise ConfigError(
                f"TRELLIS_IDEMPOTENCY_WINDOW={self.idempotency_window} must be positive (e.g. 24h)"
            )
        if not 1 <= self.max_workflow_depth <= MAX_WORKFLOW_DEPTH_CEILING:
            raise ConfigError(
                f"TRELLIS_MAX_WORKFLOW_DEPTH={self.max_workflow_depth} must be between 1 "
                f"and {MAX_WORKFLOW_DEPTH_CEILING}"
            )

    def _check_security(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("TRELLIS_TLS_CERT_FILE and TRELLIS_TLS_KEY_FILE go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError(
                "TRELLIS_TLS_CLIENT_CA_FILE (mutual TLS) needs TRELLIS_TLS_CERT_FILE and "
                "TRELLIS_TLS_KEY_FILE"
            )
        if self.encryption_keys and self.encryption_keys_file:
            raise ConfigError(
                "set TRELLIS_ENCRYPTION_KEYS or TRELLIS_ENCRYPTION_KEYS_FILE, not both"
            )
        if self.tls_cert_file and self.plaintext:
            raise ConfigError("choose TLS (TRELLIS_TLS_CERT_FILE) or TRELLIS_PLAINTEXT, not both")
        if self.oidc_issuer and not (
            self.oidc_audience and (self.oidc_jwks_url or self.oidc_public_key_file)
        ):
            raise ConfigError(
                "TRELLIS_OIDC_ISSUER needs TRELLIS_OIDC_AUDIENCE and TRELLIS_OIDC_JWKS_URL (or "
                "TRELLIS_OIDC_PUBLIC_KEY_FILE)"
            )

    def encryption_key_text(self) -> str:
        """The encryption keys, from the variable or the file (read now); "" for none."""
        if not self.encryption_keys_file:
            return self.encryption_keys
        try:
            with open(self.encryption_keys_file, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise ConfigError(
                f"TRELLIS_ENCRYPTION_KEYS_FILE={self.encryption_keys_file!r} cannot be read "
                f"({exc.strerror}); mount the key file there or unset the variable"
            ) from exc

    def check_serving(self) -> None:
        """What `coordinator serve` insists on: TLS, or plaintext chosen explicitly."""
        if not self.tls_cert_file and not self.plaintext:
            raise ConfigError(
                "the coordinator serves TLS: set TRELLIS_TLS_CERT_FILE and TRELLIS_TLS_KEY_FILE, "
                "or TRELLIS_PLAINTEXT=true to serve plaintext (only inside a trusted network)"
            )

    def _check_notify(self) -> None:
        if self.notify_poll_interval <= timedelta(0) or self.notify_send_timeout <= timedelta(0):
            raise ConfigError(
                "TRELLIS_NOTIFY_POLL_INTERVAL and TRELLIS_NOTIFY_SEND_TIMEOUT must be positive"
            )
        if self.notify_backoff_multiplier < 1:
            raise ConfigError(
                f"TRELLIS_NOTIFY_BACKOFF_MULTIPLIER={self.notify_backoff_multiplier} must be "
                "at least 1"
            )
        if self.notify_backoff_jitter > 1:
            raise ConfigError(
                f"TRELLIS_NOTIFY_BACKOFF_JITTER={self.notify_backoff_jitter} must be between "
                "0 and 1 (a fraction of the delay)"
            )
        if self.notify_backoff_max < self.notify_backoff_initial:
            raise ConfigError(
                "TRELLIS_NOTIFY_BACKOFF_MAX must be at least TRELLIS_NOTIFY_BACKOFF_INITIAL"
            )
        for raw in filter(None, (n.strip() for n in self.notify_allow_networks.split(","))):
            try:
                ipaddress.ip_network(raw, strict=False)
            except ValueError:
                raise ConfigError(
                    f"TRELLIS_NOTIFY_ALLOW_NETWORKS: {raw!r} is not a network; use CIDRs such "
                    "as 10.1.0.0/16 or 127.0.0.1/32, separated by commas"
                ) from None
        for raw in filter(None, (h.strip() for h in self.notify_allow_hosts.split(","))):
            if not _ALLOWED_HOST.match(raw):
                raise ConfigError(
                    f"TRELLIS_NOTIFY_ALLOW_HOSTS: {raw!r} is not a host name; use names such "
                    "as hooks.internal or *.internal.example, separated by commas"
                )


# Variables read by other entry points (the CLI's client commands, the gateway).
_OTHER_SETTINGS = frozenset(
    {
        "TRELLIS_ADDRESS",
        "TRELLIS_API_KEY",
        "TRELLIS_CA_FILE",
        "TRELLIS_CLIENT_CERT_FILE",
        "TRELLIS_CLIENT_KEY_FILE",
        "TRELLIS_TLS_SERVER_NAME",
        "TRELLIS_TLS",
        "TRELLIS_INSECURE",
    }
)
_GATEWAY = "TRELLIS_GATEWAY_"
