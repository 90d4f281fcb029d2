"""The gateway's ASGI app (Starlette): probes, webhooks and event publishing.

- ``GET /healthz``: the process is alive.
- ``GET /readyz``: asks the coordinator's standard gRPC health service; 503 while it is
  unreachable or not serving. The JSON lists each dependency and which are degraded, and
  ``dispatch`` (``GetDispatchStatus``: whether limits and breakers are shared through
  Redis); Redis configured but unreachable degrades ``coordinator.dispatch`` (still 200).
- ``POST /api/webhooks/{path}``: hands the path, headers and raw body to the coordinator's
  ``FireWebhook`` (signatures and tokens are checked there: secrets never reach the
  gateway); 202 ``{"execution_id", "created"}``.
- ``POST /api/events/{name}``: ``PublishEvent``, guarded by the bearer token in
  ``TRELLIS_GATEWAY_EVENTS_TOKEN`` (404 when unset).
- ``POST /api/executions/{execution_id}/nodes/{node_id}/approve`` (or ``/reject``), body
  ``{"comment": "..."}``: decides an approval node as the caller, whose own Trellis
  credential (``Authorization: Bearer <key or JWT>``) is passed on to the coordinator,
  which checks it (401 without one, 403 without the node's role); 200
  ``{"execution_id", "status", "node_status"}``.

- ``GET /openapi.json``: the OpenAPI 3.1 document of these routes (``gateway._openapi``).

Webhook bodies are forwarded as raw bytes, never parsed here: the coordinator verifies the
signature or token first; event bodies too, after the events token: the coordinator
parses every payload with one strict decoder (no NaN/Infinity, huge numbers or deep
nesting: 400). Only an approval's ``{"comment"}`` is read here. Slow and excess
connections are handled by the protocol (``gateway._server``).

Errors answer JSON ``{"error": "..."}``: 413 over ``TRELLIS_GATEWAY_MAX_BODY_BYTES``, 408
when the body does not arrive within ``TRELLIS_GATEWAY_BODY_TIMEOUT``, 400 for a body that
is not JSON the gateway accepts, 401 for a bad signature or token, 404 for an unknown path,
409 for a replayed signed webhook, 503 with ``Retry-After`` when the coordinator cannot be
reached. The gateway talks to the
coordinator over gRPC only, with its own credential (``TRELLIS_GATEWAY_API_KEY``, a key with
the ``gateway`` role: fire webhooks, publish events) and over TLS when
``TRELLIS_GATEWAY_CA_FILE`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway._openapi import openapi_document
from gateway._server import guarded_protocol
from gateway.config import GatewayConfig
from trellis.v1 import (
    common_pb2,
    dispatch_service_pb2,
    dispatch_service_pb2_grpc,
    trigger_service_pb2,
    trigger_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from worker_sdk._channel import open_channel

log = logging.getLogger(__name__)

# Seconds a client should wait before retrying when the coordinator is unreachable.
RETRY_AFTER_SECONDS = 5
TRIGGER_SERVICE = trigger_service_pb2.DESCRIPTOR.services_by_name["TriggerService"].full_name

# gRPC status → HTTP status for webhook and event calls.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,
    grpc.StatusCode.UNIMPLEMENTED: 503,
}


_NODE_PATH = "/api/executions/{execution_id}/nodes/{node_id}"


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


def _error(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else {}
    if status == 408:
        headers["Connection"] = "close"  # the rest of a slow body is not waited for
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


async def _read_body(request: Request, limit: int, within: float) -> bytes:
    """The body, refused past ``limit`` by its Content-Length and while it streams in, and
    when it has not all arrived within ``within`` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(within):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _TooLarge
                chunks.append(chunk)
    except TimeoutError:
        raise _TooSlow from None
    return b"".join(chunks)


def _rpc_error(exc: grpc.aio.AioRpcError, what: str) -> JSONResponse:
    code = exc.code()
    status = _HTTP_STATUS.get(code, 502)
    if status == 503:
        log.warning("%s: coordinator unavailable (%s)", what, code.name)
        return _error(503, "the coordinator is unavailable; retry later")
    return _error(status, exc.details() or code.name)


