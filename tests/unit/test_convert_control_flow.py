"""Proto ↔ domain conversion of the control-flow fields (issue 4)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import duration_pb2, json_format, timestamp_pb2

from coordinator.errors import InvalidArgument
from coordinator.grpc import convert
from coordinator.model import (
    Execution,
    ExecutionStatus,
    NodeRun,
    NodeStatus,
    SwitchCase,
    TriggerRule,
)
from coordinator.service import LeasedTask
from trellis.v1 import common_pb2
from trellis.v1 import workflow_service_pb2 as fpb

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_control_flow_fields_convert_both_ways() -> None:
    msg = json_format.ParseDict(
        {
            "name": "cf",
            "nodes": [
                {
                    "id": "a",
                    "kind": "task",
                    "task_type": "t",
                    "trigger_rule": "all_done",
                    "skip_if": "input.x",
                },
                {
                    "id": "s",
                    "kind": "switch",
                    "cases": [{"condition": "input.n > 1", "targets": ["b"]}],
                    "default_targets": ["c"],
                    "match_all": True,
                },
                {
                    "id": "w",
                    "kind": "workflow",
                    "workflow_name": "child",
                    "workflow_version": 3,
                    "input": "{'k': input}",
                    "output": "output.v",
                },
                {
                    "id": "m",
                    "kind": "map",
                    "task_type": "t",
                    "items": "input",
                    "max_concurrency": 4,
                },
            ],
        },
        common_pb2.WorkflowDefinition(),
    )
    defn = convert.definition_from_proto(msg, "default")
    a, s, w, m = defn.nodes
    assert (a.trigger_rule, a.skip_if) == (TriggerRule.ALL_DONE, "input.x")
    assert s.cases == (SwitchCase("input.n > 1", ("b",)),)
    assert (s.default_targets, s.match_all) == (("c",), True)
    assert (w.workflow_name, w.workflow_version) == ("child", 3)
    assert (w.input_expr, w.output_expr) == ("{'k': input}", "output.v")
    assert (m.items_expr, m.max_concurrency) == ("input", 4)
    assert m.trigger_rule is TriggerRule.ALL_SUCCESS
    back = convert.definition_to_proto(defn)
    assert json_format.MessageToDict(back)["nodes"] == json_format.MessageToDict(msg)["nodes"]


def test_unknown_trigger_rule_lists_the_valid_ones() -> None:
    msg = common_pb2.WorkflowDefinition(name="x")
    msg.nodes.add(id="a", task_type="t", trigger_rule="sometimes")
    with pytest.raises(InvalidArgument) as info:
        convert.definition_from_proto(msg, "default")
    text = str(info.value)
    assert "node 'a'" in text and "'sometimes'" in text
    for rule in TriggerRule:
        assert repr(rule.value) in text


@pytest.mark.parametrize(
    ("node_id", "index"), [("m[0]", 0), ("m[12]", 12), ("m", -1), ("a.b", -1), ("[3]", -1)]
)
def test_map_index_comes_from_the_run_id(node_id: str, index: int) -> None:
    assert convert.map_index(node_id) == index


def test_start_request_options() -> None:
    at = timestamp_pb2.Timestamp()
    at.FromDatetime(NOW)
    request = convert.start_request_from_proto(
        fpb.StartExecutionRequest(workflow_name="w", start_time=at, idempotency_key="k")
    )
    assert request.start_time == NOW and request.delay is None
    assert request.idempotency_key == "k" and request.workflow_version is None
    request = convert.start_request_from_proto(
        fpb.StartExecutionRequest(workflow_name="w", delay=duration_pb2.Duration(seconds=90))
    )
    assert request.delay == timedelta(seconds=90) and request.start_time is None


def test_execution_and_task_context_fields() -> None:
    execution = Execution(
        id="e",
        workflow_name="w",
        workflow_version=1,
        status=ExecutionStatus.PENDING,
        input=b"{}",
        created_at=NOW,
        updated_at=NOW,
        parent_execution_id="p",
        parent_node_id="sub",
        start_at=NOW + timedelta(hours=1),
    )
    msg = convert.execution_to_proto(execution)
    assert msg.parent_node_id == "sub"
    assert msg.start_time.ToDatetime(tzinfo=UTC) == NOW + timedelta(hours=1)
    node = NodeRun(
        execution_id="e",
        node_id="m[2]",
        task_type="t",
        status=NodeStatus.WAITING,
        updated_at=NOW,
        workflow_name="w",
        workflow_version=1,
        child_execution_id="c",
    )
    assert convert.node_to_proto(node).child_execution_id == "c"
    task = convert.task_to_proto(
        LeasedTask("tok", node, b"", NOW, execution_input=b'{"in":1}', parent_outputs=b'{"a":2}')
    )
    assert task.map_index == 2
    assert task.execution_start_time.ToDatetime(tzinfo=UTC) == NOW
    assert (task.execution_input, task.parent_outputs) == (b'{"in":1}', b'{"a":2}')
