"""The coordinator process: gRPC server, health, reflection, sweepers and graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.config import CoordinatorConfig
from coordinator.dispatch import DispatchControl, RedisLink
from coordinator.errors import TrellisError
from coordinator.grpc import (
    dispatch_servicer,
    identity_servicer,
    notification_servicer,
    secret_servicer,
)
from coordinator.grpc.auth import AuthInterceptor
from coordinator.grpc.identity_servicer import IdentityServicer
from coordinator.grpc.limits import LimitsInterceptor, RequestLimits
from coordinator.grpc.servicers import WorkerServicer, WorkflowServicer
from coordinator.grpc.tls import server_credentials
from coordinator.grpc.trigger_servicer import TriggerServicer
from coordinator.model import BUILTIN_ROLES, SYSTEM_TENANT, Principal
from coordinator.notify import Backoff, Deliverer, Destinations
from coordinator.oidc import JwtSettings, JwtVerifier
from coordinator.service import (
    Authenticator,
    Coordinator,
    DeliverySettings,
    KeyRing,
    LimitsAdmin,
    NotificationDispatcher,
    PollWaiters,
    Scheduler,
    Schedules,
    ServiceSettings,
    StartRate,
    Store,
    Sweeper,
    Triggers,
    WatchSlots,
    utcnow,
)
from trellis.v1 import (
    identity_service_pb2_grpc,
    notification_service_pb2_grpc,
    trigger_service_pb2,
    trigger_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

log = logging.getLogger(__name__)

# gRPC messages up to this size are sent (the Python SDK accepts 64 MiB too); a poll is
# capped so its tasks' payloads fit.
MAX_REPLY_BYTES = 64 * 1024 * 1024

SERVICE_NAMES = (
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name,
    trigger_service_pb2.DESCRIPTOR.services_by_name["TriggerService"].full_name,
    notification_servicer.SERVICE_NAME,
    dispatch_servicer.SERVICE_NAME,
    identity_servicer.SERVICE_NAME,
    secret_servicer.SERVICE_NAME,
)


@dataclass
class RunningServer:
    """A started coordinator; ``port`` is the bound port (useful with port 0)."""

    server: grpc.aio.Server
    coordinator: Coordinator
    dispatch: DispatchControl
    health: health.aio.HealthServicer
    port: int
    sweeper: asyncio.Task[None]
    grace: float
    # The cron scheduler loop (coordinator/service/_schedules.py).
    scheduler: asyncio.Task[None] | None = None
    # The notification delivery loop (coordinator/grpc/notification_servicer.py).
    notifications: NotificationRuntime | None = None

    async def stop(self) -> None:
        """Drain: refuse new polls, answer waiting ones, finish in-flight calls, then stop."""
        log.info("draining", extra={"grace_seconds": self.grace})
        await self.health.enter_graceful_shutdown()
        self.coordinator.begin_drain()
        await self.server.stop(self.grace)
        self.sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sweeper
        if self.scheduler is not None:
            self.scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.scheduler
        if self.notifications is not None:
            await self.notifications.stop()
        await self.dispatch.link.close()
        await self.coordinator.store.close()
        log.info("stopped")


# Health-service name that is SERVING while dispatch limits are shared through Redis and
# NOT_SERVING while this replica enforces them on its own (docs/dispatch.md).
DISPATCH_SHARED = "trellis.dispatch.shared"
# Health-service name that is SERVING when an encryption key is configured and NOT_SERVING
# when secrets are sealed with the key derived from the database (no protection against a
# copy of the database; docs/security.md).
ENCRYPTION_CONFIGURED = "trellis.encryption.configured"


async def start(config: CoordinatorConfig, store: Store) -> RunningServer:
    """Start serving on ``config.listen`` with an already opened store."""
    link = RedisLink(config.redis_url, retry_interval=config.redis_retry_interval)
    await link.start()
    dispatch = DispatchControl(
        store.limits,
        link=link,
        clock=utcnow,
        refresh=config.limits_refresh,
        claim_scan=config.claim_scan,
    )
    keyring = (
        KeyRing.parse(config.secret_keys)
        if config.secret_keys.strip()
        else KeyRing([("db", await store.identity.server_secret(secrets.token_urlsafe(32)))])
    )
    authenticator = Authenticator(
        store.identity,
        keyring,
        utcnow,
        bootstrap_key=config.bootstrap_admin_key,
        jwt=_jwt_verifier(config),
        cache_ttl=config.auth_cache_ttl.total_seconds(),
    )
    coordinator = Coordinator(
        store,
        ServiceSettings(
            max_payload_bytes=config.max_payload_bytes,
            poll_max_wait=config.poll_max_wait,
            heartbeat_interval=config.heartbeat_interval,
            worker_liveness_timeout=config.worker_liveness_timeout,
            max_reply_bytes=MAX_REPLY_BYTES,
            max_workflow_depth=config.max_workflow_depth,
            idempotency_window=config.idempotency_window,
            notify_destinations=notify_destinations(config),
        ),
        dispatch=dispatch,
        poll_waiters=PollWaiters(config.max_poll_waiters),
        start_rate=StartRate(config.max_start_rate, config.start_burst),
        watch_slots=WatchSlots(config.max_watches, config.max_watches_per_caller),
        keyring=keyring,
        authenticator=authenticator,
        secret_cache_ttl=config.secret_cache_ttl.total_seconds(),
    )
    encryption_configured = store.secrets.key_configured
    if not encryption_configured:
        log.warning(
            "NO ENCRYPTION KEY CONFIGURED (TRELLIS_ENCRYPTION_KEYS): secrets are encrypted "
            "with a key derived from the server secret stored in the same database, so a "
            "copy of the database decrypts them; set TRELLIS_ENCRYPTION_KEYS or "
            "TRELLIS_ENCRYPTION_KEYS_FILE and run `trellis secrets rotate-key`"
        )
    if config.insecure_open:
        log.warning(
            "AUTHENTICATION IS OFF (TRELLIS_INSECURE_OPEN): anyone who reaches %s acts as an "
            "admin of the default tenant",
            config.listen,
        )
    interceptor = AuthInterceptor(
        authenticator, coordinator, open_as=OPEN_PRINCIPAL if config.insecure_open else None
    )
    max_message = max(MAX_REPLY_BYTES, config.max_payload_bytes * 4 + 1024 * 1024)
    server = grpc.aio.server(
        # Limits first: a request past them is refused before it is authenticated.
        interceptors=[LimitsInterceptor(RequestLimits(config.max_payload_bytes)), interceptor],
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
        ],
    )
    worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(coordinator), server)
    workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(
        WorkflowServicer(coordinator),
        server,
    )
    schedules = Schedules(coordinator, store.triggers)
    trigger_service_pb2_grpc.add_TriggerServiceServicer_to_server(
        TriggerServicer(Triggers(coordinator, store.triggers), schedules), server
    )
    notification_service_pb2_grpc.add_NotificationServiceServicer_to_server(
        notification_servicer.NotificationServicer(coordinator.notifications), server
    )
    identity_service_pb2_grpc.add_IdentityServiceServicer_to_server(
        IdentityServicer(coordinator), server
    )
    notifications = _delivery_loop(coordinator, config)
    dispatch_servicer.add_dispatch(server, LimitsAdmin(store.limits, dispatch, coordinator.clock))
    secret_servicer.add_secrets(server, coordinator.secrets)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    try:
        if config.tls_cert_file:
            port = server.add_secure_port(config.listen, server_credentials(config))
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError as exc:
        port = 0
        cause: Exception | None = exc
    else:
        cause = None
    if port == 0:
        raise OSError(f"could not bind {config.listen}; is the port in use?") from cause
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(
        ENCRYPTION_CONFIGURED,
        health_pb2.HealthCheckResponse.SERVING
        if encryption_configured
        else health_pb2.HealthCheckResponse.NOT_SERVING,
    )

    def dispatch_health(shared: bool) -> None:
        serving = health_pb2.HealthCheckResponse
        status = serving.SERVING if shared else serving.NOT_SERVING
        asyncio.get_running_loop().create_task(health_servicer.set(DISPATCH_SHARED, status))

    dispatch_health(link.shared)
    link.on_change(dispatch_health)

    def on_wakeup(keys: list[str]) -> None:
        coordinator.rules.on_wakeup(keys)
        coordinator.notifier.notify(keys)

    await store.wakeups.listen_wakeups(on_wakeup)
    sweeper = asyncio.create_task(
        _sweep(Sweeper(coordinator), config.sweep_interval.total_seconds())
    )
    host = config.listen.rsplit(":", 1)[0]
    log.info("coordinator listening on %s:%d", host, port, extra={"port": port})
    scheduler = asyncio.create_task(Scheduler(schedules).run())
    notifications.start()
    return RunningServer(
        server,
        coordinator,
        dispatch,
        health_servicer,
        port,
        sweeper,
        config.shutdown_grace.total_seconds(),
        scheduler=scheduler,
        notifications=notifications,
    )


# Who every caller is when authentication is off (TRELLIS_INSECURE_OPEN).
OPEN_PRINCIPAL = Principal(
    SYSTEM_TENANT, "anonymous", "open", frozenset({"admin"}), BUILTIN_ROLES["admin"]
)


def _jwt_verifier(config: CoordinatorConfig) -> JwtVerifier | None:
    if not config.oidc_issuer:
        return None
    keys = (Path(config.oidc_public_key_file).read_text(),) if config.oidc_public_key_file else ()
    return JwtVerifier(
        JwtSettings(
            issuer=config.oidc_issuer,
            audience=config.oidc_audience,
            jwks_url=config.oidc_jwks_url,
            public_keys=keys,
            tenant_claim=config.oidc_tenant_claim,
            roles_claim=config.oidc_roles_claim,
        )
    )


def notify_destinations(config: CoordinatorConfig) -> Destinations:
    """Where notifications may go besides public addresses (docs/notifications.md)."""
    return Destinations.parse(config.notify_allow_hosts, config.notify_allow_networks)


def delivery_settings(config: CoordinatorConfig) -> DeliverySettings:
    return DeliverySettings(
        poll_interval=config.notify_poll_interval,
        max_attempts=config.notify_max_attempts,
        max_age=config.notify_max_age,
        backoff=Backoff(
            initial=config.notify_backoff_initial,
            maximum=config.notify_backoff_max,
            multiplier=config.notify_backoff_multiplier,
            jitter=config.notify_backoff_jitter,
        ),
        breaker_threshold=config.notify_breaker_threshold,
        breaker_reset=config.notify_breaker_reset,
        send_timeout=config.notify_send_timeout,
    )


class NotificationRuntime:
    """The delivery loop of one coordinator process: ``start`` after serving, ``stop``
    before closing the store. A delivery being sent when it stops is claimed until its
    lease passes, then sent again (by any replica)."""

    def __init__(self, dispatcher: NotificationDispatcher, deliverer: Deliverer) -> None:
        self.dispatcher = dispatcher
        self._deliverer = deliverer
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.dispatcher.run(), name="notifications")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._deliverer.aclose()


def _delivery_loop(coordinator: Coordinator, config: CoordinatorConfig) -> NotificationRuntime:
    settings = delivery_settings(config)
    deliverer = Deliverer(
        timeout=settings.send_timeout.total_seconds(),
        destinations=coordinator.settings.notify_destinations,
    )
    dispatcher = NotificationDispatcher(
        coordinator.store.notifications, deliverer, settings, clock=coordinator.clock
    )
    return NotificationRuntime(dispatcher, deliverer)


async def _sweep(sweeper: Sweeper, interval: float) -> None:
    """Run the sweepers every ``interval``. Safe on every replica at once (fenced)."""
    while True:
        try:
            await sweeper.sweep()
        except TrellisError as exc:
            log.warning("sweep failed: %s", exc)
        except Exception:
            log.exception("sweep failed")
        await asyncio.sleep(interval)


async def serve(
    config: CoordinatorConfig, *, on_started: Callable[[RunningServer], None] | None = None
) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    from coordinator.store import open_store

    config.check_serving()
    store = await open_store(
        config.database_url,
        migrate=config.auto_migrate,
        priority_aging=config.priority_aging,
        encryption_keys=config.encryption_key_text(),
    )
    try:
        running = await start(config, store)
    except BaseException:
        await store.close()
        raise
    if on_started is not None:
        on_started(running)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await running.stop()
