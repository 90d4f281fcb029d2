"""Webhook authentication: HMAC-SHA256 signatures with a timestamp, and bearer tokens."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest

from coordinator.errors import Unauthenticated
from coordinator.service._triggers import token_digest, verify_bearer, verify_signature
from coordinator.signing import sign

SECRET = "0123456789abcdef-secret"
BODY = b'{"order": 1}'
NOW = datetime(2030, 1, 1, tzinfo=UTC)
T = int(NOW.timestamp())


def headers(value: str) -> dict[str, str]:
    return {"x-trellis-signature": value}


def test_sign_is_hmac_sha256_of_timestamp_dot_body() -> None:
    mac = hmac.new(SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, BODY, T) == f"t={T},v1={mac}"


def test_a_good_signature_passes() -> None:
    verify_signature(SECRET, headers(sign(SECRET, BODY, T)), BODY, NOW)
    # Within the tolerance either way; several v1 values (secret rotation): any may match.
    verify_signature(SECRET, headers(sign(SECRET, BODY, T - 299)), BODY, NOW)
    rotated = sign("old-secret-old-secret", BODY, T) + "," + sign(SECRET, BODY, T).split(",")[1]
    verify_signature(SECRET, headers(rotated), BODY, NOW)


@pytest.mark.parametrize(
    ("value", "body", "fragment"),
    [
        (sign("wrong-secret-wrong-secret", BODY, T), BODY, "does not match"),
        (sign(SECRET, BODY, T), BODY + b" ", "does not match"),
        (sign(SECRET, BODY, T - 301), BODY, "away from the coordinator's clock"),
        (sign(SECRET, BODY, T + 3600), BODY, "away from the coordinator's clock"),
        (f"v1={'0' * 64}", BODY, "malformed"),
        (f"t={T}", BODY, "malformed"),
        ("garbage", BODY, "malformed"),
    ],
)
def test_bad_signatures_are_refused(value: str, body: bytes, fragment: str) -> None:
    with pytest.raises(Unauthenticated, match=fragment):
        verify_signature(SECRET, headers(value), body, NOW)


def test_missing_header_is_refused() -> None:
    with pytest.raises(Unauthenticated, match="missing X-Trellis-Signature"):
        verify_signature(SECRET, {}, BODY, NOW)


def test_tolerance_is_per_trigger() -> None:
    old = headers(sign(SECRET, BODY, T - 30))
    verify_signature(SECRET, old, BODY, NOW, timedelta(seconds=60))
    with pytest.raises(Unauthenticated, match="tolerance 10s"):
        verify_signature(SECRET, old, BODY, NOW, timedelta(seconds=10))


def test_bearer_tokens() -> None:
    digest = token_digest("the-token-the-token")
    verify_bearer(digest, {"authorization": "Bearer the-token-the-token"})
    verify_bearer(digest, {"authorization": "bearer the-token-the-token"})
    for bad in ({"authorization": "Bearer other"}, {"authorization": "Basic x"}, {}):
        with pytest.raises(Unauthenticated):
            verify_bearer(digest, bad)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        # A 400-digit t once overflowed the float conversion of the clock check.
        (f"t={'9' * 400},v1={'0' * 64}", "up to 12 digits"),
        (f"t=-{T},v1={'0' * 64}", "unix time in seconds"),
        (f"t=1e9,v1={'0' * 64}", "unix time in seconds"),
        # Millions of v1 values once held the coordinator for seconds: refused unread.
        (f"t={T}," + "v1=0," * 3_000_000, "over the limit of 1024"),
        (f"t={T}," + ",".join(["v1=00"] * 9), "more than 8 v1 values"),
    ],
)
def test_signature_headers_are_bounded(value: str, fragment: str) -> None:
    with pytest.raises(Unauthenticated, match=fragment):
        verify_signature(SECRET, headers(value), BODY, NOW)


def test_eight_signatures_are_allowed() -> None:
    others = ",".join([f"v1={'0' * 64}"] * 7)
    verify_signature(SECRET, headers(f"{sign(SECRET, BODY, T)},{others}"), BODY, NOW)
