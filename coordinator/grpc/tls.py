"""The gRPC listener's TLS: certificate and key from PEM files (a mounted Secret), read again
when they change, so a renewed certificate is served to new connections without a restart;
with a client CA, mutual TLS (a client without a certificate signed by it is refused)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

from coordinator.config import CoordinatorConfig

log = logging.getLogger(__name__)


def server_credentials(config: CoordinatorConfig) -> grpc.ServerCredentials:
    files = [config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file]

    def stamp() -> tuple[float, ...]:
        return tuple(os.stat(f).st_mtime_ns if f else 0 for f in files)

    def load() -> grpc.ServerCertificateConfiguration:
        cert = Path(config.tls_cert_file).read_bytes()
        key = Path(config.tls_key_file).read_bytes()
        ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    try:
        initial = load()
    except OSError as exc:
        raise OSError(f"cannot read the TLS certificate, key or client CA: {exc}") from exc
    seen = [stamp()]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each new TLS handshake: None keeps the current files.
        try:
            now = stamp()
            if now == seen[0]:
                return None
            fresh = load()
        except (OSError, ValueError) as exc:
            log.warning("TLS files changed but cannot be read (%s); serving the old ones", exc)
            return None
        seen[0] = now
        log.info("TLS certificate reloaded", extra={"cert_file": config.tls_cert_file})
        return fresh

    return grpc.dynamic_ssl_server_credentials(
        initial,
        fetch,  # type: ignore[arg-type]  # gRPC documents None as "no change"
        require_client_authentication=bool(config.tls_client_ca_file),
    )