def create_app(config: GatewayConfig) -> Starlette:
    state: dict[str, grpc.aio.Channel] = {}

    async def body_of(request: Request) -> bytes | JSONResponse:
        """The request's body, or the error answer when it is too large, too slow or cut."""
        try:
            return await _read_body(request, config.max_body_bytes, config.body_timeout)
        except _TooLarge:
            return _error(413, f"the body is larger than {config.max_body_bytes} bytes")
        except _TooSlow:
            return _error(
                408,
                f"the body did not arrive within {config.body_timeout:g}s "
                "(TRELLIS_GATEWAY_BODY_TIMEOUT)",
            )
        except ClientDisconnect:
            return _error(400, "the client disconnected before sending the whole body")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["channel"] = open_channel(config.connection)
        # Calls made for a person (approvals) carry that person's credential, not the
        # gateway's: a channel without one, the caller's sent per call.
        state["people"] = open_channel(replace(config.connection, api_key=""))
        log.info("gateway up; coordinator at %s", config.coordinator_address)
        try:
            yield
        finally:
            await state["channel"].close()
            await state["people"].close()

    def triggers() -> trigger_service_pb2_grpc.TriggerServiceAsyncStub:
        return trigger_service_pb2_grpc.TriggerServiceStub(state["channel"])

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        stub = health_pb2_grpc.HealthStub(state["channel"])
        dependencies: dict[str, str] = {}
        for name, service in (("coordinator", ""), ("coordinator.triggers", TRIGGER_SERVICE)):
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=config.ready_timeout
                )
            except grpc.aio.AioRpcError as exc:
                dependencies[name] = f"unreachable: {exc.code().name}"
                if name == "coordinator":
                    break
            else:
                dependencies[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        degraded = [n for n, status in dependencies.items() if status != "SERVING"]
        ready = dependencies.get("coordinator") == "SERVING"
        body: dict[str, object] = {
            "status": "ready" if ready else "unready",
            "dependencies": dependencies,
        }
        dispatch = await dispatch_status() if ready else None
        if dispatch is not None:
            body["dispatch"] = {"shared": dispatch.shared, "detail": dispatch.detail}
            if dispatch.redis_configured and not dispatch.shared:
                # Limits hold per replica until Redis is back: degraded, still ready.
                degraded.append("coordinator.dispatch")
        body["degraded"] = sorted(degraded)
        body["events_endpoint"] = "enabled" if config.events_token else "disabled"
        return JSONResponse(body, status_code=200 if ready else 503)

    async def dispatch_status() -> dispatch_service_pb2.GetDispatchStatusResponse | None:
        """None when the coordinator does not answer it (an older version, or gone)."""
        stub = dispatch_service_pb2_grpc.DispatchServiceStub(state["channel"])
        try:
            reply: dispatch_service_pb2.GetDispatchStatusResponse = await stub.GetDispatchStatus(
                dispatch_service_pb2.GetDispatchStatusRequest(), timeout=config.ready_timeout
            )
        except grpc.aio.AioRpcError as exc:
            log.debug("readiness: no dispatch status (%s)", exc.code().name)
            return None
        return reply

    async def webhook(request: Request) -> JSONResponse:
        path = request.path_params["path"]
        body = await body_of(request)
        if isinstance(body, JSONResponse):
            return body
        # Forwarded as raw bytes, unparsed: the coordinator verifies the signature or token
        # first, and only then parses the body (400 when it is not JSON it accepts).
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        try:
            reply = await triggers().FireWebhook(
                trigger_service_pb2.FireWebhookRequest(path=path, headers=headers, body=body),
                timeout=config.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            return _rpc_error(exc, f"webhook {path}")
        return JSONResponse(
            {"execution_id": reply.execution_id, "created": reply.created}, status_code=202
        )

    async def event(request: Request) -> JSONResponse:
        if not config.events_token:
            return _error(404, "event publishing is disabled (set TRELLIS_GATEWAY_EVENTS_TOKEN)")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        wanted = hashlib.sha256(config.events_token.encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, wanted):
            return _error(401, "missing or wrong Authorization: Bearer <token>")
        body = await body_of(request)
        if isinstance(body, JSONResponse):
            return body
        name = request.path_params["name"]
        try:
            reply = await triggers().PublishEvent(
                trigger_service_pb2.PublishEventRequest(
                    name=name,
                    payload=body,
                    idempotency_key=request.headers.get("idempotency-key", ""),
                ),
                timeout=config.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            return _rpc_error(exc, f"event {name}")
        return JSONResponse(
            {
                "executions": [
                    {
                        "trigger_id": e.trigger_id,
                        "execution_id": e.execution_id,
                        "created": e.created,
                    }
                    for e in reply.executions
                ],
                "failures": [
                    {"trigger_id": f.trigger_id, "error": f.message} for f in reply.failures
                ],
                "filtered_out": reply.filtered_out,
            },
            status_code=202,
        )

    def decide(decision: str) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def endpoint(request: Request) -> JSONResponse:  # Starlette awaits async defs
            return await _decide(request, decision)

        return endpoint

    async def _decide(request: Request, decision: str) -> JSONResponse:
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return _error(401, "missing Authorization: Bearer <your Trellis API key or token>")
        body = await body_of(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            doc = json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError):
            return _error(400, 'the body must be a JSON object like {"comment": "..."}')
        comment = doc.get("comment", "") if isinstance(doc, dict) else None
        if not isinstance(comment, str):
            return _error(400, 'the body must be a JSON object like {"comment": "..."}')
        execution_id = request.path_params["execution_id"]
        node_id = request.path_params["node_id"]
        stub = workflow_service_pb2_grpc.WorkflowServiceStub(state["people"])
        metadata = (("authorization", f"Bearer {credential.strip()}"),)
        reply: workflow_service_pb2.ApproveNodeResponse | workflow_service_pb2.RejectNodeResponse
        try:
            if decision == "approve":
                reply = await stub.ApproveNode(
                    workflow_service_pb2.ApproveNodeRequest(
                        execution_id=execution_id, node_id=node_id, comment=comment
                    ),
                    timeout=config.rpc_timeout,
                    metadata=metadata,
                )
            else:
                reply = await stub.RejectNode(
                    workflow_service_pb2.RejectNodeRequest(
                        execution_id=execution_id, node_id=node_id, comment=comment
                    ),
                    timeout=config.rpc_timeout,
                    metadata=metadata,
                )
        except grpc.aio.AioRpcError as exc:
            return _rpc_error(exc, f"approval {execution_id}/{node_id}")
        nodes = {n.node_id: common_pb2.NodeStatus.Name(n.status) for n in reply.execution.nodes}
        return JSONResponse(
            {
                "execution_id": reply.execution.id,
                "status": common_pb2.ExecutionStatus.Name(reply.execution.status),
                "node_status": nodes.get(node_id, ""),
            }
        )

    document = openapi_document(config)

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(document)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return _error(404, f"no route for {request.url.path}; see GET /openapi.json")
        if exc.status_code == 405:
            return JSONResponse(
                {"error": f"{request.method} is not allowed on {request.url.path}"},
                status_code=405,
                headers=exc.headers,
            )
        return _error(exc.status_code, str(exc.detail))

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return _error(500, "internal error in the gateway; see its log")

    return Starlette(
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        routes=[
            Route("/healthz", healthz),
            Route("/openapi.json", openapi),
            Route("/readyz", readyz),
            Route("/api/webhooks/{path:path}", webhook, methods=["POST"]),
            Route("/api/events/{name}", event, methods=["POST"]),
            *(
                Route(f"{_NODE_PATH}/{d}", decide(d), methods=["POST"])
                for d in ("approve", "reject")
            ),
        ],
        lifespan=lifespan,
    )


async def serve(config: GatewayConfig) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn drains in-flight requests first), then return.

    uvicorn re-raises the stop signal once it has shut down; with these handlers in place
    that is a no-op, so a graceful stop ends the process with status 0 like the others.
    """
    import signal

    import uvicorn

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)

    host, port = config.host_port
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            http=guarded_protocol(
                header_timeout=config.header_timeout,
                body_timeout=config.body_timeout,
                max_connections=config.max_connections,
            ),
        )
    )
    await server.serve()
