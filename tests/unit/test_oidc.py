"""JwtVerifier without a coordinator: PEM keys, and what a JWKS lookup that fails becomes
(tests/e2e/test_security_jwt.py has the JWKS endpoint and the whole refusal matrix)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from coordinator.errors import Unauthenticated, Unavailable
from coordinator.oidc import JwtSettings, JwtVerifier
from tests.support.procs import free_port

ISSUER = "https://login.example.test/"
AUDIENCE = "trellis-api"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _token(key: rsa.RSAPrivateKey, **changes: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 60, **changes}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


def _pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


async def test_pem_keys_verify_their_tokens_and_refuse_others(key: rsa.RSAPrivateKey) -> None:
    verifier = JwtVerifier(JwtSettings(ISSUER, AUDIENCE, public_keys=(_pem(key),)))
    assert (await verifier.verify(_token(key)))["sub"] == "alice"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for token in (_token(other), _token(key, aud="elsewhere"), "a.b.c", "not-a-jwt"):
        with pytest.raises(Unauthenticated, match="missing or invalid credentials"):
            await verifier.verify(token)


async def test_an_unreachable_jwks_is_unavailable_and_a_malformed_token_refused(
    key: rsa.RSAPrivateKey,
) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"  # nothing listens there
    verifier = JwtVerifier(JwtSettings(ISSUER, AUDIENCE, jwks_url=url))
    with pytest.raises(Unavailable, match="signing keys could not be fetched"):
        await verifier.verify(_token(key))
    # Not a JWT: refused before any fetch.
    with pytest.raises(Unauthenticated, match="missing or invalid credentials"):
        await verifier.verify("a.b.c")


class _Claims:
    """A BearerVerifier that accepts any token with fixed claims."""

    tenant_claim = "trellis_tenant"
    roles_claim = "trellis_roles"

    def __init__(self, claims: dict[str, object]) -> None:
        self.claims = claims

    async def verify(self, token: str) -> dict[str, object]:
        return dict(self.claims)


async def test_a_jwt_without_a_tenant_claim_is_refused_not_the_system_tenant() -> None:
    from datetime import UTC, datetime

    from coordinator.errors import Unauthenticated
    from coordinator.service import Authenticator, KeyRing
    from coordinator.store import MemoryStore

    store = MemoryStore()
    claims: dict[str, object] = {"iss": "https://id", "sub": "mallory", "trellis_roles": ["admin"]}
    auth = Authenticator(
        store.identity,
        KeyRing([("k", "a-secret-of-enough-length")]),
        lambda: datetime.now(UTC),
        jwt=_Claims(claims),  # type: ignore[arg-type]
    )
    with pytest.raises(Unauthenticated):
        await auth.authenticate("a.b.c", None)
    auth = Authenticator(
        store.identity,
        KeyRing([("k", "a-secret-of-enough-length")]),
        lambda: datetime.now(UTC),
        jwt=_Claims({**claims, "trellis_tenant": "default"}),  # type: ignore[arg-type]
    )
    principal = await auth.authenticate("a.b.c", None)
    assert (principal.tenant_id, principal.subject) == ("default", "mallory")
