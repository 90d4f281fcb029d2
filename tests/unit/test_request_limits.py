"""The request limits (coordinator/grpc/limits.py): every field of every request message is
covered, refusals name the field, the checker is cheap on the hot path, docs agree."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from coordinator.grpc.auth import RULES
from coordinator.grpc.limits import (
    ELEMENTS,
    MAX_MAP,
    MAX_REPEATED,
    MAX_STRING,
    OVERRIDES,
    LimitExceeded,
    RequestLimits,
    limits_table,
    request_types,
    services,
)
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb

ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = 100  # a small payload limit, so over-limit bytes are cheap to build

Step = tuple[FieldDescriptor, str]  # a field, and how to reach into it ("", "[0]", "['k']")


def _is_map(fd: FieldDescriptor) -> bool:
    return bool(
        fd.type == FieldDescriptor.TYPE_MESSAGE
        and fd.is_repeated
        and fd.message_type.GetOptions().map_entry
    )


def limited_fields(root: Descriptor) -> list[tuple[list[Step], FieldDescriptor]]:
    """Every string, bytes, repeated and map field reachable from ``root`` (each field
    once), with the path of singular / first-element / one-key steps leading to it."""
    found: list[tuple[list[Step], FieldDescriptor]] = []
    queue: deque[tuple[Descriptor, list[Step]]] = deque([(root, [])])
    visited: set[str] = set()
    while queue:
        descriptor, path = queue.popleft()
        if descriptor.full_name in visited:
            continue
        visited.add(descriptor.full_name)
        for fd in descriptor.fields:
            if _is_map(fd):
                found.append((path, fd))
                value = fd.message_type.fields_by_name["value"]
                if value.message_type is not None:
                    queue.append((value.message_type, [*path, (fd, "['k']")]))
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                if fd.is_repeated:
                    found.append((path, fd))
                    queue.append((fd.message_type, [*path, (fd, "[0]")]))
                else:
                    queue.append((fd.message_type, [*path, (fd, "")]))
            elif fd.is_repeated or fd.type in (
                FieldDescriptor.TYPE_STRING,
                FieldDescriptor.TYPE_BYTES,
            ):
                found.append((path, fd))
    return found


def over_limit(root: Descriptor, path: list[Step], fd: FieldDescriptor) -> tuple[Message, str]:
    """A ``root`` message with ``fd`` (reached along ``path``) one past its limit, and the
    field path the refusal must name."""
    request = GetMessageClass(root)()
    target: Any = request
    where = root.name
    for step, how in path:
        where += f".{step.name}{how}"
        if how == "[0]":
            target = getattr(target, step.name).add()
        elif how == "['k']":
            target = getattr(target, step.name)["k"]
        else:
            target = getattr(target, step.name)
    name = fd.name
    where += f".{name}"
    if _is_map(fd):
        limit = OVERRIDES.get(fd.full_name, MAX_MAP)
        entries = getattr(target, name)
        value = fd.message_type.fields_by_name["value"]
        for i in range(limit + 1):
            if value.message_type is not None:
                entries[f"k{i}"].SetInParent()
            else:
                entries[f"k{i}"] = "" if value.type == FieldDescriptor.TYPE_STRING else 0
    elif fd.is_repeated:
        limit = OVERRIDES.get(fd.full_name, MAX_REPEATED)
        values = getattr(target, name)
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            for _ in range(limit + 1):
                values.add()
        elif fd.type == FieldDescriptor.TYPE_STRING:
            values.extend([""] * (limit + 1))
        elif fd.type == FieldDescriptor.TYPE_BYTES:
            values.extend([b""] * (limit + 1))
        elif fd.type == FieldDescriptor.TYPE_BOOL:
            values.extend([False] * (limit + 1))
        else:
            values.extend([0] * (limit + 1))
    elif fd.type == FieldDescriptor.TYPE_STRING:
        setattr(target, name, "x" * (OVERRIDES.get(fd.full_name, MAX_STRING) + 1))
    else:
        setattr(target, name, b"x" * (PAYLOAD + 1))
    return request, where


def _id(root: Descriptor, path: list[Step], fd: FieldDescriptor) -> str:
    return f"{root.name}:{'.'.join([*(step.name for step, _ in path), fd.name])}"


ALL = [
    pytest.param(root, path, fd, id=_id(root, path, fd))
    for root in request_types()
    for path, fd in limited_fields(root)
]


def test_every_rpc_of_every_service_is_seen() -> None:
    methods = {f"/{s.full_name}/{m.name}" for s in services() for m in s.methods}
    assert methods == set(RULES)  # the same RPCs the auth table names: none missing
    assert len(ALL) > 150


@pytest.mark.parametrize(("root", "path", "fd"), ALL)
def test_every_field_of_every_request_is_limited(
    root: Descriptor, path: list[Step], fd: FieldDescriptor
) -> None:
    """A field one past its limit (the default or its override) is refused, naming it: a
    field added to any request message, at any depth, is covered by the defaults."""
    limits = RequestLimits(PAYLOAD)
    plan = limits.plan(root)
    assert plan is not None, root.full_name
    request, where = over_limit(root, path, fd)
    with pytest.raises(LimitExceeded) as refused:
        limits.check(request, plan)
    assert refused.value.path == where, str(refused.value)


def test_at_the_limit_is_accepted_and_elements_are_checked() -> None:
    limits = RequestLimits(PAYLOAD)
    plan = limits.plan(wpb.PollTasksRequest.DESCRIPTOR)
    assert plan is not None
    full = wpb.PollTasksRequest(worker_id="w" * 256, task_types=["t" * 256] * 256)
    limits.check(full, plan)
    long_type = wpb.PollTasksRequest(task_types=["ok", "t" * 257])
    with pytest.raises(LimitExceeded, match=r"^PollTasksRequest\.task_types\[1\]: 257 char"):
        limits.check(long_type, plan)
    assert ELEMENTS["trellis.v1.PollTasksRequest.task_types"] == 256


def test_the_refusal_reads_as_the_issue_asks() -> None:
    limits = RequestLimits(PAYLOAD)
    plan = limits.plan(wpb.PollTasksRequest.DESCRIPTOR)
    assert plan is not None
    request = wpb.PollTasksRequest(task_types=[f"t{i}" for i in range(100_000)])
    with pytest.raises(LimitExceeded) as refused:
        limits.check(request, plan)
    assert str(refused.value).startswith("PollTasksRequest.task_types: 100000 entries, at most 256")


def test_nested_refusals_name_the_path_from_the_request() -> None:
    limits = RequestLimits(1 << 20)
    request = fpb.RegisterWorkflowRequest()
    node = request.definition.nodes.add(id="a")
    node.config.update({"k": ["x" * 70_000]})
    plan = limits.plan(request.DESCRIPTOR)
    assert plan is not None
    with pytest.raises(LimitExceeded) as refused:
        limits.check(request, plan)
    assert refused.value.path == (
        "RegisterWorkflowRequest.definition.nodes[0].config.fields['k'].list_value"
        ".values[0].string_value"
    )


def test_messages_with_nothing_to_check_are_not_walked() -> None:
    limits = RequestLimits(PAYLOAD)
    plan = limits.plan(wpb.PollTasksRequest.DESCRIPTOR)
    assert plan is not None
    assert plan.messages == []  # `wait` (a Duration) holds nothing to check
    from trellis.v1 import identity_service_pb2 as ipb

    assert limits.plan(ipb.WhoAmIRequest.DESCRIPTOR) is None


def _hot_requests() -> list[Message]:
    return [
        wpb.PollTasksRequest(worker_id="worker-1", task_types=["email", "resize"], max_tasks=8),
        wpb.CompleteTaskRequest(
            lease_token="t" * 200, output=b'{"ok": true}', worker_id="worker-1"
        ),
        wpb.HeartbeatRequest(
            worker_id="worker-1", leases=[wpb.LeaseHeartbeat(lease_token="t" * 200)] * 8
        ),
        wpb.FailTaskRequest(
            lease_token="t" * 200,
            worker_id="worker-1",
            error=wpb.TaskError(type="Boom", message="it broke", details=b"{}"),
        ),
    ]


def test_hot_requests_pass_and_their_small_items_are_not_walked() -> None:
    """The worker RPCs' requests pass, and a heartbeat's leases (small items of a flat
    plan) are checked on their encoded size instead of field by field: what keeps the
    checker to microseconds per call (figures: docs/performance.md)."""
    limits = RequestLimits(1 << 20)
    for request in _hot_requests():
        plan = limits.plan(request.DESCRIPTOR)
        assert plan is not None
        limits.check(request, plan)  # within every limit: no exception
    heartbeat = _hot_requests()[2]
    plan = limits.plan(heartbeat.DESCRIPTOR)
    assert plan is not None
    (leases,) = [p for name, _, p in plan.repeated_messages if name == "leases"]
    assert not leases.messages and not leases.repeated_messages  # flat
    assert 0 < heartbeat.leases[0].ByteSize() <= leases.floor


def test_docs_list_the_same_limits_as_the_table() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    begin, end = "<!-- request-limits:begin -->\n", "<!-- request-limits:end -->"
    documented = text[text.index(begin) + len(begin) : text.index(end)]
    assert documented == limits_table(), (
        "docs/protocol.md's request limits are stale: paste the output of "
        "`python -m coordinator.grpc.limits` between the request-limits markers"
    )
