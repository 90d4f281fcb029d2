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
# Bounds on a header before any work is done on it: a sender rotating secrets sends a few
# ``v1`` values, never thousands; ``t`` is unix seconds (12 digits reach the year 33658).
MAX_HEADER_LENGTH = 1024
MAX_SIGNATURES = 8
MAX_TIMESTAMP_DIGITS = 12


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
    try:
        return parse_header(header)
    except ValueError:
        return None


def parse_header(header: str) -> tuple[int, list[str]]:
    """``(t, [v1, ...])`` from a header value; ``ValueError`` saying what is wrong when it
    is malformed or over the bounds (``MAX_HEADER_LENGTH`` characters, ``MAX_SIGNATURES``
    ``v1`` values, a ``t`` of at most ``MAX_TIMESTAMP_DIGITS`` digits). The length is
    checked before the header is split, so a huge header costs nothing."""
    if len(header) > MAX_HEADER_LENGTH:
        raise ValueError(
            f"is {len(header)} characters, over the limit of {MAX_HEADER_LENGTH}; send one "
            f"t=<unix seconds> and at most {MAX_SIGNATURES} v1=<hex> values"
        )
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        value = value.strip()
        if key == "t":
            if not (value.isascii() and value.isdigit()) or len(value) > MAX_TIMESTAMP_DIGITS:
                raise ValueError(
                    f"has t={value[:20]!r}; t must be the unix time in seconds "
                    f"(up to {MAX_TIMESTAMP_DIGITS} digits)"
                )
            timestamp = int(value)
        elif key == "v1":
            if len(candidates) == MAX_SIGNATURES:
                raise ValueError(
                    f"has more than {MAX_SIGNATURES} v1 values; send one per secret in use"
                )
            candidates.append(value.lower())
    if timestamp is None or not candidates:
        raise ValueError("needs t=<unix seconds> and at least one v1=<hex signature>")
    return timestamp, candidates


def matches(secret: str, body: bytes, timestamp: int, candidates: list[str]) -> bool:
    """Whether any candidate signs ``body`` at ``timestamp``; every one is compared in
    constant time (no early exit)."""
    expected = signature(secret, body, timestamp).encode()
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(candidate.encode(), expected)
    return matched
