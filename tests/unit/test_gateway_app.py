"""Gateway settings for webhooks and events, and /readyz against a fake coordinator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.app import TRIGGER_SERVICE, create_app
from gateway.config import GatewayConfig, GatewayConfigError
from trellis.v1 import dispatch_service_pb2, dispatch_service_pb2_grpc


def test_webhook_settings_parse_and_the_token_is_not_shown() -> None:
    config = GatewayConfig.from_env(
        {
            "TRELLIS_GATEWAY_MAX_BODY_BYTES": "2048",
            "TRELLIS_GATEWAY_EVENTS_TOKEN": "tok-tok-tok",
            "TRELLIS_GATEWAY_RPC_TIMEOUT": "500ms",
        }
    )
    assert config.max_body_bytes == 2048
    assert config.rpc_timeout == 0.5
    assert config.events_token == "tok-tok-tok"
    assert "tok-tok-tok" not in repr(config)
    assert GatewayConfig.from_env({}).max_body_bytes == 1024 * 1024


@pytest.mark.parametrize("raw", ["0", "-1", "1MB", "x"])
def test_bad_body_limit_is_refused(raw: str) -> None:
    with pytest.raises(GatewayConfigError, match="TRELLIS_GATEWAY_MAX_BODY_BYTES"):
        GatewayConfig.from_env({"TRELLIS_GATEWAY_MAX_BODY_BYTES": raw})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("TRELLIS_GATEWAY_HEADER_TIMEOUT", "0"),
        ("TRELLIS_GATEWAY_HEADER_TIMEOUT", "soon"),
        ("TRELLIS_GATEWAY_BODY_TIMEOUT", "-1s"),
        ("TRELLIS_GATEWAY_BODY_TIMEOUT", "90000s"),
        ("TRELLIS_GATEWAY_MAX_CONNECTIONS", "0"),
        ("TRELLIS_GATEWAY_MAX_CONNECTIONS", "many"),
        ("TRELLIS_GATEWAY_MAX_CONNECTIONS", "9" * 400),
    ],
)
def test_bad_slow_client_and_connection_settings_are_refused(name: str, raw: str) -> None:
    with pytest.raises(GatewayConfigError, match=name):
        GatewayConfig.from_env({name: raw})


def test_slow_client_and_connection_settings_parse() -> None:
    config = GatewayConfig.from_env(
        {
            "TRELLIS_GATEWAY_HEADER_TIMEOUT": "500ms",
            "TRELLIS_GATEWAY_BODY_TIMEOUT": "2s",
            "TRELLIS_GATEWAY_MAX_CONNECTIONS": "64",
        }
    )
    assert (config.header_timeout, config.body_timeout, config.max_connections) == (0.5, 2.0, 64)


# -- /readyz and the coordinator's dispatch status -----------------------------------------


class FakeDispatchService(dispatch_service_pb2_grpc.DispatchServiceServicer):
    def __init__(self) -> None:
        self.reply = dispatch_service_pb2.GetDispatchStatusResponse()

    async def GetDispatchStatus(
        self, request: dispatch_service_pb2.GetDispatchStatusRequest, context: object
    ) -> dispatch_service_pb2.GetDispatchStatusResponse:
        return self.reply


@dataclass
class FakeCoordinator:
    address: str
    dispatch: FakeDispatchService | None


async def fake_coordinator(with_dispatch: bool) -> AsyncIterator[FakeCoordinator]:
    """Serves health (everything SERVING) and, unless it plays an older coordinator,
    DispatchService."""
    server = grpc.aio.server()
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    dispatch = FakeDispatchService() if with_dispatch else None
    if dispatch is not None:
        dispatch_service_pb2_grpc.add_DispatchServiceServicer_to_server(dispatch, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for name in ("", TRIGGER_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    try:
        yield FakeCoordinator(f"127.0.0.1:{port}", dispatch)
    finally:
        await server.stop(None)


async def readyz(coordinator: FakeCoordinator) -> httpx.Response:
    app = create_app(GatewayConfig(coordinator_address=coordinator.address))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http,
    ):
        return await http.get("/readyz")


@pytest.fixture
async def coordinator() -> AsyncIterator[FakeCoordinator]:
    async for fake in fake_coordinator(with_dispatch=True):
        yield fake


async def test_readyz_shows_shared_dispatch(coordinator: FakeCoordinator) -> None:
    assert coordinator.dispatch is not None
    coordinator.dispatch.reply = dispatch_service_pb2.GetDispatchStatusResponse(
        redis_configured=True, shared=True, detail="shared through redis://redis:6379/0"
    )
    reply = await readyz(coordinator)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["dispatch"] == {"shared": True, "detail": "shared through redis://redis:6379/0"}
    assert body["degraded"] == []
    assert body["status"] == "ready"


async def test_readyz_degrades_when_redis_is_configured_but_unreachable(
    coordinator: FakeCoordinator,
) -> None:
    assert coordinator.dispatch is not None
    detail = "per process: redis unreachable since 2026-11-22T10:00:00+00:00 (refused)"
    coordinator.dispatch.reply = dispatch_service_pb2.GetDispatchStatusResponse(
        redis_configured=True, shared=False, detail=detail
    )
    reply = await readyz(coordinator)
    assert reply.status_code == 200, "degraded, not unready"
    body = reply.json()
    assert body["status"] == "ready"
    assert body["dispatch"] == {"shared": False, "detail": detail}
    assert body["degraded"] == ["coordinator.dispatch"]


async def test_readyz_without_redis_is_not_degraded(coordinator: FakeCoordinator) -> None:
    assert coordinator.dispatch is not None
    coordinator.dispatch.reply = dispatch_service_pb2.GetDispatchStatusResponse(
        redis_configured=False, shared=False, detail="per process: TRELLIS_REDIS_URL is not set"
    )
    body = (await readyz(coordinator)).json()
    assert body["dispatch"]["shared"] is False
    assert body["degraded"] == []


async def test_readyz_leaves_dispatch_out_for_an_older_coordinator() -> None:
    async for older in fake_coordinator(with_dispatch=False):
        reply = await readyz(older)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert "dispatch" not in body
        assert body["degraded"] == []
        assert body["dependencies"] == {"coordinator": "SERVING", "coordinator.triggers": "SERVING"}


# -- the OpenAPI document and error shapes --------------------------------------------------


async def test_the_openapi_document_describes_every_route() -> None:
    app = create_app(GatewayConfig(max_body_bytes=4096))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http,
    ):
        reply = await http.get("/openapi.json")
        assert reply.status_code == 200
        document = reply.json()
        # Every route and method the app serves is documented, and nothing else.
        served = {
            (route.path.replace("{path:path}", "{path}"), method.lower())
            for route in app.routes
            for method in getattr(route, "methods", ()) or ()
            if method != "HEAD"
        }
        documented = {(path, method) for path, item in document["paths"].items() for method in item}
        assert served == documented
        assert document["openapi"].startswith("3.")
        assert "4096 bytes" in document["paths"]["/api/webhooks/{path}"]["post"]["description"]
        # Every documented error answer has the one error shape.
        for name, response in document["components"]["responses"].items():
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}, name

        missing = await http.get("/nope")
        assert missing.status_code == 404
        assert "no route for /nope" in missing.json()["error"]
        wrong_method = await http.get("/api/webhooks/orders")
        assert wrong_method.status_code == 405
        assert "GET is not allowed" in wrong_method.json()["error"]
