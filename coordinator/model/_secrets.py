"""The tenant's secret store as data, and the rules of ``${secret:NAME}`` references.

A node's config may name a secret anywhere inside a string value: ``"Bearer
${secret:stripe_key}"``. References are checked at registration (``malformed_reference``),
found once per loaded definition (``NodeSpec.secret_refs``), resolved only into the config
of a task handed to a worker (``resolve_references``), and any resolved value a worker
sends back (an error message, details, an output) is replaced by its reference before it
is recorded (``redact``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# Secret names are identifiers, bounded like role names and tenant ids.
SECRET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_SECRET_BYTES = 64 * 1024
# Shorter values are refused: redaction replaces a value wherever it appears in a result,
# and "1" or "true" would rewrite unrelated text.
MIN_SECRET_CHARS = 8
MAX_SECRETS_PER_TENANT = 1000
REFERENCE_MARK = b"${secret:"
_REFERENCE = re.compile(r"\$\{secret:([A-Za-z0-9][A-Za-z0-9_.-]{0,62})\}")
_ANY_MARK = re.compile(r"\$\{secret:")


@dataclass(frozen=True)
class SecretEntry:
    """One secret of a tenant. ``value`` is plaintext in memory; the SQL store keeps it
    encrypted (``coordinator.sealing``)."""

    tenant_id: str
    name: str
    value: str
    created_at: datetime
    updated_at: datetime


def secret_references(config: bytes) -> tuple[str, ...]:
    """The secret names a node config references, sorted, each once (() without any)."""
    if REFERENCE_MARK not in config:
        return ()
    return tuple(sorted(set(_REFERENCE.findall(config.decode("utf-8", "replace")))))


def malformed_reference(config: bytes) -> str | None:
    """The first ``${secret:`` that is not a well-formed ``${secret:NAME}``, or None."""
    if REFERENCE_MARK not in config:
        return None
    text = config.decode("utf-8", "replace")
    for mark in _ANY_MARK.finditer(text):
        if not _REFERENCE.match(text, mark.start()):
            return text[mark.start() : mark.start() + 80]
    return None


def _walk(value: Any, fn: Any) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_walk(v, fn) for v in value]
    if isinstance(value, dict):
        return {fn(k): _walk(v, fn) for k, v in value.items()}
    return value


def resolve_references(config: bytes, values: Mapping[str, str]) -> bytes:
    """``config`` (a JSON document) with every ``${secret:NAME}`` inside a string replaced
    by the secret's value; every name must be in ``values``."""
    doc = json.loads(config)

    def sub(text: str) -> str:
        return _REFERENCE.sub(lambda m: values[m.group(1)], text) if "${secret:" in text else text

    return json.dumps(_walk(doc, sub), separators=(",", ":")).encode()


def redact_text(text: str, values: Mapping[str, str]) -> str:
    """``text`` with every secret value in ``values`` replaced by ``${secret:NAME}``
    (longest first, so a value containing another is replaced whole)."""
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[1])):
        if value and value in text:
            text = text.replace(value, "${secret:" + name + "}")
    return text


def redact(payload: bytes, values: Mapping[str, str]) -> bytes:
    """A JSON payload (details, an output) with every secret value inside its strings
    replaced by its reference; a payload that is not JSON is redacted as text."""
    if not payload or not any(v for v in values.values()):
        return payload
    try:
        doc = json.loads(payload)
    except ValueError:
        return redact_text(payload.decode("utf-8", "replace"), values).encode()
    clean = _walk(doc, lambda s: redact_text(s, values))
    if clean == doc:
        return payload
    return json.dumps(clean, separators=(",", ":")).encode()
