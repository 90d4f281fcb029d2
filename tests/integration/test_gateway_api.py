"""The gateway app in process against an in-process coordinator (real gRPC socket)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest

from coordinator.signing import sign
from gateway import GatewayConfig, create_app
from tests.support.grpc_api import DIAMOND, Api, register
from tests.support.procs import ADMIN_KEY
from trellis.v1 import trigger_service_pb2 as tpb
from trellis.v1 import trigger_service_pb2_grpc as tgrpc
from trellis.v1 import workflow_service_pb2 as fpb

TOKEN = "events-token-0123456789"


async def gateway(api: Api, **settings: object) -> AsyncIterator[httpx.AsyncClient]:
    config = GatewayConfig(
        coordinator_address=api.address,
        api_key=ADMIN_KEY,
        **settings,  # type: ignore[arg-type]
    )
    app = create_app(config)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http,
    ):
        yield http


@pytest.fixture
async def http(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    async for client in gateway(api, events_token=TOKEN, max_body_bytes=1024):
        yield client


async def count(api: Api) -> int:
    reply = await api.workflows.ListExecutions(fpb.ListExecutionsRequest())
    return len(reply.executions)


async def test_events_endpoint_publishes_with_the_token(api: Api, http: httpx.AsyncClient) -> None:
    await register(api, DIAMOND)
    trigger = await tgrpc.TriggerServiceStub(api.channel).CreateEventTrigger(
        tpb.CreateEventTriggerRequest(
            event_name="paid", workflow_name="diamond", filter="event.amount > 10"
        )
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    reply = await http.post("/api/events/paid", content=b'{"amount": 50}', headers=auth)
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert [e["trigger_id"] for e in body["executions"]] == [trigger.trigger.id]
    assert body["filtered_out"] == 0

    keyed = {**auth, "Idempotency-Key": "pay-1"}
    first = (await http.post("/api/events/paid", content=b'{"amount": 50}', headers=keyed)).json()
    again = (await http.post("/api/events/paid", content=b'{"amount": 50}', headers=keyed)).json()
    assert first["executions"][0]["execution_id"] == again["executions"][0]["execution_id"]
    assert again["executions"][0]["created"] is False

    refused = [
        (await http.post("/api/events/paid", content=b"{}", headers={}), 401),
        (
            await http.post(
                "/api/events/paid", content=b"{}", headers={"Authorization": "Bearer nope"}
            ),
            401,
        ),
        (await http.post("/api/events/paid", content=b"[" * 2000, headers=auth), 413),
        (await http.post("/api/events/paid", content=b"{oops", headers=auth), 400),
    ]
    for response, status in refused:
        assert response.status_code == status, response.text
        assert response.json()["error"]
    assert await count(api) == 2


async def test_events_are_disabled_without_a_token(api: Api) -> None:
    async for http in gateway(api):
        reply = await http.post("/api/events/paid", content=b"{}")
        assert reply.status_code == 404
        assert reply.json() == {
            "error": "event publishing is disabled (set TRELLIS_GATEWAY_EVENTS_TOKEN)"
        }


async def test_webhook_through_the_gateway(api: Api, http: httpx.AsyncClient) -> None:
    await register(api, DIAMOND)
    secret = "gateway-secret-0123456789"
    await tgrpc.TriggerServiceStub(api.channel).CreateWebhookTrigger(
        tpb.CreateWebhookTriggerRequest(path="in", workflow_name="diamond", hmac_secret=secret)
    )
    body = b'{"n": 1}'
    headers = {"X-Trellis-Signature": sign(secret, body, int(time.time()))}
    ok = await http.post("/api/webhooks/in", content=body, headers=headers)
    assert ok.status_code == 202 and ok.json()["created"] is True
    # A chunked body (no Content-Length) past the limit is refused while it streams in.

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 200

    big = await http.post("/api/webhooks/in", content=chunks(), headers=headers)
    assert big.status_code == 413
    bad = await http.post(
        "/api/webhooks/in", content=body, headers={"X-Trellis-Signature": "t=1,v1=00"}
    )
    assert bad.status_code == 401 and "timestamp" in bad.json()["error"]
    assert await count(api) == 1
