"""JWT bearer tokens from an OIDC issuer, checked with PyJWT: signature (keys from the
issuer's JWKS URL, cached, or from PEM files), ``exp``, ``nbf``, ``iss``, ``aud`` and ``sub``.

The service's ``Authenticator`` uses it through the ``BearerVerifier`` port; the claims
named by ``tenant_claim`` and ``roles_claim`` give the caller's tenant and roles.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import jwt

from coordinator.errors import Unauthenticated, Unavailable

log = logging.getLogger(__name__)

REFUSED = "missing or invalid credentials"


@dataclass(frozen=True)
class JwtSettings:
    """An OIDC issuer whose tokens are accepted. Keys from ``jwks_url`` or ``public_keys``
    (PEM); the tenant and roles come from the named claims."""

    issuer: str
    audience: str
    jwks_url: str = ""
    public_keys: tuple[str, ...] = ()
    tenant_claim: str = "trellis_tenant"
    roles_claim: str = "trellis_roles"
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway: float = 30.0


class JwtVerifier:
    """Checks signature, ``exp``, ``nbf``, ``iss``, ``aud`` and ``sub``."""

    def __init__(self, settings: JwtSettings) -> None:
        self._jwt = jwt
        self.settings = settings
        self.tenant_claim = settings.tenant_claim
        self.roles_claim = settings.roles_claim
        self._jwks = jwt.PyJWKClient(settings.jwks_url, lifespan=300) if settings.jwks_url else None

    async def verify(self, token: str) -> dict[str, Any]:
        jwt = self._jwt
        s = self.settings
        keys: list[Any]
        if self._jwks is not None:
            # The JWKS fetch is blocking I/O (cached after the first): off the event loop.
            try:
                keys = [(await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)).key]
            except jwt.PyJWKClientConnectionError as exc:
                log.warning("could not fetch the OIDC issuer's keys from %s: %s", s.jwks_url, exc)
                raise Unavailable(
                    "the identity provider's signing keys could not be fetched; retry later"
                ) from exc
            except jwt.PyJWTError as exc:
                # Not a JWT, or no published key has its kid: refused like any bad token
                # (not an internal error that names the kid it asked for).
                raise Unauthenticated(REFUSED) from exc
        else:
            keys = list(s.public_keys)
        last: Exception | None = None
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=list(s.algorithms),
                    audience=s.audience,
                    issuer=s.issuer,
                    leeway=s.leeway,
                    options={"require": ["exp", "iss", "aud", "sub"]},
                )
                return claims
            except jwt.PyJWTError as exc:
                last = exc
        raise Unauthenticated(REFUSED) from last
