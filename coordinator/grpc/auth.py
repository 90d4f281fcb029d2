"""One server interceptor: every call is authenticated, scoped to the caller's tenant,
checked against the permission its RPC needs, and (when it changes something) audited.

``RULES`` names, for every RPC of every Trellis service, the permission it needs, what it
acts on (for grants narrowed to workflow names or task types) and whether it is audited;
a test checks that no RPC is missing. The servicers read the caller with ``caller()``.

Not checked here: the gRPC health service (open, for Kubernetes probes). Reflection, when
enabled, needs any valid credential.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from coordinator.errors import NotFound, PermissionDenied, TrellisError, Unauthenticated
from coordinator.grpc.status import BEFORE_ERROR, status_for
from coordinator.model import AuditEntry, Permission, Principal
from coordinator.service import PENDING_AUDIT, Authenticator, Coordinator

log = logging.getLogger(__name__)

_CALLER: ContextVar[Principal] = ContextVar("trellis_caller")

REQUEST_ID_KEY = "x-request-id"


def caller() -> Principal:
    """The principal of the call being served (set by ``AuthInterceptor``)."""
    return _CALLER.get()


def tenant() -> str:
    return _CALLER.get().tenant_id


# What a narrowed grant is checked against, from the request: the workflow names or task
# types it names, or (for calls naming an execution or dead letter) a lookup.
Targets = Callable[[Any], Sequence[str]]


@dataclass(frozen=True)
class Rule:
    permission: Permission | None  # None: any authenticated caller
    targets: Targets | None = None
    # Calls naming an execution / a dead letter: its workflow name is looked up when the
    # caller's grant is narrowed.
    execution_field: str = ""
    dead_letter_field: str = ""
    audited: bool = False
    # Audit target: "<kind>/<request field>".
    target: tuple[str, str] = ("", "")


P = Permission


def _names(field: str) -> Targets:
    return lambda request: [getattr(request, field)]


def _list(field: str) -> Targets:
    return lambda request: list(getattr(request, field))


def _optional(field: str) -> Targets:
    return lambda request: [getattr(request, field)] if getattr(request, field) else []


def _filter_workflow(request: Any) -> Sequence[str]:
    """The workflows a filtered listing names: its ``workflow_name`` and its filter's."""
    return [n for n in {request.workflow_name, request.filter.workflow_name} if n]


def _execution(permission: Permission, audited: bool = False) -> Rule:
    return Rule(
        permission,
        execution_field="execution_id",
        audited=audited,
        target=("execution", "execution_id"),
    )


_W = "/trellis.v1.WorkerService/"
_F = "/trellis.v1.WorkflowService/"
_T = "/trellis.v1.TriggerService/"
_N = "/trellis.v1.NotificationService/"
_D = "/trellis.v1.DispatchService/"
_I = "/trellis.v1.IdentityService/"
_S = "/trellis.v1.SecretService/"

