"""Size limits on every request: one table, one checker, applied to every RPC in one place.

Every string, bytes, repeated and map field of every request message (and of the messages
inside it, to any depth) has a limit: the defaults below, or an entry of ``OVERRIDES``
(keyed by the field's full protobuf name). ``bytes`` fields are JSON payloads and keep the
payload limit (``TRELLIS_MAX_PAYLOAD_BYTES``). A request past a limit is refused with
``INVALID_ARGUMENT`` naming the field, before authentication and before any work::

    PollTasksRequest.task_types: 100000 entries, at most 256

``RequestLimits`` walks a message along a plan precomputed once per message type: only the
fields that can hold something to check are visited, and a message type with nothing to
check (``Duration``, ``Timestamp``, a request of numbers) is not visited at all.
``LimitsInterceptor`` applies it to every method, and turns a request that does not decode
into ``INVALID_ARGUMENT`` too (gRPC's own answer would be ``INTERNAL``).

docs/protocol.md lists the limits (``limits_table()``; a test keeps them equal).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError

from coordinator.errors import InvalidArgument
from trellis.v1 import (
    dispatch_service_pb2,
    identity_service_pb2,
    notification_service_pb2,
    secret_service_pb2,
    trigger_service_pb2,
    worker_service_pb2,
    workflow_service_pb2,
)

log = logging.getLogger(__name__)

_SERVICE_MODULES = (
    dispatch_service_pb2,
    identity_service_pb2,
    notification_service_pb2,
    secret_service_pb2,
    trigger_service_pb2,
    worker_service_pb2,
    workflow_service_pb2,
)

# Defaults: every field not named in OVERRIDES.
MAX_STRING = 1024  # characters of a string field (and of each element of a repeated one)
MAX_REPEATED = 1000  # entries of a repeated field
MAX_MAP = 100  # entries of a map field (keys and values are strings within MAX_STRING)

_ID = 256  # identifiers: worker ids, task types, names

# Per-field limits, by the field's full protobuf name. For a string or bytes field: its
# size; for a repeated or map field: its entry count (``ELEMENTS`` below sets the size of
# each string element or map value where it differs from the default).
OVERRIDES: dict[str, int] = {
    # Workers: a worker serves a few task types; ids are short.
    "trellis.v1.RegisterWorkerRequest.worker_id": _ID,
    "trellis.v1.RegisterWorkerRequest.task_types": 256,
    "trellis.v1.RegisterWorkerRequest.labels": 64,
    "trellis.v1.PollTasksRequest.worker_id": _ID,
    "trellis.v1.PollTasksRequest.task_types": 256,
    "trellis.v1.HeartbeatRequest.worker_id": _ID,
    "trellis.v1.CompleteTaskRequest.worker_id": _ID,
    "trellis.v1.CompleteTaskRequest.task_types": 256,
    "trellis.v1.FailTaskRequest.worker_id": _ID,
    "trellis.v1.ReportResultsRequest.worker_id": _ID,
    "trellis.v1.ReportResultsRequest.task_types": 256,
    # A failure's message is clipped when stored (to 8,192); a stack trace may be long.
    "trellis.v1.TaskError.message": 256 * 1024,
    # Definitions (and the expansions a task adds): the registration limits.
    "trellis.v1.WorkflowDefinition.nodes": 1000,
    "trellis.v1.WorkflowDefinition.edges": 10_000,
    "trellis.v1.WorkflowDefinition.description": 4096,
    "trellis.v1.DagExpansion.nodes": 1000,
    "trellis.v1.DagExpansion.edges": 10_000,
    # CEL expressions (compiled on registration, at most 4,096 characters) and prompts.
    "trellis.v1.NodeDefinition.skip_if": 4096,
    "trellis.v1.NodeDefinition.input": 4096,
    "trellis.v1.NodeDefinition.output": 4096,
    "trellis.v1.NodeDefinition.items": 4096,
    "trellis.v1.NodeDefinition.prompt": 4096,
    "trellis.v1.SwitchCase.condition": 4096,
    "trellis.v1.CreateWebhookTriggerRequest.idempotency_key": 4096,
    "trellis.v1.CreateWebhookTriggerRequest.input": 4096,
    "trellis.v1.CreateEventTriggerRequest.filter": 4096,
    "trellis.v1.CreateEventTriggerRequest.input": 4096,
    # A node's static configuration (JSON as a Struct, at most 64 KiB when registered).
    "google.protobuf.Struct.fields": 10_000,
    "google.protobuf.ListValue.values": 10_000,
    "google.protobuf.Value.string_value": 64 * 1024,
    # Free text for people.
    "trellis.v1.CancelExecutionRequest.reason": 4096,
    "trellis.v1.CancelNodeRequest.reason": 4096,
    "trellis.v1.ApproveNodeRequest.comment": 4096,
    "trellis.v1.SetSecretRequest.value": 64 * 1024,  # the secret store's own cap
    "trellis.v1.RejectNodeRequest.comment": 4096,
    "trellis.v1.SmtpChannel.body_template": 16 * 1024,
    "trellis.v1.SmsChannel.body_template": 16 * 1024,
    # Webhooks as received by the gateway: many headers, long values (signatures, cookies).
    "trellis.v1.FireWebhookRequest.headers": 256,
}

# The size of each element of a repeated string field, or of each value of a map field,
# where it is not the default.
ELEMENTS: dict[str, int] = {
    "trellis.v1.RegisterWorkerRequest.task_types": _ID,
    "trellis.v1.PollTasksRequest.task_types": _ID,
    "trellis.v1.CompleteTaskRequest.task_types": _ID,
    "trellis.v1.ReportResultsRequest.task_types": _ID,
    "trellis.v1.FireWebhookRequest.headers": 8192,
}

_PAYLOAD = "TRELLIS_MAX_PAYLOAD_BYTES"

_STRING = FieldDescriptor.TYPE_STRING
_BYTES = FieldDescriptor.TYPE_BYTES
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


class LimitExceeded(InvalidArgument):
    """A request past a limit; ``path`` is filled in on the way out of the walk."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(path)
        self.path = path
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}"


