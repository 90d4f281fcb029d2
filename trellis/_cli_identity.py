"""``trellis keys|certs|roles|tenants|audit|whoami``: IdentityService from the shell
(docs/security.md). Hooked into ``trellis.cli`` by ``add_parser``."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from google.protobuf import timestamp_pb2

from trellis._cli_rpc import Usage, doc, output_flag, print_json, runner, table
from trellis.v1 import identity_service_pb2 as ipb
from trellis.v1 import identity_service_pb2_grpc as igrpc
from worker_sdk._duration import parse_duration

TIMEOUT = 30.0

if TYPE_CHECKING:
    Stub = igrpc.IdentityServiceAsyncStub

_run = runner(igrpc.IdentityServiceStub)


def _when(ts: timestamp_pb2.Timestamp, present: bool) -> str:
    return ts.ToJsonString() if present else "-"


def _credential_row(c: ipb.Credential) -> tuple[str, ...]:
    state = "revoked" if c.HasField("revoked_at") else "active"
    expired = c.HasField("expires_at") and c.expires_at.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)
    if state == "active" and expired:
        state = "expired"
    return (
        c.id,
        c.kind,
        c.name,
        ",".join(c.roles),
        state,
        _when(c.expires_at, c.HasField("expires_at")),
        _when(c.last_used_at, c.HasField("last_used_at")),
    )


_CREDENTIAL_HEADER = ("ID", "KIND", "NAME", "ROLES", "STATE", "EXPIRES", "LAST USED")


async def _keys_create(stub: Stub, a: argparse.Namespace) -> int:
    request = ipb.CreateApiKeyRequest(tenant=a.tenant or "", name=a.name, roles=a.role)
    if a.expires_in:
        try:
            request.expires_in.FromTimedelta(parse_duration(a.expires_in, what="--expires-in"))
        except ValueError as exc:
            raise Usage(str(exc)) from exc
    reply = await stub.CreateApiKey(request, timeout=TIMEOUT)
    if a.output == "json":
        print_json({"credential": doc(reply.credential), "key": reply.key})
        return 0
    print(reply.key)
    print(
        f"key {reply.credential.id} ({', '.join(reply.credential.roles)}) in tenant "
        f"{reply.credential.tenant}: shown once, store it now (TRELLIS_API_KEY)",
        file=sys.stderr,
    )
    return 0


async def _keys_list(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.ListCredentials(
        ipb.ListCredentialsRequest(tenant=a.tenant or ""), timeout=TIMEOUT
    )
    if a.output == "json":
        print_json([doc(c) for c in reply.credentials])
        return 0
    table(_CREDENTIAL_HEADER, [_credential_row(c) for c in reply.credentials])
    return 0


async def _keys_revoke(stub: Stub, a: argparse.Namespace) -> int:
    await stub.RevokeCredential(
        ipb.RevokeCredentialRequest(tenant=a.tenant or "", id=a.id), timeout=TIMEOUT
    )
    print(f"{a.id} revoked")
    return 0


async def _certs_add(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.AddCertificateIdentity(
        ipb.AddCertificateIdentityRequest(tenant=a.tenant or "", subject=a.subject, roles=a.role),
        timeout=TIMEOUT,
    )
    if a.output == "json":
        print_json(doc(reply.credential))
    else:
        table(_CREDENTIAL_HEADER, [_credential_row(reply.credential)])
    return 0


async def _roles_put(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.PutRole(
        ipb.PutRoleRequest(tenant=a.tenant or "", name=a.name, permissions=a.permission),
        timeout=TIMEOUT,
    )
    if a.output == "json":
        print_json(doc(reply.role))
    else:
        print(f"role {reply.role.name}: {' '.join(reply.role.permissions)}")
    return 0


async def _roles_list(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.ListRoles(ipb.ListRolesRequest(tenant=a.tenant or ""), timeout=TIMEOUT)
    if a.output == "json":
        print_json([doc(r) for r in reply.roles])
        return 0
    table(
        ("ROLE", "KIND", "PERMISSIONS"),
        [
            (r.name, "built-in" if r.builtin else "custom", " ".join(r.permissions))
            for r in reply.roles
        ],
    )
    return 0


async def _roles_delete(stub: Stub, a: argparse.Namespace) -> int:
    await stub.DeleteRole(
        ipb.DeleteRoleRequest(tenant=a.tenant or "", name=a.name), timeout=TIMEOUT
    )
    print(f"role {a.name} deleted")
    return 0


async def _tenants_create(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.CreateTenant(ipb.CreateTenantRequest(id=a.id), timeout=TIMEOUT)
    print(f"tenant {reply.tenant.id} created")
    return 0


async def _tenants_list(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.ListTenants(ipb.ListTenantsRequest(), timeout=TIMEOUT)
    if a.output == "json":
        print_json([doc(t) for t in reply.tenants])
        return 0
    table(
        ("TENANT", "CREATED", "BY"),
        [(t.id, t.created_at.ToJsonString(), t.created_by or "-") for t in reply.tenants],
    )
    return 0


def _since(raw: str | None) -> timestamp_pb2.Timestamp | None:
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        try:
            when = datetime.now(UTC) - parse_duration(raw, what="--since")
        except ValueError:
            raise Usage(
                f"--since {raw!r} is neither a time (2026-12-01T10:00:00Z) nor a duration "
                "ago (30m, 24h)"
            ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    return ts


async def _audit_list(stub: Stub, a: argparse.Namespace) -> int:
    request = ipb.ListAuditRecordsRequest(
        tenant=a.tenant or "", actor=a.actor or "", page_size=a.limit
    )
    since = _since(a.since)
    if since is not None:
        request.since.CopyFrom(since)
    records: list[Any] = []
    while True:
        reply = await stub.ListAuditRecords(request, timeout=TIMEOUT)
        records.extend(reply.records)
        if len(reply.records) < (a.limit or 100) or not a.all:
            break
        request.after_seq = reply.records[-1].seq
    if a.output == "json":
        print_json([doc(r) for r in records])
        return 0
    table(
        ("SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME"),
        [
            (str(r.seq), r.time.ToJsonString(), r.actor, r.action, r.target, r.outcome)
            for r in records
        ],
    )
    return 0


async def _audit_verify(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.VerifyAudit(ipb.VerifyAuditRequest(tenant=a.tenant or ""), timeout=TIMEOUT)
    if reply.ok:
        print(f"audit trail intact: {reply.seq} records, every hash matches")
        return 0
    print(f"audit trail BROKEN at record {reply.seq}: {reply.problem}")
    return 1


async def _whoami(stub: Stub, a: argparse.Namespace) -> int:
    reply = await stub.WhoAmI(ipb.WhoAmIRequest(), timeout=TIMEOUT)
    if a.output == "json":
        print_json(doc(reply))
        return 0
    print(f"tenant       {reply.tenant}")
    print(f"subject      {reply.subject}")
    print(f"credential   {reply.credential}")
    print(f"roles        {', '.join(reply.roles)}")
    print(f"permissions  {' '.join(reply.permissions)}")
    return 0


def _tenant_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tenant", help="another tenant than your own (admins of the system tenant only)"
    )


def _command(
    sub: Any, name: str, help: str, func: Any, *, tenant: bool = True, output: bool = True
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    if tenant:
        _tenant_flag(p)
    if output:
        output_flag(p)
    p.set_defaults(func=_run(func))
    return p


def add_parser(sub: Any) -> None:
    """Add the identity commands to the CLI's subcommands."""
    keys = sub.add_parser("keys", help="API keys of a tenant")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = _command(keys_sub, "create", "create an API key (printed once)", _keys_create)
    create.add_argument("--name", default="", help="what the key is for, e.g. billing-worker")
    create.add_argument(
        "--role",
        action="append",
        required=True,
        help="a role (repeatable): admin, operator, developer, viewer, worker, gateway or custom",
    )
    create.add_argument(
        "--expires-in", metavar="DURATION", help="e.g. 90d or 720h (default: never)"
    )
    _command(keys_sub, "list", "API keys and certificate identities", _keys_list)
    revoke = _command(keys_sub, "revoke", "revoke a key or certificate identity", _keys_revoke)
    revoke.add_argument("id")

    certs = sub.add_parser("certs", help="client-certificate identities (mutual TLS)")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    add = _command(certs_sub, "add", "accept a client certificate by common name", _certs_add)
    add.add_argument("subject", metavar="COMMON_NAME")
    add.add_argument("--role", action="append", required=True, help="a role (repeatable)")

    roles = sub.add_parser("roles", help="built-in and custom roles")
    roles_sub = roles.add_subparsers(dest="roles_command", required=True, metavar="ACTION")
    put = _command(roles_sub, "put", "create or replace a custom role", _roles_put)
    put.add_argument("name")
    put.add_argument(
        "--permission",
        action="append",
        required=True,
        help="permission[:pattern] (repeatable), e.g. executions.start:orders-*",
    )
    _command(roles_sub, "list", "every role with its permissions", _roles_list)
    rdel = _command(roles_sub, "delete", "delete a custom role", _roles_delete, output=False)
    rdel.add_argument("name")

    tenants = sub.add_parser("tenants", help="tenants (admins of the system tenant)")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")
    tcreate = _command(
        tenants_sub, "create", "create a tenant", _tenants_create, tenant=False, output=False
    )
    tcreate.add_argument("id")
    _command(tenants_sub, "list", "every tenant", _tenants_list, tenant=False)

    audit = sub.add_parser("audit", help="the hash-chained audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    alist = _command(audit_sub, "list", "audit records, oldest first", _audit_list)
    alist.add_argument("--since", help="a time (RFC 3339) or a duration ago (30m, 24h)")
    alist.add_argument("--actor", help="only this subject's calls")
    alist.add_argument("--limit", type=int, default=100, help="records per page (100)")
    alist.add_argument("--all", action="store_true", help="every page, not only the first")
    _command(audit_sub, "verify", "check the hash chain", _audit_verify, output=False)

    _command(sub, "whoami", "who the coordinator takes you for", _whoami, tenant=False)
