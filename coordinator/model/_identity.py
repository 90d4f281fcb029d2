"""Who may do what: principals, credentials, roles and permissions (docs/security.md).

A caller's credential (an API key, a JWT, a client certificate) resolves to a ``Principal``:
its tenant, its name and its roles. A role is a set of ``Grant``s; a grant names one
permission and, optionally, a pattern narrowing it to workflow names (for the workflow and
execution permissions) or to task types (``tasks.lease``). ``Principal.allows`` answers
one question: may this principal use this permission, on this target?

Pure data and pure rules: the service resolves credentials and roles, the gRPC layer asks
``allows`` before each call.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from coordinator.model._core import DEFAULT_TENANT

# The tenant whose admins administer the coordinator itself (create tenants, keys in any
# tenant). `trellis dev` and the bootstrap key act in it.
SYSTEM_TENANT = DEFAULT_TENANT


class Permission(StrEnum):
    """One permission per group of RPCs; docs/security.md lists which RPC needs which."""

    # Workers: register, poll, heartbeat, complete, fail (narrowed by task type).
    TASKS_LEASE = "tasks.lease"
    # Workflow definitions (narrowed by workflow name).
    WORKFLOWS_READ = "workflows.read"
    WORKFLOWS_REGISTER = "workflows.register"
    # Executions (narrowed by workflow name).
    EXECUTIONS_READ = "executions.read"
    EXECUTIONS_START = "executions.start"
    EXECUTIONS_CANCEL = "executions.cancel"
    EXECUTIONS_PAUSE = "executions.pause"
    EXECUTIONS_APPROVE = "executions.approve"
    DEAD_LETTERS_READ = "dead_letters.read"
    DEAD_LETTERS_REDRIVE = "dead_letters.redrive"
    # Triggers, schedules and events.
    TRIGGERS_READ = "triggers.read"
    TRIGGERS_WRITE = "triggers.write"
    EVENTS_PUBLISH = "events.publish"
    WEBHOOKS_FIRE = "webhooks.fire"
    # Notification channels, rules and deliveries.
    NOTIFICATIONS_READ = "notifications.read"
    NOTIFICATIONS_WRITE = "notifications.write"
    # Task-type limits and circuit breakers.
    LIMITS_READ = "limits.read"
    LIMITS_WRITE = "limits.write"
    # Identity: credentials, roles, the audit trail; tenants (system tenant only).
    KEYS_READ = "keys.read"
    KEYS_WRITE = "keys.write"
    ROLES_READ = "roles.read"
    ROLES_WRITE = "roles.write"
    AUDIT_READ = "audit.read"
    TENANTS_READ = "tenants.read"
    TENANTS_WRITE = "tenants.write"
    # The secret store: list names, set and delete values (values are never read back:
    # only a worker leasing a task whose config references a secret receives it).
    SECRETS_READ = "secrets.read"
    SECRETS_WRITE = "secrets.write"
    # Re-encrypt every stored secret under the current key (system tenant only).
    SECRETS_ROTATE = "secrets.rotate"


# Permissions that a grant may narrow by workflow name, and the one narrowed by task type.
WORKFLOW_SCOPED = frozenset(
    {
        Permission.WORKFLOWS_READ,
        Permission.WORKFLOWS_REGISTER,
        Permission.EXECUTIONS_READ,
        Permission.EXECUTIONS_START,
        Permission.EXECUTIONS_CANCEL,
        Permission.EXECUTIONS_PAUSE,
        Permission.EXECUTIONS_APPROVE,
        Permission.DEAD_LETTERS_READ,
        Permission.DEAD_LETTERS_REDRIVE,
    }
)
TASK_TYPE_SCOPED = frozenset({Permission.TASKS_LEASE})
# Only principals of the system tenant hold these, whatever their roles say.
SYSTEM_ONLY = frozenset(
    {Permission.TENANTS_READ, Permission.TENANTS_WRITE, Permission.SECRETS_ROTATE}
)


@dataclass(frozen=True)
class Grant:
    """``permission`` on targets matching ``pattern`` (fnmatch; ``*`` = everything).

    Written ``permission`` or ``permission:pattern``, e.g. ``executions.start:orders-*``
    or ``tasks.lease:email.*``.
    """

    permission: Permission
    pattern: str = "*"

    @classmethod
    def parse(cls, text: str) -> Grant:
        name, _, pattern = text.strip().partition(":")
        try:
            permission = Permission(name)
        except ValueError:
            known = ", ".join(p.value for p in Permission)
            raise ValueError(f"unknown permission '{name}'; known permissions: {known}") from None
        pattern = pattern.strip() or "*"
        if pattern != "*" and permission not in WORKFLOW_SCOPED | TASK_TYPE_SCOPED:
            raise ValueError(
                f"permission '{name}' cannot be narrowed by a pattern; only workflow and "
                "execution permissions (by workflow name) and tasks.lease (by task type) can"
            )
        return cls(permission, pattern)

    def __str__(self) -> str:
        return self.permission.value if self.pattern == "*" else f"{self.permission}:{self.pattern}"

    def covers(self, target: str | None) -> bool:
        return self.pattern == "*" or (
            target is not None and fnmatch.fnmatchcase(target, self.pattern)
        )


def _grants(*permissions: Permission) -> frozenset[Grant]:
    return frozenset(Grant(p) for p in permissions)


_READ = (
    Permission.WORKFLOWS_READ,
    Permission.EXECUTIONS_READ,
    Permission.DEAD_LETTERS_READ,
    Permission.TRIGGERS_READ,
    Permission.NOTIFICATIONS_READ,
    Permission.LIMITS_READ,
)

# The built-in roles of every tenant. Custom roles (per tenant) are sets of grants too.
BUILTIN_ROLES: Mapping[str, frozenset[Grant]] = {
    "admin": _grants(*Permission),
    "operator": _grants(
        *_READ,
        Permission.EXECUTIONS_START,
        Permission.EXECUTIONS_CANCEL,
        Permission.EXECUTIONS_PAUSE,
        Permission.EXECUTIONS_APPROVE,
        Permission.DEAD_LETTERS_REDRIVE,
        Permission.TRIGGERS_WRITE,
        Permission.EVENTS_PUBLISH,
        Permission.WEBHOOKS_FIRE,
        Permission.NOTIFICATIONS_WRITE,
        Permission.LIMITS_WRITE,
        Permission.AUDIT_READ,
        Permission.SECRETS_READ,
        Permission.SECRETS_WRITE,
    ),
    "developer": _grants(
        *_READ,
        Permission.WORKFLOWS_REGISTER,
        Permission.EXECUTIONS_START,
        Permission.EXECUTIONS_CANCEL,
        Permission.EXECUTIONS_PAUSE,
        Permission.TRIGGERS_WRITE,
        Permission.EVENTS_PUBLISH,
        Permission.NOTIFICATIONS_WRITE,
        Permission.SECRETS_READ,
    ),
    "viewer": _grants(*_READ),
    "worker": _grants(Permission.TASKS_LEASE),
    # The gateway's own credential: fire webhooks, publish events.
    "gateway": _grants(Permission.WEBHOOKS_FIRE, Permission.EVENTS_PUBLISH),
}


def parse_grants(texts: Iterable[str]) -> frozenset[Grant]:
    """Grants from their written form; ValueError names the first bad one."""
    return frozenset(Grant.parse(t) for t in texts if t.strip())


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    ``credential`` identifies the credential used (an API key id, ``jwt:<issuer>#<sub>``,
    ``cert:<CN>``); lease tokens and worker ids are bound to it.
    """

    tenant_id: str
    subject: str
    credential: str
    roles: frozenset[str]
    grants: frozenset[Grant]

    def allows(self, permission: Permission, target: str | None = None) -> bool:
        """May this principal use ``permission`` on ``target`` (a workflow name or task
        type; None: without a target, which only unnarrowed grants cover)?"""
        if permission in SYSTEM_ONLY and self.tenant_id != SYSTEM_TENANT:
            return False
        return any(g.permission is permission and g.covers(target) for g in self.grants)

    def holds(self, permission: Permission) -> bool:
        """Does any grant (narrowed or not) give ``permission``?"""
        if permission in SYSTEM_ONLY and self.tenant_id != SYSTEM_TENANT:
            return False
        return any(g.permission is permission for g in self.grants)

    @functools.cached_property
    def access(self) -> dict[Permission, bool]:
        """Each permission held: True when for every target, False when only for some
        (narrowed). What the interceptor asks on every call, computed once per principal."""
        out: dict[Permission, bool] = {}
        for grant in self.grants:
            if grant.permission in SYSTEM_ONLY and self.tenant_id != SYSTEM_TENANT:
                continue
            out[grant.permission] = out.get(grant.permission, False) or grant.pattern == "*"
        return out

    def narrowed(self, permission: Permission) -> bool:
        """True when ``permission`` is held only for some targets (so each target must be
        checked), False when it is held for every target or not at all."""
        mine = [g for g in self.grants if g.permission is permission]
        return bool(mine) and all(g.pattern != "*" for g in mine)