def _repeated(fd: FieldDescriptor) -> bool:
    return bool(fd.is_repeated)


def _type(fd: FieldDescriptor) -> Descriptor:
    message_type = fd.message_type
    assert message_type is not None, fd.full_name
    return message_type


def _is_map(fd: FieldDescriptor) -> bool:
    return bool(fd.type == _MESSAGE and _repeated(fd) and _type(fd).GetOptions().map_entry)


@dataclass
class _Plan:
    """What to check in one message type: each entry (name, full name, limits...)."""

    name: str
    strings: list[tuple[str, int]] = field(default_factory=list)
    payloads: list[str] = field(default_factory=list)
    repeated: list[tuple[str, int, int]] = field(default_factory=list)  # count, element (0: none)
    maps: list[tuple[str, int, int, int, _Plan | None]] = field(default_factory=list)
    messages: list[tuple[str, _Plan]] = field(default_factory=list)
    repeated_messages: list[tuple[str, int, _Plan]] = field(default_factory=list)

    active: bool = True  # something to check, here or below (set by _prune)
    # A message of at most this many bytes cannot be past any limit of a flat plan (no
    # sub-messages): characters <= UTF-8 bytes <= the encoded size, and every entry of a
    # repeated field takes a byte at least. 0: always walk.
    floor: int = 0


@dataclass(frozen=True)
class Limit:
    """One row of the documented table: a field, what is limited, and the limit."""

    field: str  # full protobuf name
    what: str  # "characters", "bytes", "entries"
    limit: int | str  # a number, or the setting that gives it
    element: str = ""  # "each at most N characters", for repeated strings and maps


