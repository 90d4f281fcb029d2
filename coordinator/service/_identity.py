"""Identity: who is calling (``Authenticator``) and the administration of tenants, API keys,
certificate identities and custom roles (``IdentityAdmin``). docs/security.md.

Credentials, in the order they are tried:

- an API key, ``authorization: Bearer tk_<id>.<secret>``: looked up by id, its secret
  compared with the stored keyed hash (HMAC-SHA256 under a ``KeyRing`` key);
- the bootstrap admin key (``TRELLIS_BOOTSTRAP_ADMIN_KEY``): an admin of the system tenant
  that is never stored, so that a new deployment can create its first keys;
- a JWT, ``authorization: Bearer <jwt>``, from the configured OIDC issuer (``JwtVerifier``);
- the mutual-TLS client certificate: its common name, registered by an admin as a
  certificate identity with a tenant and roles.

A resolved principal is cached for ``cache_ttl`` (a revoked key stops working on the replica
that revoked it at once, on the others within the TTL).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from coordinator.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from coordinator.model import (
    BUILTIN_ROLES,
    SYSTEM_TENANT,
    AuditRecord,
    Credential,
    CredentialKind,
    Grant,
    Principal,
    Role,
    Tenant,
    grants_of,
    parse_grants,
)
from coordinator.service._common import Clock, check_names, clamp_page_size
from coordinator.service.ports import AuditRepository, BearerVerifier, IdentityRepository

log = logging.getLogger(__name__)

API_KEY_PREFIX = "tk_"
# What every refusal says: nothing about which part was wrong.
REFUSED = "missing or invalid credentials"
_LAST_USED_EVERY = timedelta(minutes=1)
# Bounds on what admins name: tenant ids and role names are identifiers; free text (key
# names, certificate subjects) and lists (roles, permissions) are capped.
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_TEXT = 256
MAX_LIST = 100


def _identifier(what: str, value: str) -> None:
    if not _IDENTIFIER.fullmatch(value):
        raise InvalidArgument(
            f"{what} {value[:80]!r} is not valid: 1 to 63 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


class KeyRing:
    """The coordinator's secrets, by key id; the first signs, every one verifies (rotation).

    Keys for each purpose are derived (HMAC of the purpose under the secret), so one
    configured secret serves API-key hashes and lease signatures without reusing a key.
    """

    def __init__(self, secrets_by_id: Sequence[tuple[str, str]]) -> None:
        if not secrets_by_id:
            raise ValueError("a key ring needs at least one secret")
        self._secrets = dict(secrets_by_id)
        self.current = secrets_by_id[0][0]

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """``kid:secret,kid:secret`` (the first is current); a bare secret gets kid ``k1``."""
        pairs: list[tuple[str, str]] = []
        for n, part in enumerate(p.strip() for p in text.split(",") if p.strip()):
            kid, sep, secret = part.partition(":")
            if not sep:
                kid, secret = f"k{n + 1}", part
            if len(secret) < 16:
                raise InvalidArgument(
                    f"TRELLIS_SECRET_KEYS: the secret of key '{kid}' is shorter than 16 "
                    "characters; generate one with `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'`"
                )
            pairs.append((kid.strip(), secret.strip()))
        return cls(pairs)

    @property
    def ids(self) -> list[str]:
        return list(self._secrets)

    def key(self, purpose: str, kid: str | None = None) -> bytes | None:
        """The key for ``purpose`` under ``kid`` (default: the current one); None if unknown."""
        secret = self._secrets.get(kid or self.current)
        if secret is None:
            return None
        return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).digest()

    def mac(self, purpose: str, data: bytes, kid: str | None = None) -> str | None:
        key = self.key(purpose, kid)
        return None if key is None else hmac.new(key, data, hashlib.sha256).hexdigest()


def new_api_key() -> tuple[str, str, str]:
    """``(key id, secret, the key as shown once)``."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{API_KEY_PREFIX}{key_id}.{secret}"


def split_api_key(token: str) -> tuple[str, str] | None:
    if not token.startswith(API_KEY_PREFIX):
        return None
    key_id, sep, secret = token[len(API_KEY_PREFIX) :].partition(".")
    if not sep or not key_id or not secret:
        return None
    return key_id, secret


