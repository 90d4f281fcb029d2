"""Control flow in the SDK: node types, the builder and loader, Result, the task context."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from trellis.v1 import common_pb2, worker_service_pb2
from worker_sdk import (
    ApprovalNode,
    Case,
    DefinitionError,
    MapNode,
    Result,
    SwitchNode,
    TaskContext,
    TaskNode,
    Workflow,
    WorkflowNode,
    load_workflow,
    task,
)
from worker_sdk._convert import context_from_proto, execution_from_proto
from worker_sdk._result import fill_completion
from worker_sdk._task import _LeaseSignals


@task("resize", timeout="10s", retries=1)
async def resize(ctx: TaskContext, data: Any) -> Any:
    return data


def order_workflow() -> Workflow:
    wf = Workflow("order")
    check = wf.node("validate", "validate-order", input="{'amount': input.amount}")
    wf.switch(
        "route",
        [("input.amount > 1000", "manual_review")],
        after=check,
        default_targets="auto_approve",
    )
    a = wf.node("auto_approve", "auto-approve", after="route")
    m = wf.node("manual_review", "manual-review", after="route", skip_if="input.amount < 0")
    join = wf.node("join", "join", after=[a, m], trigger_rule="none_failed_min_one_success")
    wf.subworkflow(
        "pay", "payments", version=2, after=join, input="execution.input", output="output.receipt"
    )
    wf.map("labels", resize, items="input.parcels", max_concurrency=20, after="pay", retries=3)
    return wf


ORDER_YAML = """\
name: order
nodes:
  - {id: validate, task_type: validate-order, input: "{'amount': input.amount}"}
  - id: route
    kind: switch
    cases: [{condition: "input.amount > 1000", targets: [manual_review]}]
    default_targets: [auto_approve]
  - {id: auto_approve, task_type: auto-approve}
  - {id: manual_review, taskType: manual-review, skipIf: "input.amount < 0"}
  - {id: join, task_type: join, trigger_rule: none_failed_min_one_success}
  - id: pay
    kind: workflow
    workflow_name: payments
    workflow_version: 2
    input: execution.input
    output: output.receipt
  - id: labels
    kind: map
    task_type: resize
    items: input.parcels
    max_concurrency: 20
    start_to_close_timeout: 10s
    retry_policy: {max_attempts: 4}
edges:
  - {source: validate, target: route}
  - {source: route, target: auto_approve}
  - {source: route, target: manual_review}
  - {source: auto_approve, target: join}
  - {source: manual_review, target: join}
  - {source: join, target: pay}
  - {source: pay, target: labels}