class RequestLimits:
    """Checks requests against the table; ``max_payload_bytes`` bounds ``bytes`` fields."""

    def __init__(self, max_payload_bytes: int) -> None:
        self._payload = max_payload_bytes
        self._plans: dict[str, _Plan] = {}

    def plan(self, descriptor: Descriptor) -> _Plan | None:
        """The plan for ``descriptor``, or None when it has nothing to check."""
        found = self._build(descriptor)
        self._prune()
        return found if found.active else None

    def _build(self, descriptor: Descriptor) -> _Plan:
        cached = self._plans.get(descriptor.full_name)
        if cached is not None:
            return cached
        plan = _Plan(descriptor.name)
        self._plans[descriptor.full_name] = plan  # before the fields: types may recurse
        for fd in descriptor.fields:
            name, full = fd.name, fd.full_name
            if _is_map(fd):
                key_fd = _type(fd).fields_by_name["key"]
                value_fd = _type(fd).fields_by_name["value"]
                value_plan = self._build(value_fd.message_type) if value_fd.message_type else None
                plan.maps.append(
                    (
                        name,
                        OVERRIDES.get(full, MAX_MAP),
                        MAX_STRING if key_fd.type == _STRING else 0,
                        ELEMENTS.get(full, MAX_STRING) if value_fd.type == _STRING else 0,
                        value_plan,
                    )
                )
            elif fd.type == _MESSAGE:
                sub = self._build(_type(fd))
                if _repeated(fd):
                    plan.repeated_messages.append((name, OVERRIDES.get(full, MAX_REPEATED), sub))
                else:
                    plan.messages.append((name, sub))
            elif _repeated(fd):
                element = ELEMENTS.get(full, MAX_STRING) if fd.type == _STRING else 0
                if fd.type == _BYTES:
                    element = self._payload
                plan.repeated.append((name, OVERRIDES.get(full, MAX_REPEATED), element))
            elif fd.type == _STRING:
                plan.strings.append((name, OVERRIDES.get(full, MAX_STRING)))
            elif fd.type == _BYTES:
                plan.payloads.append(name)
        return plan

    def _prune(self) -> None:
        """Mark the plans with something to check (through sub-messages too, recursive types
        included) and drop the singular sub-messages with nothing: never visited."""
        plans = list(self._plans.values())
        for plan in plans:
            plan.active = bool(
                plan.strings
                or plan.payloads
                or plan.repeated
                or plan.maps
                or plan.repeated_messages
            )
        changed = True
        while changed:
            changed = False
            for plan in plans:
                if not plan.active and any(sub.active for _, sub in plan.messages):
                    plan.active = changed = True
        for plan in plans:
            plan.messages = [(n, sub) for n, sub in plan.messages if sub.active]
            if plan.active and not (plan.messages or plan.maps or plan.repeated_messages):
                plan.floor = min(
                    [limit for _, limit in plan.strings]
                    + [self._payload for _ in plan.payloads]
                    + [limit for _, limit, _ in plan.repeated]
                    + [element for _, _, element in plan.repeated if element]
                )

    def check(self, message: Any, plan: _Plan) -> None:
        """Raise ``LimitExceeded`` naming the first field of ``message`` past its limit."""
        for name, limit in plan.strings:
            size = len(getattr(message, name))
            if size > limit:
                raise LimitExceeded(f"{plan.name}.{name}", f"{size} characters, at most {limit}")
        for name in plan.payloads:
            size = len(getattr(message, name))
            if size > self._payload:
                raise LimitExceeded(
                    f"{plan.name}.{name}",
                    f"{size} bytes, over the {self._payload}-byte limit ({_PAYLOAD}); pass "
                    "large data by reference",
                )
        for name, limit, element in plan.repeated:
            values = getattr(message, name)
            if len(values) > limit:
                raise LimitExceeded(
                    f"{plan.name}.{name}",
                    f"{len(values)} entries, at most {limit}; send fewer per call",
                )
            if element:
                for index, value in enumerate(values):
                    if len(value) > element:
                        raise LimitExceeded(
                            f"{plan.name}.{name}[{index}]",
                            f"{len(value)} {_unit(value)}, at most {element}",
                        )
        for name, limit, key_limit, value_limit, value_plan in plan.maps:
            entries = getattr(message, name)
            if len(entries) > limit:
                raise LimitExceeded(
                    f"{plan.name}.{name}", f"{len(entries)} entries, at most {limit}"
                )
            for key, value in entries.items():
                if key_limit and len(key) > key_limit:
                    raise LimitExceeded(
                        f"{plan.name}.{name}",
                        f"a key of {len(key)} characters, at most {key_limit}",
                    )
                if value_limit and len(value) > value_limit:
                    raise LimitExceeded(
                        f"{plan.name}.{name}[{key[:64]!r}]",
                        f"{len(value)} characters, at most {value_limit}",
                    )
                if value_plan is not None and value_plan.active:
                    self._nested(value, value_plan, f"{plan.name}.{name}[{key[:64]!r}]")
        for name, sub in plan.messages:
            if message.HasField(name):
                self._nested(getattr(message, name), sub, f"{plan.name}.{name}")
        for name, limit, sub in plan.repeated_messages:
            items = getattr(message, name)
            if len(items) > limit:
                raise LimitExceeded(
                    f"{plan.name}.{name}",
                    f"{len(items)} entries, at most {limit}; send fewer per call",
                )
            if sub.active:
                floor = sub.floor
                for index, item in enumerate(items):
                    # Small items (a heartbeat's leases) are passed on their encoded size.
                    if not floor or item.ByteSize() > floor:
                        self._nested(item, sub, f"{plan.name}.{name}[{index}]")

    def _nested(self, message: Any, plan: _Plan, where: str) -> None:
        try:
            self.check(message, plan)
        except LimitExceeded as exc:
            # "NodeDefinition.id" inside "WorkflowDefinition.nodes[3]" reads as
            # "...nodes[3].id": the path from the request down.
            _, _, rest = exc.path.partition(".")
            exc.path = f"{where}.{rest}"
            raise

    # -- the documented table -----------------------------------------------------------------

    def rows(self, descriptor: Descriptor) -> Iterator[Limit]:
        """Every limited field reachable from ``descriptor`` (each field once)."""
        seen: set[str] = set()
        yield from self._rows(descriptor, seen)

    def _rows(self, descriptor: Descriptor, seen: set[str]) -> Iterator[Limit]:
        if descriptor.full_name in seen:
            return
        seen.add(descriptor.full_name)
        for fd in descriptor.fields:
            full = fd.full_name
            if _is_map(fd):
                value_fd = _type(fd).fields_by_name["value"]
                element = f"keys at most {MAX_STRING} characters" + (
                    f", values at most {ELEMENTS.get(full, MAX_STRING)} characters"
                    if value_fd.type == _STRING
                    else ""
                )
                yield Limit(full, "entries", OVERRIDES.get(full, MAX_MAP), element)
                if value_fd.message_type is not None:
                    yield from self._rows(value_fd.message_type, seen)
            elif fd.type == _MESSAGE:
                if _repeated(fd):
                    yield Limit(full, "entries", OVERRIDES.get(full, MAX_REPEATED))
                yield from self._rows(_type(fd), seen)
            elif _repeated(fd):
                element = ""
                if fd.type == _STRING:
                    element = f"each at most {ELEMENTS.get(full, MAX_STRING):,} characters"
                elif fd.type == _BYTES:
                    element = f"each at most {_PAYLOAD} bytes"
                yield Limit(full, "entries", OVERRIDES.get(full, MAX_REPEATED), element)
            elif fd.type == _STRING:
                yield Limit(full, "characters", OVERRIDES.get(full, MAX_STRING))
            elif fd.type == _BYTES:
                yield Limit(full, "bytes", _PAYLOAD)