RULES: dict[str, Rule] = {
    # Workers. The data plane (poll, heartbeat, results) is not audited: the event history
    # records every attempt with its worker; registering is.
    _W + "RegisterWorker": Rule(
        P.TASKS_LEASE, _list("task_types"), audited=True, target=("worker", "worker_id")
    ),
    _W + "PollTasks": Rule(P.TASKS_LEASE, _list("task_types")),
    _W + "Heartbeat": Rule(P.TASKS_LEASE),
    _W + "CompleteTask": Rule(P.TASKS_LEASE, _list("task_types")),
    _W + "FailTask": Rule(P.TASKS_LEASE),
    _W + "ReportResults": Rule(P.TASKS_LEASE, _list("task_types")),
    # Workflows and executions.
    _F + "RegisterWorkflow": Rule(
        P.WORKFLOWS_REGISTER,
        lambda r: [r.definition.name],
        audited=True,
        target=("workflow", "definition.name"),
    ),
    _F + "GetWorkflow": Rule(P.WORKFLOWS_READ, _names("name")),
    _F + "ListWorkflows": Rule(P.WORKFLOWS_READ),
    _F + "ListWorkflowVersions": Rule(P.WORKFLOWS_READ, _names("name")),
    _F + "StartExecution": Rule(
        P.EXECUTIONS_START,
        _names("workflow_name"),
        audited=True,
        target=("workflow", "workflow_name"),
    ),
    _F + "BatchStartExecutions": Rule(
        P.EXECUTIONS_START,
        lambda r: sorted({x.workflow_name for x in r.requests}),
        audited=True,
        target=("workflows", ""),
    ),
    _F + "GetExecution": _execution(P.EXECUTIONS_READ),
    _F + "ListExecutions": Rule(P.EXECUTIONS_READ, _filter_workflow),
    _F + "WatchExecution": _execution(P.EXECUTIONS_READ),
    _F + "CancelExecution": _execution(P.EXECUTIONS_CANCEL, audited=True),
    _F + "CancelNode": _execution(P.EXECUTIONS_CANCEL, audited=True),
    _F + "PauseExecution": _execution(P.EXECUTIONS_PAUSE, audited=True),
    _F + "ResumeExecution": _execution(P.EXECUTIONS_PAUSE, audited=True),
    _F + "PauseNode": _execution(P.EXECUTIONS_PAUSE, audited=True),
    _F + "ResumeNode": _execution(P.EXECUTIONS_PAUSE, audited=True),
    _F + "ApproveNode": _execution(P.EXECUTIONS_APPROVE, audited=True),
    _F + "RejectNode": _execution(P.EXECUTIONS_APPROVE, audited=True),
    _F + "ListDeadLetters": Rule(P.DEAD_LETTERS_READ, _optional("workflow_name")),
    _F + "GetDeadLetter": Rule(P.DEAD_LETTERS_READ, dead_letter_field="id"),
    _F + "RedriveDeadLetter": Rule(
        P.DEAD_LETTERS_REDRIVE, dead_letter_field="id", audited=True, target=("dead_letter", "id")
    ),
    # Triggers, schedules, events.
    _T + "CreateWebhookTrigger": Rule(P.TRIGGERS_WRITE, audited=True, target=("webhook", "path")),
    _T + "ListWebhookTriggers": Rule(P.TRIGGERS_READ),
    _T + "DeleteWebhookTrigger": Rule(P.TRIGGERS_WRITE, audited=True, target=("webhook", "path")),
    _T + "FireWebhook": Rule(P.WEBHOOKS_FIRE, audited=True, target=("webhook", "path")),
    _T + "CreateSchedule": Rule(P.TRIGGERS_WRITE, audited=True, target=("schedule", "id")),
    _T + "GetSchedule": Rule(P.TRIGGERS_READ),
    _T + "ListSchedules": Rule(P.TRIGGERS_READ),
    _T + "PauseSchedule": Rule(P.TRIGGERS_WRITE, audited=True, target=("schedule", "id")),
    _T + "ResumeSchedule": Rule(P.TRIGGERS_WRITE, audited=True, target=("schedule", "id")),
    _T + "DeleteSchedule": Rule(P.TRIGGERS_WRITE, audited=True, target=("schedule", "id")),
    _T + "CreateEventTrigger": Rule(
        P.TRIGGERS_WRITE, audited=True, target=("event_trigger", "event_name")
    ),
    _T + "ListEventTriggers": Rule(P.TRIGGERS_READ),
    _T + "DeleteEventTrigger": Rule(P.TRIGGERS_WRITE, audited=True, target=("event_trigger", "id")),
    _T + "PublishEvent": Rule(P.EVENTS_PUBLISH, audited=True, target=("event", "name")),
    # Notifications.
    _N + "CreateChannel": Rule(
        P.NOTIFICATIONS_WRITE, audited=True, target=("channel", "channel.name")
    ),
    _N + "GetChannel": Rule(P.NOTIFICATIONS_READ),
    _N + "ListChannels": Rule(P.NOTIFICATIONS_READ),
    _N + "DeleteChannel": Rule(P.NOTIFICATIONS_WRITE, audited=True, target=("channel", "channel")),
    _N + "CreateNotificationRule": Rule(
        P.NOTIFICATIONS_WRITE, audited=True, target=("rule", "channel")
    ),
    _N + "ListNotificationRules": Rule(P.NOTIFICATIONS_READ),
    _N + "DeleteNotificationRule": Rule(P.NOTIFICATIONS_WRITE, audited=True, target=("rule", "id")),
    _N + "ListDeliveries": Rule(P.NOTIFICATIONS_READ),
    # Dispatch control.
    _D + "SetTaskTypeLimits": Rule(
        P.LIMITS_WRITE, audited=True, target=("limits", "limits.task_type")
    ),
    _D + "GetTaskTypeLimits": Rule(P.LIMITS_READ),
    _D + "ListTaskTypeLimits": Rule(P.LIMITS_READ),
    _D + "DeleteTaskTypeLimits": Rule(P.LIMITS_WRITE, audited=True, target=("limits", "task_type")),
    _D + "ListBreakers": Rule(P.LIMITS_READ),
    _D + "ResetBreaker": Rule(P.LIMITS_WRITE, audited=True, target=("breaker", "task_type")),
    _D + "GetDispatchStatus": Rule(P.LIMITS_READ),
    # Identity.
    _I + "WhoAmI": Rule(None),
    _I + "CreateTenant": Rule(P.TENANTS_WRITE, audited=True, target=("tenant", "id")),
    _I + "ListTenants": Rule(P.TENANTS_READ),
    _I + "CreateApiKey": Rule(P.KEYS_WRITE, audited=True, target=("key", "name")),
    _I + "AddCertificateIdentity": Rule(
        P.KEYS_WRITE, audited=True, target=("certificate", "subject")
    ),
    _I + "ListCredentials": Rule(P.KEYS_READ),
    _I + "RevokeCredential": Rule(P.KEYS_WRITE, audited=True, target=("credential", "id")),
    _I + "PutRole": Rule(P.ROLES_WRITE, audited=True, target=("role", "name")),
    _I + "ListRoles": Rule(P.ROLES_READ),
    _I + "DeleteRole": Rule(P.ROLES_WRITE, audited=True, target=("role", "name")),
    _I + "ListAuditRecords": Rule(P.AUDIT_READ),
    _I + "VerifyAudit": Rule(P.AUDIT_READ),
    # The secret store (values are write-only; the audit names the secret, never its value).
    _S + "SetSecret": Rule(P.SECRETS_WRITE, audited=True, target=("secret", "name")),
    _S + "ListSecrets": Rule(P.SECRETS_READ),
    _S + "DeleteSecret": Rule(P.SECRETS_WRITE, audited=True, target=("secret", "name")),
    _S + "RotateKey": Rule(P.SECRETS_ROTATE, audited=True, target=("encryption_key", "")),
}

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
_ANY_PRINCIPAL = Rule(None)  # reflection, when enabled