"""


def test_builder_control_flow_to_proto() -> None:
    msg = order_workflow().to_proto()
    nodes = {n.id: n for n in msg.nodes}
    assert nodes["validate"].kind == ""  # "task" is the default on the wire
    assert nodes["validate"].input == "{'amount': input.amount}"
    route = nodes["route"]
    assert (route.kind, route.task_type) == ("switch", "")
    assert [(c.condition, list(c.targets)) for c in route.cases] == [
        ("input.amount > 1000", ["manual_review"])
    ]
    assert list(route.default_targets) == ["auto_approve"]
    assert not route.match_all
    assert nodes["manual_review"].skip_if == "input.amount < 0"
    assert nodes["join"].trigger_rule == "none_failed_min_one_success"
    pay = nodes["pay"]
    assert (pay.kind, pay.workflow_name, pay.workflow_version) == ("workflow", "payments", 2)
    assert (pay.input, pay.output) == ("execution.input", "output.receipt")
    labels = nodes["labels"]
    assert (labels.kind, labels.task_type, labels.items, labels.max_concurrency) == (
        "map",
        "resize",
        "input.parcels",
        20,
    )
    # A map runs a Task: its timeout is the default; its own retries win.
    assert labels.start_to_close_timeout.ToTimedelta() == timedelta(seconds=10)
    assert labels.retry_policy.max_attempts == 4
    assert ("route", "manual_review") in [(e.source, e.target) for e in msg.edges]


def test_yaml_and_builder_agree(tmp_path: Path) -> None:
    path = tmp_path / "order.yaml"
    path.write_text(ORDER_YAML)
    assert load_workflow(path) == order_workflow().to_proto()


def test_node_objects_can_be_added_by_hand() -> None:
    wf = Workflow("w")
    wf.add(TaskNode("a", "t"))
    wf.add(SwitchNode("s", [Case("input.x", ["b"]), Case("true", "c")], match_all=True), after="a")
    assert wf.node_ids == ("a", "s")
    switch = wf.to_proto().nodes[1]
    assert switch.match_all
    assert [list(c.targets) for c in switch.cases] == [["b"], ["c"]]
    with pytest.raises(DefinitionError, match="already exists"):
        wf.add(TaskNode("a", "t"))
    with pytest.raises(DefinitionError, match="add\\(\\) takes"):
        wf.add("a")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (
            lambda: TaskNode("a", "t", trigger_rule="always"),
            "node 'a': unknown trigger_rule 'always'; use one of all_success, all_done",
        ),
        (lambda: TaskNode("a", "t", skip_if=True), "skip_if must be a CEL expression"),  # type: ignore[arg-type]
        (lambda: MapNode("m", "t", items=""), "items must be a CEL expression giving a list"),
        (lambda: MapNode("m", "t", items="xs", max_concurrency=-1), "max_concurrency"),
        (lambda: WorkflowNode("w", ""), "workflow must be the name of a registered workflow"),
        (lambda: WorkflowNode("w", "child", version=-2), "version must be a non-negative"),
        (lambda: SwitchNode("s", ["input.x"]), "cases must be Case"),  # type: ignore[list-item]
        (lambda: Case("", ["a"]), "condition must be a non-empty CEL expression"),
        (lambda: Case("true", [""]), "targets must be node ids"),
        (lambda: TaskNode("bad id", "t"), "invalid node id"),
    ],
)
def test_node_mistakes_are_refused_locally(build: Any, problem: str) -> None:
    with pytest.raises(DefinitionError, match=problem):
        build()


def test_builder_prefixes_the_workflow_name() -> None:
    wf = Workflow("w")
    with pytest.raises(DefinitionError, match="workflow 'w': node 'j': unknown trigger_rule"):
        wf.node("j", "t", trigger_rule="sometimes")
    with pytest.raises(DefinitionError, match="workflow 'w', node 's': a case must be"):
        wf.switch("s", ["input.x > 1"])  # type: ignore[list-item]
    assert wf.node_ids == ()  # nothing half-added


@pytest.mark.parametrize(
    ("node", "problem"),
    [
        ("{id: j, task_type: t, trigger_rule: sometimes}", "node 'j': unknown trigger_rule"),
        ("{id: j, kind: loop, task_type: t}", "node 'j': unknown kind 'loop'"),
    ],
)
def test_loader_refuses_unknown_rules_and_kinds(tmp_path: Path, node: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: w\nnodes: [{node}]\n")
    with pytest.raises(DefinitionError, match=problem) as info:
        load_workflow(path)
    assert str(info.value).startswith(f"{path}: ")


def test_example_order_yaml_loads() -> None:
    msg = load_workflow(Path(__file__).resolve().parents[2] / "examples/order.yaml")
    kinds = {n.id: n.kind for n in msg.nodes}
    assert kinds["route"] == "switch"
    join = next(n for n in msg.nodes if n.id == "join")
    assert join.trigger_rule == "none_failed_min_one_success"


# Approval nodes --------------------------------------------------------------------------

APPROVAL_YAML = """\
name: refund
nodes:
  - {id: check, task_type: check-refund}
  - id: review
    kind: approval
    required_role: finance
    approval_timeout: 86400s
    prompt: Refunds over 1000 need a second pair of eyes
    output: "{'approved': output.approved, 'refund': input}"
    on_failure: notify
  - {id: pay, task_type: pay-refund}
  - {id: notify, task_type: notify}
