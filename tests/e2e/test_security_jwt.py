"""OIDC bearer tokens against a real coordinator process whose keys come from a JWKS
endpoint served here (http.server on 127.0.0.1): a valid token acts with the tenant and
roles of its claims; every malformed, expired, misdirected, foreign or unsigned token is
refused UNAUTHENTICATED with the same message; a key added to the JWKS later is picked up.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.support.grpc_api import channel_to, expect_status
from tests.support.procs import ADMIN_KEY, spawn_coordinator
from tests.support.wait import wait_for
from trellis.v1 import identity_service_pb2 as ipb
from trellis.v1 import identity_service_pb2_grpc as igrpc
from trellis.v1 import workflow_service_pb2 as fpb
from trellis.v1 import workflow_service_pb2_grpc as fgrpc
from worker_sdk import Client, Workflow

pytestmark = pytest.mark.e2e

ISSUER = "https://login.example.test/realms/trellis"
AUDIENCE = "trellis-api"
REFUSED = "missing or invalid credentials"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


@dataclass
class Jwks:
    """The key set the endpoint serves (changed by the test) and how often it was read."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    fetches: int = 0


@contextlib.contextmanager
def jwks_endpoint(jwks: Jwks) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"keys": jwks.keys}).encode()
            jwks.fetches += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/.well-known/jwks.json"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def claims(**changes: Any) -> dict[str, Any]:
    """A viewer of tenant acme; ``changes`` replace claims (None: leave the claim out)."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice@example.test",
        "iat": now,
        "exp": now + 300,
        "trellis_tenant": "acme",
        "trellis_roles": ["viewer"],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def signed(key: rsa.RSAPrivateKey, kid: str | None, **changes: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**changes), key, algorithm="RS256", headers=headers)


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def unsigned(kid: str | None) -> str:
    """``alg: none``: a header, the claims and an empty signature."""
    header = {"alg": "none", "typ": "JWT", **({"kid": kid} if kid else {})}
    return f"{_b64(header)}.{_b64(claims())}."


def hmac_with_public_key(key: rsa.RSAPrivateKey, kid: str) -> str:
    """Algorithm confusion: HS256 keyed with the issuer's public key (which anyone has)."""
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{_b64(claims())}"
    mac = hmac.new(pem, head.encode(), hashlib.sha256).digest()
    return f"{head}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


@dataclass
class Caller:
    workflows: fgrpc.WorkflowServiceStub
    identity: igrpc.IdentityServiceStub


@dataclass
class Oidc:
    address: str
    jwks: Jwks
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def caller(self, token: str) -> Caller:
        channel = channel_to(self.address, token)
        self.channels.append(channel)
        return Caller(fgrpc.WorkflowServiceStub(channel), igrpc.IdentityServiceStub(channel))


@contextlib.asynccontextmanager
async def oidc_coordinator(db_url: str, tmp_path: Path, jwks: Jwks) -> AsyncIterator[Oidc]:
    """A coordinator trusting ISSUER's tokens for AUDIENCE, its keys from ``jwks``; tenant
    acme exists, with a workflow "reports"."""
    with jwks_endpoint(jwks) as url:
        coordinator, address = spawn_coordinator(
            db_url,
            tmp_path,
            oidc_issuer=ISSUER,
            oidc_audience=AUDIENCE,
            oidc_jwks_url=url,
        )
        o = Oidc(address, jwks)
        try:
            admin = o.caller(ADMIN_KEY)
            await admin.identity.CreateTenant(ipb.CreateTenantRequest(id="acme"))
            developer = await admin.identity.CreateApiKey(
                ipb.CreateApiKeyRequest(tenant="acme", name="acme-dev", roles=["developer"])
            )
            async with Client(address, api_key=developer.key) as acme:
                wf = Workflow("reports")
                wf.node("build", "render")
                await acme.register_workflow(wf)
            yield o
        finally:
            for channel in o.channels:
                await channel.close()
            exit_code = coordinator.stop()
    assert exit_code == 0, coordinator.output()[-3000:]