@dataclass
class _Cached:
    principal: Principal
    until: float


@dataclass
class Authenticator:
    """Turns a call's credentials into a ``Principal``; ``Unauthenticated`` otherwise."""

    identity: IdentityRepository
    keyring: KeyRing
    clock: Clock
    bootstrap_key: str = ""
    jwt: BearerVerifier | None = None
    cache_ttl: float = 5.0
    _cache: dict[bytes, _Cached] = field(default_factory=dict)
    _roles: dict[str, tuple[float, dict[str, frozenset[Grant]]]] = field(default_factory=dict)
    _bootstrap_digest: bytes = b""

    def __post_init__(self) -> None:
        if self.bootstrap_key:
            self._bootstrap_digest = hashlib.sha256(self.bootstrap_key.encode()).digest()

    async def authenticate(self, bearer: str | None, certificate_cn: str | None) -> Principal:
        if bearer:
            digest = hashlib.sha256(bearer.encode()).digest()
            cached = self._cache.get(digest)
            if cached is not None and cached.until > time.monotonic():
                return cached.principal
            principal = await self._from_bearer(bearer, digest)
            self._remember(digest, principal)
            return principal
        if certificate_cn:
            key = b"cert:" + certificate_cn.encode()
            cached = self._cache.get(key)
            if cached is not None and cached.until > time.monotonic():
                return cached.principal
            principal = await self._from_certificate(certificate_cn)
            self._remember(key, principal)
            return principal
        raise Unauthenticated(REFUSED)

    def forget(self, credential_id: str) -> None:
        """Drop cached principals of ``credential_id`` (revoked here: refused at once)."""
        for k, v in list(self._cache.items()):
            if v.principal.credential == credential_id:
                del self._cache[k]

    def forget_roles(self, tenant_id: str) -> None:
        self._roles.pop(tenant_id, None)
        for k, v in list(self._cache.items()):
            if v.principal.tenant_id == tenant_id:
                del self._cache[k]

    def _remember(self, key: bytes, principal: Principal) -> None:
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = _Cached(principal, time.monotonic() + self.cache_ttl)

    async def _from_bearer(self, bearer: str, digest: bytes) -> Principal:
        if self._bootstrap_digest and hmac.compare_digest(digest, self._bootstrap_digest):
            return Principal(
                SYSTEM_TENANT,
                "bootstrap-admin",
                "bootstrap",
                frozenset({"admin"}),
                BUILTIN_ROLES["admin"],
            )
        parts = split_api_key(bearer)
        if parts is not None:
            return await self._from_api_key(*parts)
        if self.jwt is not None and bearer.count(".") == 2:
            return await self._from_jwt(bearer)
        raise Unauthenticated(REFUSED)

    async def _from_api_key(self, key_id: str, secret: str) -> Principal:
        try:
            credential = await self.identity.get_credential(key_id)
        except NotFound:
            raise Unauthenticated(REFUSED) from None
        now = self.clock()
        if credential.kind is not CredentialKind.API_KEY or not credential.usable(now):
            raise Unauthenticated(REFUSED)
        expected = self.keyring.mac("api-key", secret.encode(), credential.hash_key_id)
        if expected is None:
            log.warning(
                "API key %s was hashed under key '%s', which TRELLIS_SECRET_KEYS no longer "
                "holds; keep retired keys listed after the current one",
                key_id,
                credential.hash_key_id,
            )
            raise Unauthenticated(REFUSED)
        if not hmac.compare_digest(expected, credential.secret_hash):
            raise Unauthenticated(REFUSED)
        if credential.last_used_at is None or now - credential.last_used_at > _LAST_USED_EVERY:
            await self.identity.touch_credential(key_id, now)
        return await self._principal(
            credential.tenant_id, credential.name, key_id, credential.roles
        )

    async def _from_certificate(self, cn: str) -> Principal:
        try:
            credential = await self.identity.find_certificate(cn)
        except NotFound:
            raise Unauthenticated(REFUSED) from None
        if not credential.usable(self.clock()):
            raise Unauthenticated(REFUSED)
        return await self._principal(
            credential.tenant_id, credential.name, credential.id, credential.roles
        )

    async def _from_jwt(self, token: str) -> Principal:
        assert self.jwt is not None
        claims = await self.jwt.verify(token)
        # No tenant claim is no tenant: never the system tenant by default, whose admins
        # reach every tenant.
        tenant = claims.get(self.jwt.tenant_claim)
        roles = claims.get(self.jwt.roles_claim) or []
        if isinstance(roles, str):
            roles = roles.split()
        if not isinstance(tenant, str) or not tenant or not isinstance(roles, list):
            raise Unauthenticated(REFUSED)
        if not await self.identity.tenant_exists(tenant):
            raise Unauthenticated(REFUSED)
        subject = str(claims["sub"])
        return await self._principal(
            tenant, subject, f"jwt:{claims['iss']}#{subject}", tuple(str(r) for r in roles)
        )

    async def _principal(
        self, tenant_id: str, subject: str, credential: str, roles: Sequence[str]
    ) -> Principal:
        custom = await self._custom_roles(tenant_id)
        return Principal(tenant_id, subject, credential, frozenset(roles), grants_of(roles, custom))

    async def _custom_roles(self, tenant_id: str) -> Mapping[str, frozenset[Grant]]:
        cached = self._roles.get(tenant_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        roles = {r.name: r.grants for r in await self.identity.list_roles(tenant_id)}
        self._roles[tenant_id] = (time.monotonic() + self.cache_ttl, roles)
        return roles


@dataclass(frozen=True)
class NewApiKey:
    credential: Credential
    key: str  # shown once; only its keyed hash is stored


class IdentityAdmin:
    """Tenants, API keys, certificate identities and custom roles.

    ``tenant_id`` arguments are the caller's tenant, or another one when the caller is an
    admin of the system tenant (``target_tenant``)."""

    def __init__(
        self,
        identity: IdentityRepository,
        audit: AuditRepository,
        keyring: KeyRing,
        authenticator: Authenticator,
        clock: Clock,
    ) -> None:
        self._audit = audit
        self._identity = identity
        self._keyring = keyring
        self._authenticator = authenticator
        self._clock = clock

    @staticmethod
    def target_tenant(caller: Principal, requested: str) -> str:
        """The tenant a call acts on: the caller's own, or (system tenant admins only) the
        one it names."""
        if not requested or requested == caller.tenant_id:
            return caller.tenant_id
        if caller.tenant_id != SYSTEM_TENANT:
            raise PermissionDenied(
                "tenant: only principals of the system tenant may act on another tenant; "
                "leave tenant empty to act on your own"
            )
        return requested

    async def create_tenant(self, caller: Principal, tenant_id: str) -> Tenant:
        _identifier("tenant id", tenant_id)
        tenant = Tenant(tenant_id, self._clock(), caller.subject)
        await self._identity.create_tenant(tenant)
        return tenant

    async def list_tenants(self) -> list[Tenant]:
        return await self._identity.list_tenants()

    async def create_api_key(
        self,
        caller: Principal,
        tenant_id: str,
        name: str,
        roles: Sequence[str],
        expires_in: timedelta | None = None,
    ) -> NewApiKey:
        tenant_id = self.target_tenant(caller, tenant_id)
        await self._check_roles(tenant_id, roles)
        check_names(name=name)
        if len(name) > MAX_TEXT:
            raise InvalidArgument(f"key name is {len(name)} characters; at most {MAX_TEXT}")
        key_id, secret, shown = new_api_key()
        now = self._clock()
        mac = self._keyring.mac("api-key", secret.encode())
        assert mac is not None
        credential = Credential(
            id=key_id,
            tenant_id=tenant_id,
            kind=CredentialKind.API_KEY,
            name=name or key_id,
            roles=tuple(roles),
            created_at=now,
            created_by=caller.subject,
            secret_hash=mac,
            hash_key_id=self._keyring.current,
            expires_at=None if expires_in is None else now + expires_in,
        )
        await self._identity.create_credential(credential)
        return NewApiKey(credential, shown)

    async def add_certificate(
        self, caller: Principal, tenant_id: str, subject: str, roles: Sequence[str]
    ) -> Credential:
        tenant_id = self.target_tenant(caller, tenant_id)
        if len(subject) > MAX_TEXT:
            raise InvalidArgument(f"subject is {len(subject)} characters; at most {MAX_TEXT}")
        if not subject:
            raise InvalidArgument("subject is empty; give the client certificate's common name")
        await self._check_roles(tenant_id, roles)
        credential = Credential(
            id="cert-" + secrets.token_hex(6),
            tenant_id=tenant_id,
            kind=CredentialKind.CERTIFICATE,
            name=subject,
            roles=tuple(roles),
            created_at=self._clock(),
            created_by=caller.subject,
            subject=subject,
        )
        await self._identity.create_credential(credential)
        return credential

    async def list_credentials(self, caller: Principal, tenant_id: str) -> list[Credential]:
        return await self._identity.list_credentials(self.target_tenant(caller, tenant_id))

    async def revoke(self, caller: Principal, tenant_id: str, credential_id: str) -> None:
        tenant_id = self.target_tenant(caller, tenant_id)
        await self._identity.revoke_credential(tenant_id, credential_id, self._clock())
        self._authenticator.forget(credential_id)

    async def put_role(
        self, caller: Principal, tenant_id: str, name: str, grants: Sequence[str]
    ) -> Role:
        tenant_id = self.target_tenant(caller, tenant_id)
        _identifier("role name", name)
        if len(grants) > MAX_LIST:
            raise InvalidArgument(f"{len(grants)} permissions; a role has at most {MAX_LIST}")
        if name in BUILTIN_ROLES:
            raise InvalidArgument(
                f"'{name}' is a built-in role and cannot be changed; choose another name"
            )
        try:
            parsed = parse_grants(grants)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if not parsed:
            raise InvalidArgument("a role needs at least one permission")
        role = Role(tenant_id, name, parsed)
        await self._identity.put_role(role)
        self._authenticator.forget_roles(tenant_id)
        return role

    async def list_roles(self, caller: Principal, tenant_id: str) -> list[Role]:
        tenant_id = self.target_tenant(caller, tenant_id)
        builtin = [Role(tenant_id, n, g) for n, g in BUILTIN_ROLES.items()]
        return builtin + await self._identity.list_roles(tenant_id)

    async def delete_role(self, caller: Principal, tenant_id: str, name: str) -> None:
        tenant_id = self.target_tenant(caller, tenant_id)
        if name in BUILTIN_ROLES:
            raise InvalidArgument(f"'{name}' is a built-in role and cannot be deleted")
        await self._identity.delete_role(tenant_id, name)
        self._authenticator.forget_roles(tenant_id)

    async def audit_records(
        self,
        caller: Principal,
        tenant_id: str,
        *,
        since: datetime | None = None,
        actor: str | None = None,
        after_seq: int = 0,
        page_size: int = 0,
    ) -> list[AuditRecord]:
        return await self._audit.list_records(
            self.target_tenant(caller, tenant_id),
            since=since,
            actor=actor,
            after_seq=after_seq,
            limit=clamp_page_size(page_size),
        )

    async def verify_audit(self, caller: Principal, tenant_id: str) -> tuple[int, str | None]:
        return await self._audit.verify(self.target_tenant(caller, tenant_id))

    async def _check_roles(self, tenant_id: str, roles: Sequence[str]) -> None:
        if len(roles) > MAX_LIST:
            raise InvalidArgument(f"{len(roles)} roles; a credential has at most {MAX_LIST}")
        if not roles:
            raise InvalidArgument(
                "roles is empty; give at least one role (admin, operator, developer, "
                "viewer, worker, gateway or a custom role)"
            )
        if not await self._identity.tenant_exists(tenant_id):
            raise NotFound(f"tenant '{tenant_id}' does not exist; create it first")
        custom = {r.name for r in await self._identity.list_roles(tenant_id)}
        unknown = [r for r in roles if r not in BUILTIN_ROLES and r not in custom]
        if unknown:
            raise InvalidArgument(
                f"unknown role {', '.join(unknown)}; built-in roles are "
                f"{', '.join(BUILTIN_ROLES)}, custom roles of this tenant: "
                f"{', '.join(sorted(custom)) or 'none'}"
            )
