"""max_running_executions / overflow_policy / max_concurrency: proto <-> model conversion,
the SDK builder and loader, the start request, and `trellis run --max-concurrency`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from coordinator.errors import InvalidArgument
from coordinator.grpc.convert import (
    definition_from_proto,
    definition_to_proto,
    execution_to_proto,
    start_request_from_proto,
)
from coordinator.model import (
    Execution,
    ExecutionStatus,
    NodeSpec,
    OverflowPolicy,
    WorkflowDef,
    running_cap,
)
from coordinator.service._starts import StartRequest, execution_concurrency
from trellis.cli import build_parser
from trellis.v1 import common_pb2
from trellis.v1 import workflow_service_pb2 as fpb
from worker_sdk import DefinitionError, Workflow, load_workflow
from worker_sdk._convert import start_request

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _defn(**limits: object) -> WorkflowDef:
    return WorkflowDef(name="w", nodes=(NodeSpec("a", "t"),), **limits)  # type: ignore[arg-type]


def test_definition_limits_round_trip() -> None:
    defn = _defn(max_concurrency=3, max_running_executions=5, overflow_policy=OverflowPolicy.REJECT)
    msg = definition_to_proto(defn)
    assert (msg.max_concurrency, msg.max_running_executions, msg.overflow_policy) == (
        3,
        5,
        common_pb2.OVERFLOW_POLICY_REJECT,
    )
    back = definition_from_proto(msg, defn.tenant_id)
    assert (back.max_concurrency, back.max_running_executions, back.overflow_policy) == (
        3,
        5,
        OverflowPolicy.REJECT,
    )
    assert back.content_hash == defn.content_hash


def test_unset_limits_mean_none_and_queue() -> None:
    msg = common_pb2.WorkflowDefinition(name="w")
    msg.nodes.add(id="a", task_type="t")
    defn = definition_from_proto(msg, "default")
    assert (defn.max_concurrency, defn.max_running_executions) == (0, 0)
    assert defn.overflow_policy is OverflowPolicy.QUEUE
    assert running_cap(defn) is None
    # Definitions without the limits keep the hash they had before the fields existed.
    assert defn.content_hash == _defn().content_hash


@pytest.mark.parametrize("field", ["max_concurrency", "max_running_executions"])
def test_negative_definition_limits_are_refused(field: str) -> None:
    msg = common_pb2.WorkflowDefinition(name="w")
    setattr(msg, field, -1)
    with pytest.raises(InvalidArgument, match=field):
        definition_from_proto(msg, "default")


def test_unknown_overflow_policy_is_refused() -> None:
    msg = common_pb2.WorkflowDefinition(name="w", overflow_policy=7)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="overflow_policy"):
        definition_from_proto(msg, "default")


def test_execution_carries_max_concurrency_and_queued() -> None:
    execution = Execution(
        id="e",
        tenant_id="default",
        workflow_name="w",
        workflow_version=1,
        status=ExecutionStatus.PENDING,
        input=b"{}",
        created_at=NOW,
        updated_at=NOW,
        max_concurrency=8,
        queued=True,
    )
    msg = execution_to_proto(execution)
    assert (msg.max_concurrency, msg.queued) == (8, True)


def test_start_request_max_concurrency() -> None:
    msg = fpb.StartExecutionRequest(workflow_name="w", max_concurrency=6)
    request = start_request_from_proto(msg)
    assert request.max_concurrency == 6
    assert execution_concurrency(request, _defn(max_concurrency=2)) == 6
    assert execution_concurrency(StartRequest("w"), _defn(max_concurrency=2)) == 2
    for bad in (-1, 10_001):
        with pytest.raises(InvalidArgument, match="max_concurrency"):
            execution_concurrency(StartRequest("w", max_concurrency=bad), _defn())


def test_builder_sets_the_limits() -> None:
    wf = Workflow("w", max_concurrency=4, max_running_executions=2, overflow_policy="reject")
    wf.node("a", "t")
    msg = wf.to_proto()
    assert (msg.max_concurrency, msg.max_running_executions, msg.overflow_policy) == (
        4,
        2,
        common_pb2.OVERFLOW_POLICY_REJECT,
    )
    assert Workflow("w").to_proto().overflow_policy == common_pb2.OVERFLOW_POLICY_UNSPECIFIED
    assert Workflow("w", overflow_policy="QUEUE").to_proto().overflow_policy == (
        common_pb2.OVERFLOW_POLICY_QUEUE
    )


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"max_concurrency": -1}, "max_concurrency"),
        ({"max_running_executions": 1.5}, "max_running_executions"),
        ({"overflow_policy": "drop"}, "overflow_policy must be 'queue' or 'reject'"),
    ],
)
def test_builder_refuses_bad_limits(options: dict[str, object], problem: str) -> None:
    with pytest.raises(DefinitionError, match=problem):
        Workflow("w", **options)  # type: ignore[arg-type]


def test_loader_reads_the_limits(tmp_path: Path) -> None:
    file = tmp_path / "w.yaml"
    file.write_text(
        "name: w\nmax_concurrency: 3\nmaxRunningExecutions: 2\noverflow_policy: Reject\n"
        "nodes:\n  - id: a\n    task_type: t\n"
    )
    msg = load_workflow(file)
    assert (msg.max_concurrency, msg.max_running_executions, msg.overflow_policy) == (
        3,
        2,
        common_pb2.OVERFLOW_POLICY_REJECT,
    )
    file.write_text("name: w\noverflowPolicy: later\nnodes: []\n")
    with pytest.raises(DefinitionError, match=r"w\.yaml: overflowPolicy must be"):
        load_workflow(file)


def test_sdk_start_request_max_concurrency() -> None:
    def make(value: object) -> fpb.StartExecutionRequest:
        return start_request(
            "w",
            None,
            version=None,
            idempotency_key=None,
            priority=0,
            delay=None,
            start_at=None,
            max_concurrency=value,  # type: ignore[arg-type]
        )

    assert make(5).max_concurrency == 5
    assert make(0).max_concurrency == 0
    for bad in (-1, "3", True):
        with pytest.raises(ValueError, match="max_concurrency"):
            make(bad)


def test_cli_run_max_concurrency() -> None:
    args = build_parser().parse_args(["run", "order", "--max-concurrency", "5"])
    assert args.max_concurrency == 5
    assert build_parser().parse_args(["run", "order"]).max_concurrency == 0