def grants_of(
    roles: Iterable[str], custom: Mapping[str, frozenset[Grant]] | None = None
) -> frozenset[Grant]:
    """The grants of ``roles``: built-in ones, then the tenant's custom ones; unknown role
    names give nothing (a role deleted after a key named it)."""
    found: set[Grant] = set()
    for role in roles:
        found |= BUILTIN_ROLES.get(role) or (custom or {}).get(role, frozenset())
    return frozenset(found)


class CredentialKind(StrEnum):
    API_KEY = "api_key"
    CERTIFICATE = "certificate"


@dataclass(frozen=True)
class Credential:
    """A stored credential: an API key (only its keyed hash is kept) or a client
    certificate's common name, with the tenant and roles it acts with."""

    id: str
    tenant_id: str
    kind: CredentialKind
    name: str
    roles: tuple[str, ...]
    created_at: datetime
    created_by: str = ""
    # API keys: the hash of the secret part and the id of the key that keyed it.
    secret_hash: str = ""
    hash_key_id: str = ""
    # Certificates: the common name the client certificate must carry.
    subject: str = ""
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

    def usable(self, now: datetime) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True)
class Role:
    """A custom role of one tenant."""

    tenant_id: str
    name: str
    grants: frozenset[Grant] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Tenant:
    id: str
    created_at: datetime
    created_by: str = ""


