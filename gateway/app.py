"""The gateway's ASGI app (Starlette): ``/healthz`` and ``/readyz`` for Kubernetes probes.

``/healthz`` says the process is alive. ``/readyz`` asks the coordinator's standard gRPC
health service and answers 503 while it is unreachable or not serving, so a gateway pod
takes traffic only when it can hand work to a coordinator.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.config import GatewayConfig

log = logging.getLogger(__name__)


def create_app(config: GatewayConfig) -> Starlette:
    state: dict[str, grpc.aio.Channel] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["channel"] = grpc.aio.insecure_channel(config.coordinator_address)
        log.info("gateway up; coordinator at %s", config.coordinator_address)
        try:
            yield
        finally:
            await state["channel"].close()

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        stub = health_pb2_grpc.HealthStub(state["channel"])
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=config.ready_timeout
            )
        except grpc.aio.AioRpcError as exc:
            detail = f"unreachable: {exc.code().name}"
            return JSONResponse(
                {"status": "unready", "dependencies": {"coordinator": detail}}, status_code=503
            )
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return JSONResponse(
            {
                "status": "ready" if serving else "unready",
                "dependencies": {"coordinator": status_name},
            },
            status_code=200 if serving else 503,
        )

    return Starlette(
        routes=[Route("/healthz", healthz), Route("/readyz", readyz)], lifespan=lifespan
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
        )
    )
    await server.serve()