def bearer_of(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            return text[:128]
    return uuid.uuid4().hex


def certificate_cn(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The verified client certificate's common name (mutual TLS), if any."""
    names = list((context.auth_context() or {}).get("x509_common_name") or ())
    return names[0].decode() if names else None


def _field(request: Any, path: str) -> str:
    value: Any = request
    for part in path.split("."):
        value = getattr(value, part, "")
    return str(value)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, authorizes and audits every call (see the module doc).

    ``open_as``: run without authentication, every caller acting as this principal
    (``TRELLIS_INSECURE_OPEN``; only for local experiments)."""

    def __init__(
        self,
        authenticator: Authenticator,
        coordinator: Coordinator,
        *,
        open_as: Principal | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._c = coordinator
        self._open_as = open_as
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        # A grpc handler is a named tuple: _replace swaps its behaviour for a wrapped one.
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        # The same registered handler comes back for every call of a method: wrap it once.
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        rule = RULES.get(method, _ANY_PRINCIPAL)
        action = method.rsplit("/", 1)[-1]
        wrapped: grpc.RpcMethodHandler[Any, Any] = handler
        tupled: Any = handler
        if handler.unary_unary is not None:
            wrapped = tupled._replace(unary_unary=self._unary(handler.unary_unary, rule, action))
        elif handler.unary_stream is not None:
            wrapped = tupled._replace(unary_stream=self._stream(handler.unary_stream, rule, action))
        elif handler.stream_stream is not None:
            wrapped = tupled._replace(
                stream_stream=self._stream_stream(handler.stream_stream, rule)
            )
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    # -- wrappers ---------------------------------------------------------------------------

    def _unary(self, behaviour: Any, rule: Rule, action: str) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            principal = await self._admit(request, context, rule, action)
            token = _CALLER.set(principal)
            entry = self._audit_entry(principal, request, context, rule, action)
            if entry is None:
                try:
                    return await behaviour(request, context)
                finally:
                    _CALLER.reset(token)

            async def failed(code: grpc.StatusCode) -> None:
                # Before the error status leaves: a client that reads the trail right
                # after the refusal finds it there.
                if not entry.written:
                    entry.outcome = f"error: {code.name}"
                    await self._append(entry)

            audit_token = PENDING_AUDIT.set(entry)
            error_token = BEFORE_ERROR.set(failed)
            try:
                reply = await behaviour(request, context)
            except BaseException:
                await failed(context.code() or grpc.StatusCode.UNKNOWN)
                raise
            finally:
                BEFORE_ERROR.reset(error_token)
                PENDING_AUDIT.reset(audit_token)
                _CALLER.reset(token)
            if not entry.written:  # the call wrote nothing (an idempotent repeat, say)
                await self._append(entry)
            return reply

        return wrapped

    def _stream(self, behaviour: Any, rule: Rule, action: str) -> Any:
        async def admit(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
            return await self._admit(request, context, rule, action)

        return self._streaming(behaviour, admit)

    def _stream_stream(self, behaviour: Any, rule: Rule) -> Any:
        async def admit(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
            return await self._authenticate(context)

        return self._streaming(behaviour, admit)

    @staticmethod
    def _streaming(behaviour: Any, admit: Any) -> Any:
        """A streaming behaviour run as the principal ``admit`` returns (not audited: the
        streaming RPCs read)."""

        async def wrapped(arg: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = _CALLER.set(await admit(arg, context))
            try:
                async for item in behaviour(arg, context):
                    yield item
            finally:
                _CALLER.reset(token)

        return wrapped

    # -- checks -----------------------------------------------------------------------------

    async def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        if self._open_as is not None:
            return self._open_as
        metadata = context.invocation_metadata()
        try:
            return await self._authenticator.authenticate(
                bearer_of(metadata), certificate_cn(context)
            )
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise  # abort raises; for the type checker
        except TrellisError as exc:
            await context.abort(status_for(exc), str(exc))
            raise

    async def _admit(
        self,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        rule: Rule,
        action: str,
    ) -> Principal:
        principal = await self._authenticate(context)
        try:
            await self._authorize(principal, request, rule)
        except PermissionDenied as exc:
            if rule.audited:
                entry = self._audit_entry(principal, request, context, rule, action)
                assert entry is not None
                entry.outcome = "denied"
                await self._append(entry)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return principal

    async def _authorize(self, principal: Principal, request: Any, rule: Rule) -> None:
        permission = rule.permission
        if permission is None:
            return
        access = principal.access.get(permission)
        if access is None:
            raise PermissionDenied(
                f"permission denied: this call needs '{permission}', which the roles of "
                f"'{principal.subject}' ({', '.join(sorted(principal.roles)) or 'none'}) do "
                "not grant"
            )
        if access:  # held for every target
            return
        targets = await self._targets(principal, request, rule)
        if not targets:
            raise PermissionDenied(
                f"permission denied: '{permission}' is granted to '{principal.subject}' only "
                "for some names; name the workflow (or task types) in the request"
            )
        refused = [t for t in targets if not principal.allows(permission, t)]
        if refused:
            raise PermissionDenied(
                f"permission denied: '{permission}' is not granted for "
                f"{', '.join(repr(t) for t in refused)}"
            )

    async def _targets(self, principal: Principal, request: Any, rule: Rule) -> list[str]:
        if rule.targets is not None:
            return [t for t in rule.targets(request) if t]
        if rule.execution_field:
            view = await self._c.executions.get_execution(
                principal.tenant_id, getattr(request, rule.execution_field)
            )
            return [view.execution.workflow_name]
        if rule.dead_letter_field:
            letter = await self._c.dead_letters.get_dead_letter(
                principal.tenant_id, getattr(request, rule.dead_letter_field)
            )
            return [letter.workflow_name]
        return []

    # -- audit ------------------------------------------------------------------------------

    def _audit_entry(
        self,
        principal: Principal,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        rule: Rule,
        action: str,
    ) -> AuditEntry | None:
        if not rule.audited:
            return None
        kind, field = rule.target
        target = f"{kind}/{_field(request, field)}" if field else kind
        return AuditEntry(
            tenant_id=principal.tenant_id,
            actor=principal.subject,
            credential=principal.credential,
            action=action,
            target=target,
            request_id=_request_id(context.invocation_metadata()),
        )

    async def _append(self, entry: AuditEntry) -> None:
        entry.written = True
        try:
            await self._c.store.audit.append(entry, self._c.clock())
        except TrellisError:
            log.exception("could not append to the audit trail", extra={"action": entry.action})
