"""Webhook signatures: ``X-Trellis-Signature: t=<unix seconds>,v1=<hex>``.

One scheme for both directions: webhook triggers verify it on requests coming in
(docs/triggers.md), notification channels sign what they send (docs/notifications.md).

``v1`` is HMAC-SHA256 keyed with the channel's secret over ``"<t>." + body`` (the exact
bytes POSTed). A receiver recomputes it, compares in constant time, and refuses a ``t``
too far from its clock (replays). See docs/notifications.md.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Trellis-Signature"
DEFAULT_TOLERANCE_SECONDS = 300


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>." + body`` keyed with ``secret``."""
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Trellis-Signature`` header value for ``body`` sent at ``timestamp``."""
    return f"t={timestamp},v1={signature(secret, body, timestamp)}"


def verify(
    secret: str,
    body: bytes,
    header: str,
    *,
    now: int,
    tolerance: int = DEFAULT_TOLERANCE_SECONDS,
) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` within ``tolerance`` seconds of
    ``now``. Several ``v1`` values (a secret being rotated) are accepted if any matches."""
    parsed = parse(header)
    if parsed is None:
        return False
    timestamp, candidates = parsed
    if abs(now - timestamp) > tolerance:
        return False
    return matches(secret, body, timestamp, candidates)


def parse(header: str) -> tuple[int, list[str]] | None:
    """``(t, [v1, ...])`` from a header value, or None when it is malformed."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return None
        elif key == "v1":
            candidates.append(value.strip().lower())
    if timestamp is None or not candidates:
        return None
    return timestamp, candidates


def matches(secret: str, body: bytes, timestamp: int, candidates: list[str]) -> bool:
    """Whether any candidate signs ``body`` at ``timestamp``; every one is compared in
    constant time (no early exit)."""
    expected = signature(secret, body, timestamp).encode()
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(candidate.encode(), expected)
    return matched