edges:
  - {source: check, target: review}
  - {source: review, target: pay}
"""


def refund_workflow() -> Workflow:
    wf = Workflow("refund")
    check = wf.node("check", "check-refund")
    review = wf.approval(
        "review",
        required_role="finance",
        timeout="24h",
        prompt="Refunds over 1000 need a second pair of eyes",
        output="{'approved': output.approved, 'refund': input}",
        on_failure="notify",
        after=check,
    )
    wf.node("pay", "pay-refund", after=review)
    wf.node("notify", "notify")
    return wf


def test_approval_builder_to_proto_and_yaml_agree(tmp_path: Path) -> None:
    review = refund_workflow().to_proto().nodes[1]
    assert (review.kind, review.task_type, review.required_role) == ("approval", "", "finance")
    assert review.approval_timeout.ToTimedelta() == timedelta(hours=24)
    assert review.prompt == "Refunds over 1000 need a second pair of eyes"
    assert review.on_failure == "notify"
    assert not review.HasField("retry_policy") and not review.HasField("start_to_close_timeout")
    path = tmp_path / "refund.yaml"
    path.write_text(APPROVAL_YAML)
    assert load_workflow(path) == refund_workflow().to_proto()


def test_an_approval_node_by_hand_and_in_an_expansion() -> None:
    node = ApprovalNode("ok", "operator")
    msg = node.to_proto()
    assert (msg.kind, msg.required_role, msg.prompt) == ("approval", "operator", "")
    assert not msg.HasField("approval_timeout")
    request = worker_service_pb2.CompleteTaskRequest()
    fill_completion(request, Result(None, add_nodes=[node], add_edges=[("a", "ok")]))
    assert request.expansion.nodes[0].kind == "approval"


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda: ApprovalNode("r", ""), "required_role must be a role name"),
        (lambda: ApprovalNode("r", "two words"), "required_role must be a role name"),
        (lambda: ApprovalNode("r", "ops", timeout="0s"), "must be greater than zero"),
        (lambda: ApprovalNode("r", "ops", prompt=3), "prompt must be a string"),  # type: ignore[arg-type]
    ],
)
def test_approval_mistakes_are_refused_locally(build: Any, problem: str) -> None:
    with pytest.raises(DefinitionError, match=problem):
        build()
    with pytest.raises(DefinitionError, match="workflow 'w': node 'r': required_role"):
        Workflow("w").approval("r", required_role="")


# Result ----------------------------------------------------------------------------------


def test_plain_return_value_has_no_flow_instructions() -> None:
    request = worker_service_pb2.CompleteTaskRequest()
    fill_completion(request, {"ok": True})
    assert json.loads(request.output) == {"ok": True}
    assert not request.next
    assert not request.HasField("expansion")


def test_result_with_next_and_expansion() -> None:
    result = Result(
        {"route": "manual"},
        next="manual_review",
        add_nodes=(
            TaskNode("audit", "audit", trigger_rule="all_done"),
            MapNode("fan", "resize", items="input.xs", max_concurrency=2),
        ),
        add_edges=[("triage", "audit"), ["audit", "fan"]],  # type: ignore[list-item]
    )
    assert result.next == ("manual_review",)
    assert result.add_edges == (("triage", "audit"), ("audit", "fan"))
    request = worker_service_pb2.CompleteTaskRequest()
    fill_completion(request, result)
    assert json.loads(request.output) == {"route": "manual"}
    assert list(request.next) == ["manual_review"]
    expansion = request.expansion
    assert [n.id for n in expansion.nodes] == ["audit", "fan"]
    assert expansion.nodes[0].trigger_rule == "all_done"
    assert (expansion.nodes[1].kind, expansion.nodes[1].max_concurrency) == ("map", 2)
    assert [(e.source, e.target) for e in expansion.edges] == [
        ("triage", "audit"),
        ("audit", "fan"),
    ]


def test_result_output_only_sends_nothing_else() -> None:
    request = worker_service_pb2.CompleteTaskRequest()
    fill_completion(request, Result([1, 2]))
    assert json.loads(request.output) == [1, 2]
    assert not request.next and not request.HasField("expansion")
    assert Result().output is None


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"next": ()}, "Result.next is empty"),
        ({"next": ["a", 3]}, "Result.next must list node ids"),
        ({"add_nodes": [{"id": "x"}]}, "Result.add_nodes takes TaskNode"),
        ({"add_edges": [("a",)]}, "Result.add_edges takes \\(source, target\\) pairs"),
        ({"add_edges": ["ab"]}, "Result.add_edges takes"),
    ],
)
def test_result_mistakes(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(DefinitionError, match=problem):
        Result(None, **kwargs)


def test_result_output_must_be_json() -> None:
    with pytest.raises(TypeError):
        fill_completion(worker_service_pb2.CompleteTaskRequest(), Result(object()))


# TaskContext -----------------------------------------------------------------------------


def _task(**fields: Any) -> worker_service_pb2.Task:
    return worker_service_pb2.Task(
        lease_token="t",
        execution_id="e1",
        task_type="resize",
        attempt=2,
        idempotency_key="e1/n",
        workflow_name="order",
        workflow_version=4,
        **fields,
    )


def test_context_carries_execution_data_parsed_lazily() -> None:
    msg = _task(node_id="labels[7]", execution_input=b'{"amount": 5}', map_index=7)
    msg.execution_start_time.FromDatetime(datetime(2030, 1, 1, tzinfo=UTC))
    msg.parent_outputs = b'{"pay": {"receipt": "r1"}, "other": null}'
    ctx = context_from_proto(msg, worker_id="w", signals=_LeaseSignals())
    assert ctx.map_index == 7
    assert ctx.execution_start_time == datetime(2030, 1, 1, tzinfo=UTC)
    assert "execution_input" not in ctx.__dict__  # not parsed until asked for
    assert ctx.execution_input == {"amount": 5}
    assert ctx.parent_outputs == {"pay": {"receipt": "r1"}, "other": None}
    assert (ctx.workflow_name, ctx.workflow_version, ctx.attempt) == ("order", 4, 2)
    assert ctx.idempotency_key == "e1/n"


def test_context_of_a_plain_task() -> None:
    ctx = context_from_proto(_task(node_id="validate"), worker_id="w", signals=_LeaseSignals())
    assert ctx.map_index is None
    assert ctx.execution_start_time is None
    assert ctx.execution_input is None
    assert ctx.parent_outputs == {}


def test_execution_converts_parent_and_child_links() -> None:
    msg = common_pb2.Execution(
        id="child",
        parent_execution_id="parent",
        parent_node_id="pay",
        depth=1,
        nodes=[common_pb2.NodeRun(node_id="sub", child_execution_id="grandchild")],
    )
    msg.start_time.FromDatetime(datetime(2030, 1, 1, tzinfo=UTC))
    execution = execution_from_proto(msg)
    assert (execution.parent_execution_id, execution.parent_node_id, execution.depth) == (
        "parent",
        "pay",
        1,
    )
    assert execution.start_time == datetime(2030, 1, 1, tzinfo=UTC)
    assert execution.node("sub").child_execution_id == "grandchild"


def test_proto_json_of_the_builder_is_the_yaml_mapping() -> None:
    """The YAML fields are the proto JSON names: a builder round-trips through them."""
    msg = order_workflow().to_proto()
    doc = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    assert json_format.ParseDict(doc, common_pb2.WorkflowDefinition()) == msg