async def test_jwt_tenant_roles_and_refusals(db_url: str, tmp_path: Path) -> None:
    issuer_key, other_key = new_key(), new_key()
    jwks = Jwks([public_jwk(issuer_key, "k1")])
    async with oidc_coordinator(db_url, tmp_path, jwks) as o:
        viewer = o.caller(signed(issuer_key, "k1"))
        me = await viewer.identity.WhoAmI(ipb.WhoAmIRequest())
        assert (me.tenant, me.subject, list(me.roles)) == ("acme", "alice@example.test", ["viewer"])
        assert me.credential == f"jwt:{ISSUER}#alice@example.test"
        listed = await viewer.workflows.ListWorkflows(fpb.ListWorkflowsRequest())
        assert [w.name for w in listed.workflows] == ["reports"]
        await expect_status(
            viewer.workflows.StartExecution(fpb.StartExecutionRequest(workflow_name="reports")),
            grpc.StatusCode.PERMISSION_DENIED,
            "needs 'executions.start'",
        )

        now = int(time.time())
        refused = {
            "expired": signed(issuer_key, "k1", exp=now - 120, iat=now - 600),
            "not yet valid": signed(issuer_key, "k1", nbf=now + 600),
            "wrong audience": signed(issuer_key, "k1", aud="another-api"),
            "wrong issuer": signed(issuer_key, "k1", iss="https://evil.example.test/"),
            "no subject": signed(issuer_key, "k1", sub=None),
            "no expiry": signed(issuer_key, "k1", exp=None),
            "another key, the issuer's kid": signed(other_key, "k1"),
            "another key, its own kid": signed(other_key, "rogue"),
            "another key, no kid": signed(other_key, None),
            "unknown tenant": signed(issuer_key, "k1", trellis_tenant="nobody"),
            "alg none with the issuer's kid": unsigned("k1"),
            "alg none without a kid": unsigned(None),
            "HS256 keyed with the public key": hmac_with_public_key(issuer_key, "k1"),
            "not a JWT": "a.b.c",
        }
        outcomes = {}
        for what, token in refused.items():
            caller = o.caller(token)
            try:
                await caller.workflows.ListWorkflows(fpb.ListWorkflowsRequest())
                outcomes[what] = "OK"
            except grpc.aio.AioRpcError as exc:
                outcomes[what] = f"{exc.code().name}: {exc.details()}"
        assert outcomes == dict.fromkeys(refused, f"UNAUTHENTICATED: {REFUSED}")

        # Nothing was started, and the coordinator still serves the valid token.
        admin = o.caller(ADMIN_KEY)
        runs = await admin.workflows.ListExecutions(fpb.ListExecutionsRequest())
        assert list(runs.executions) == []
        again = await o.caller(signed(issuer_key, "k1")).identity.WhoAmI(ipb.WhoAmIRequest())
        assert again.tenant == "acme"


@pytest.mark.slow
async def test_a_key_added_to_the_jwks_is_picked_up(tmp_path: Path) -> None:
    old_key, new = new_key(), new_key()
    jwks = Jwks([public_jwk(old_key, "2026-01")])
    async with oidc_coordinator(f"sqlite:///{tmp_path}/trellis.db", tmp_path, jwks) as o:
        await o.caller(signed(old_key, "2026-01")).identity.WhoAmI(ipb.WhoAmIRequest())
        assert jwks.fetches == 1
        # The issuer rotates: the new key is published, tokens are signed with it.
        jwks.keys = [public_jwk(new, "2026-07"), public_jwk(old_key, "2026-01")]
        added = time.monotonic()
        token = signed(new, "2026-07")

        async def accepted() -> bool:
            try:
                me = await o.caller(token).identity.WhoAmI(ipb.WhoAmIRequest())
            except grpc.aio.AioRpcError as exc:
                # Not yet fetched: refused like any unknown key, never an internal error.
                assert (exc.code(), exc.details()) == (UNAUTHENTICATED, REFUSED)
                return False
            return me.tenant == "acme"

        # PyJWKClient refetches the set for an unknown kid at most once per cooldown (30 s
        # after its last fetch), so the new key may take that long.
        await wait_for(accepted, timeout=60, interval=2)
        assert jwks.fetches == 2
        assert time.monotonic() - added < 45
        # The old key still verifies (it is still published).
        await o.caller(signed(old_key, "2026-01")).identity.WhoAmI(ipb.WhoAmIRequest())