def _unit(value: object) -> str:
    return "bytes" if isinstance(value, bytes) else "characters"


def services() -> list[ServiceDescriptor]:
    """Every Trellis service (proto/trellis/v1/*_service.proto)."""
    return [
        service
        for module in _SERVICE_MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
    ]


def request_types() -> list[Descriptor]:
    """The request message of every RPC of every Trellis service, each once."""
    found: dict[str, Descriptor] = {}
    for service in services():
        for method in service.methods:
            found.setdefault(method.input_type.full_name, method.input_type)
    return list(found.values())


def limits_table() -> str:
    """The markdown table of every limit of every request message (and of the messages
    inside them), as docs/protocol.md shows it (``python -m coordinator.grpc.limits``)."""
    checker = RequestLimits(0)
    rows: dict[str, Limit] = {}
    for descriptor in request_types():
        for row in checker.rows(descriptor):
            rows.setdefault(row.field, row)
    lines = ["| Field | Limit |", "| --- | --- |"]
    for name in sorted(rows):
        row = rows[name]
        limit = f"{row.limit:,}" if isinstance(row.limit, int) else f"`{row.limit}`"
        text = f"{limit} {row.what}" + (f"; {row.element}" if row.element else "")
        lines.append(f"| `{name.removeprefix('trellis.v1.')}` | {text} |")
    return "\n".join(lines) + "\n"


