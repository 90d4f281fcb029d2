"""Where and how the SDK reaches the coordinator: one settings object for the Worker, the
Client and the ``trellis`` CLI, read from the environment; explicit arguments win.

- ``TRELLIS_ADDRESS``: HOST:PORT (default ``127.0.0.1:7400``).
- ``TRELLIS_API_KEY``: the credential sent with every call (``authorization: Bearer``);
  an API key, or a JWT from the configured OIDC issuer.
- ``TRELLIS_CA_FILE``: the CA bundle that signs the coordinator's certificate (TLS);
  ``TRELLIS_CLIENT_CERT_FILE`` and ``TRELLIS_CLIENT_KEY_FILE``: a client certificate for
  mutual TLS; ``TRELLIS_TLS_SERVER_NAME``: the name to check the certificate against when
  it differs from the address's host; ``TRELLIS_TLS=true``: TLS with the system's CAs.
- ``TRELLIS_INSECURE=true``: plaintext to a coordinator that is not on this machine.

Without any TLS setting the SDK speaks plaintext to a loopback address (``trellis dev``)
and refuses any other address: plaintext across a network must be chosen explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

DEFAULT_ADDRESS = "127.0.0.1:7400"
"""Where the SDK looks for the coordinator unless told otherwise."""

ADDRESS_VARIABLE = "TRELLIS_ADDRESS"
API_KEY_VARIABLE = "TRELLIS_API_KEY"

_TRUE = {"1", "true", "yes", "on"}
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass(frozen=True)
class TlsSettings:
    """TLS to the coordinator: ``ca_file`` (None: the system's CAs), and a client
    certificate and key for mutual TLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class ConnectionSettings:
    """How to reach the coordinator: its gRPC HOST:PORT, the credential, TLS."""

    address: str = DEFAULT_ADDRESS
    api_key: str = field(default="", repr=False)
    tls: TlsSettings | None = None
    # Plaintext to a non-loopback address, chosen explicitly.
    insecure: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ConnectionSettings:
        """The settings named by ``TRELLIS_*`` variables (unset or empty: the default)."""

        def get(name: str) -> str | None:
            return environ.get(name, "").strip() or None

        address = get(ADDRESS_VARIABLE) or DEFAULT_ADDRESS
        files = (get("TRELLIS_CA_FILE"), get("TRELLIS_CLIENT_CERT_FILE"))
        wants_tls = any(files) or (get("TRELLIS_TLS") or "").lower() in _TRUE
        tls = (
            TlsSettings(
                ca_file=files[0],
                cert_file=files[1],
                key_file=get("TRELLIS_CLIENT_KEY_FILE"),
                server_name=get("TRELLIS_TLS_SERVER_NAME"),
            )
            if wants_tls
            else None
        )
        return cls(
            address=address,
            api_key=get(API_KEY_VARIABLE) or "",
            tls=tls,
            insecure=(get("TRELLIS_INSECURE") or "").lower() in _TRUE,
        )

    @property
    def loopback(self) -> bool:
        host = self.address.rsplit(":", 1)[0]
        return host in _LOOPBACK_HOSTS

    def check(self) -> None:
        """ValueError when the settings would send plaintext across a network unasked, or
        name half a client certificate."""
        if self.tls is not None:
            if bool(self.tls.cert_file) != bool(self.tls.key_file):
                raise ValueError(
                    "mutual TLS needs both TRELLIS_CLIENT_CERT_FILE and TRELLIS_CLIENT_KEY_FILE"
                )
            return
        if not self.loopback and not self.insecure:
            raise ValueError(
                f"refusing plaintext to {self.address}: set TRELLIS_CA_FILE (or TRELLIS_TLS=true) "
                "to connect over TLS, or TRELLIS_INSECURE=true to choose plaintext"
            )


def connection_settings(
    address: str | None = None,
    *,
    api_key: str | None = None,
    tls: TlsSettings | None = None,
) -> ConnectionSettings:
    """The settings of a Worker or Client: the process environment's, where explicit
    arguments win over the ``TRELLIS_*`` variables."""
    settings = ConnectionSettings.from_env(os.environ)
    if address is not None:
        settings = replace(settings, address=address)
    if api_key is not None:
        settings = replace(settings, api_key=api_key)
    if tls is not None:
        settings = replace(settings, tls=tls)
    settings.check()
    return settings