@dataclass
class AuditEntry:
    """One mutating call to record: who, in which tenant, did what to what, and how it
    ended. The gRPC layer opens one per call; the store appends it in the transaction that
    carries the call's effect (``written`` then turns True), or on its own afterwards."""

    tenant_id: str
    actor: str  # the principal's subject
    credential: str
    action: str  # the RPC's name, e.g. "CancelExecution"
    target: str  # what it acted on, e.g. "execution/8f2c..." ("" when nothing in particular)
    request_id: str
    outcome: str = "ok"  # ok | denied | error: <status code name>
    written: bool = False


@dataclass(frozen=True)
class AuditRecord:
    """A stored ``AuditEntry``: numbered per tenant and chained by hash to the one before
    (``hash = sha256(prev_hash + canonical fields)``), so that a changed, removed or
    inserted row breaks the chain (``trellis audit verify``)."""

    tenant_id: str
    seq: int
    at: datetime
    actor: str
    credential: str
    action: str
    target: str
    outcome: str
    request_id: str
    prev_hash: str
    hash: str


def audit_hash(
    prev_hash: str,
    tenant_id: str,
    seq: int,
    at_ms: int,
    entry_fields: tuple[str, str, str, str, str, str],
) -> str:
    """The chain hash of one record: its predecessor's hash and its own fields
    (actor, credential, action, target, outcome, request_id) with its time in epoch ms."""
    body = json.dumps([prev_hash, tenant_id, seq, at_ms, *entry_fields], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()