# -- applying it to every call ------------------------------------------------------------


@dataclass(frozen=True)
class Undecodable:
    """What a request that does not decode becomes; the call is refused before it runs."""

    message_type: str
    error: str


def _decoder(deserializer: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, ValueError, TypeError, RuntimeError) as exc:
            return Undecodable(message_type, str(exc) or type(exc).__name__)

    return decode


Ctx = grpc.aio.ServicerContext[Any, Any]


class LimitsInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with ``INVALID_ARGUMENT`` and before anything else runs, a request that does
    not decode or is past a limit of ``RequestLimits``. Each method's handler is wrapped
    once (its plan computed then)."""

    def __init__(self, limits: RequestLimits) -> None:
        self._limits = limits
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler  # streamed requests: only reflection, which checks its own
        method: str = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        deserializer = handler.request_deserializer
        message_class = getattr(deserializer, "__self__", None)
        descriptor = getattr(message_class, "DESCRIPTOR", None)
        if deserializer is None or not isinstance(descriptor, Descriptor):
            return handler
        plan = self._limits.plan(descriptor)
        check = self._limits.check
        full_name = descriptor.full_name
        tupled: Any = handler
        decode = _decoder(deserializer, full_name)

        async def refuse(request: Any, context: Ctx) -> None:
            if isinstance(request, Undecodable):
                log.info("refused an undecodable %s: %s", full_name, request.error)
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is not a valid {full_name} message ({request.error}); send "
                    "it protobuf-encoded as the service's .proto defines it",
                )
            if plan is not None:
                try:
                    check(request, plan)
                except LimitExceeded as exc:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{exc} (request limits: docs/protocol.md)",
                    )

        if handler.unary_unary is not None:
            unary: Any = handler.unary_unary

            async def unary_unary(request: Any, context: Ctx) -> Any:
                if plan is not None or type(request) is Undecodable:
                    await refuse(request, context)
                return await unary(request, context)

            return tupled._replace(request_deserializer=decode, unary_unary=unary_unary)  # type: ignore[no-any-return]
        if handler.unary_stream is not None:
            streaming: Any = handler.unary_stream

            async def unary_stream(request: Any, context: Ctx) -> Any:
                await refuse(request, context)
                # Closed here, in this call's context, when the stream ends early.
                async with contextlib.aclosing(streaming(request, context)) as items:
                    async for item in items:
                        yield item

            return tupled._replace(request_deserializer=decode, unary_stream=unary_stream)  # type: ignore[no-any-return]
        return handler


if __name__ == "__main__":
    print(limits_table(), end="")
