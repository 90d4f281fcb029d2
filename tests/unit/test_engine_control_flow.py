"""Control flow in the engine: trigger rules, skipping, switch, next, expressions, map and
workflow nodes, dynamic expansion (issue 4)."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from typing import Any

import pytest

from coordinator.engine import (
    Expansion,
    _exprs,
    _kinds,
    cancel_execution,
    cancel_node,
    child_ended,
    complete_node,
    effective_definition,
    fail_waiting_node,
    redrive,
    start_execution,
    time_out_unstarted,
    validate_definition,
)
from coordinator.errors import FailedPrecondition, InvalidArgument
from coordinator.model import (
    ErrorInfo,
    EventType,
    Execution,
    ExecutionStatus,
    NodeRole,
    NodeSpec,
    NodeStatus,
    SwitchCase,
    Transition,
    TriggerRule,
    WorkflowDef,
)
from tests.support.engine_sim import NO_WAIT, SEC, T0, Sim, details, kinds, new_execution

S, F, K = "succeeded", "failed", "skipped"


def task(id: str, **kw: Any) -> NodeSpec:
    kw.setdefault("task_type", "t")
    kw.setdefault("retry_policy", NO_WAIT)
    return NodeSpec(id=id, **kw)


def wf(*nodes: NodeSpec, edges: tuple[tuple[str, str], ...] = (), **kw: Any) -> WorkflowDef:
    defn = WorkflowDef(name="cf", nodes=nodes, edges=edges, tenant_id="acme", **kw)
    validate_definition(defn)
    return defn


def start(defn: WorkflowDef, input: Any = None) -> Sim:
    return Sim(defn, input=json.dumps({} if input is None else input).encode())


def started(defn: WorkflowDef, input: Any = None) -> tuple[Sim, Transition]:
    """A started Sim and the transition that started it (the engine is pure)."""
    sim = start(defn, input)
    return sim, start_execution(defn, new_execution(defn, sim.execution.input), T0)


def statuses(sim: Sim, ids: str | list[str]) -> list[NodeStatus]:
    return [sim.status(i) for i in ids]


def complete(sim: Sim, node_id: str, output: bytes = b"1", **kw: Any) -> Transition:
    sim.claim(node_id)
    sim.now += SEC
    return sim.apply(
        complete_node(sim.defn, sim.execution, sim.nodes, node_id, output, sim.now, **kw)
    )


# -- trigger rules -----------------------------------------------------------------------


def _expected(rule: TriggerRule, outcomes: tuple[str, str]) -> NodeStatus:
    ok, failed = outcomes.count(S), outcomes.count(F)
    runs = {
        TriggerRule.ALL_SUCCESS: ok == 2,
        TriggerRule.ALL_DONE: True,
        TriggerRule.ONE_SUCCESS: ok >= 1,
        TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS: failed == 0 and ok >= 1,
        TriggerRule.ALL_FAILED: failed == 2,
    }[rule]
    return NodeStatus.READY if runs else NodeStatus.SKIPPED


@pytest.mark.parametrize("rule", list(TriggerRule))
@pytest.mark.parametrize("outcomes", list(itertools.product([S, F, K], repeat=2)))
def test_trigger_rule_table(rule: TriggerRule, outcomes: tuple[str, str]) -> None:
    defn = wf(
        task("p1", skip_if="input.skip1"),
        task("p2", skip_if="input.skip2"),
        task("c", trigger_rule=rule),
        edges=(("p1", "c"), ("p2", "c")),
    )
    sim = start(defn, {"skip1": outcomes[0] == K, "skip2": outcomes[1] == K})
    for nid, outcome in zip(["p1", "p2"], outcomes, strict=True):
        if sim.status(nid) is NodeStatus.READY and outcome == S:
            sim.complete(nid, json.dumps(nid).encode())
        elif sim.status(nid) is NodeStatus.READY and outcome == F:
            sim.fail(nid, retryable=False)
    expected = _expected(rule, outcomes)
    assert sim.status("c") is expected
    handled = rule in (TriggerRule.ALL_DONE, TriggerRule.ALL_FAILED, TriggerRule.ONE_SUCCESS)
    if F in outcomes and not handled:  # the failure flow: the execution fails
        assert sim.execution.status is ExecutionStatus.FAILED
        return
    assert sim.execution.error is None
    if expected is NodeStatus.READY:
        c = sim.nodes["c"]
        want = {p: (p if o == S else None) for p, o in zip(["p1", "p2"], outcomes, strict=True)}
        if rule is TriggerRule.ONE_SUCCESS and outcomes == (S, S):
            want["p2"] = None  # c was ready as soon as p1 succeeded
        assert json.loads(c.input or b"") == want  # unfinished or failed parents give null
        sim.complete("c", b'"C"')
        assert (sim.execution.status, sim.execution.output) == (ExecutionStatus.SUCCEEDED, b'"C"')
    else:
        assert sim.execution.status is ExecutionStatus.SUCCEEDED
        assert sim.execution.output == b"null"  # a skipped sink gives null


def test_one_success_runs_at_the_first_success_and_all_success_skips_at_the_first_skip() -> None:
    defn = wf(
        task("p1", skip_if="input.skip"),
        task("p2"),
        task("one", trigger_rule=TriggerRule.ONE_SUCCESS),
        task("all"),
        edges=(("p1", "one"), ("p2", "one"), ("p1", "all"), ("p2", "all")),
    )
    sim = start(defn, {"skip": True})  # p1 skipped at start; p2 still READY
    assert statuses(sim, ["p1", "p2", "one", "all"]) == [
        NodeStatus.SKIPPED,
        NodeStatus.READY,
        NodeStatus.BLOCKED,
        NodeStatus.SKIPPED,
    ]
    t = sim.complete("p2", b'"two"')
    assert sim.status("one") is NodeStatus.READY
    assert json.loads(sim.nodes["one"].input or b"") == {"p1": None, "p2": "two"}
    assert kinds(t) == [(EventType.NODE_SUCCEEDED, "p2"), (EventType.NODE_READY, "one")]


def test_skip_reasons_name_the_cause() -> None:
    defn = wf(
        task("a", skip_if="true"),
        task("b"),
        task("c", trigger_rule=TriggerRule.ONE_SUCCESS),
        task("d", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS),
        task("e", trigger_rule=TriggerRule.ALL_FAILED),
        edges=(("a", "b"), ("a", "c"), ("a", "d"), ("a", "e")),
    )
    sim, t0 = started(defn)
    reasons = {
        e.node_id: json.loads(e.details or b"{}")["reason"]
        for e in t0.events
        if e.type is EventType.NODE_SKIPPED
    }
    assert reasons == {
        "a": "skip_if 'true' was true",
        "b": "upstream node 'a' was skipped",
        "c": "trigger rule one_success: no parent succeeded",
        "d": "trigger rule none_failed_min_one_success: no parent succeeded",
        "e": "trigger rule all_failed: parent 'a' is SKIPPED",
    }
    assert sim.execution.status is ExecutionStatus.SUCCEEDED


def test_a_skip_propagates_down_a_chain_and_all_done_still_runs() -> None:
    defn = wf(
        task("a", skip_if="input.skip"),
        task("b"),
        task("c"),
        task("d"),
        task("cleanup", trigger_rule=TriggerRule.ALL_DONE),
        edges=(("a", "b"), ("b", "c"), ("c", "d"), ("d", "cleanup")),
    )
    sim, t = started(defn, {"skip": True})
    assert statuses(sim, "abcd") == [NodeStatus.SKIPPED] * 4
    assert [e.node_id for e in t.events if e.type is EventType.NODE_SKIPPED] == list("abcd")
    assert details(t, EventType.NODE_SKIPPED, "c") == {"reason": "upstream node 'b' was skipped"}
    assert sim.status("cleanup") is NodeStatus.READY
    assert sim.nodes["cleanup"].input == b"null"
    sim.complete("cleanup", b'"done"')
    assert (sim.execution.status, sim.execution.output) == (ExecutionStatus.SUCCEEDED, b'"done"')


def test_a_handled_failure_does_not_fail_the_execution() -> None:
    defn = wf(
        task("a", on_failure="h"),
        task("after", trigger_rule=TriggerRule.ALL_DONE),
        task("ok"),
        task("h", task_type="alert"),
        edges=(("a", "after"), ("a", "ok")),
    )
    sim = start(defn)
    t = sim.fail("a", "Boom", retryable=False)
    assert t.dead_lettered == ("a",)
    assert statuses(sim, ["a", "after", "ok", "h"]) == [
        NodeStatus.FAILED,
        NodeStatus.READY,
        NodeStatus.SKIPPED,
        NodeStatus.READY,
    ]
    assert sim.execution.error is None
    assert EventType.EXECUTION_FAILING not in [e.type for e in t.events]
    sim.complete("after", b'"A"')
    assert sim.execution.status is ExecutionStatus.RUNNING  # the handler still runs
    sim.complete("h")
    assert (sim.execution.status, sim.execution.output) == (
        ExecutionStatus.SUCCEEDED,
        b'{"after":"A","ok":null}',
    )


# -- switch --------------------------------------------------------------------------------


def switch_defn(**kw: Any) -> WorkflowDef:
    kw.setdefault(
        "cases",
        (
            SwitchCase("input.amount > 100", ("big",)),
            SwitchCase("input.amount > 10", ("medium", "big")),
        ),
    )
    return wf(
        NodeSpec("route", task_type="", kind="switch", **kw),
        task("big"),
        task("medium"),
        task("small"),
        task("join", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS),
        edges=(
            ("route", "big"),
            ("route", "medium"),
            ("route", "small"),
            ("big", "join"),
            ("medium", "join"),
            ("small", "join"),
        ),
    )


@pytest.mark.parametrize(
    ("amount", "match_all", "default", "taken"),
    [
        (500, False, (), ["big"]),  # the first matching case only
        (500, True, (), ["big", "medium"]),  # every matching case, each target once
        (50, False, (), ["medium", "big"]),
        (5, False, ("small",), ["small"]),  # no case matches: the default targets
        (5, False, (), []),  # nothing taken: every child skipped
    ],
)
def test_switch_takes_cases_in_order(
    amount: int, match_all: bool, default: tuple[str, ...], taken: list[str]
) -> None:
    defn = switch_defn(match_all=match_all, default_targets=default)
    sim, t = started(defn, {"amount": amount})
    route = sim.nodes["route"]
    assert (route.status, route.output) == (NodeStatus.SUCCEEDED, sim.execution.input)
    assert details(t, EventType.NODE_SUCCEEDED, "route") == {"taken": taken}
    for child in ("big", "medium", "small"):
        want = NodeStatus.READY if child in taken else NodeStatus.SKIPPED
        assert sim.status(child) is want
        if child not in taken:
            assert details(t, EventType.NODE_SKIPPED, child) == {"reason": "not chosen by 'route'"}
    for child in taken:
        assert sim.nodes[child].input == sim.execution.input
        sim.complete(child, json.dumps(child).encode())
    if taken:
        assert sim.status("join") is NodeStatus.READY
        sim.complete("join", b"1")
    else:
        assert sim.status("join") is NodeStatus.SKIPPED
    assert sim.execution.status is ExecutionStatus.SUCCEEDED


def test_a_switch_condition_error_fails_the_switch() -> None:
    defn = switch_defn(cases=(SwitchCase("input.missing > 1", ("big",)),))
    sim, t = started(defn, {"amount": 1})
    route = sim.nodes["route"]
    assert route.status is NodeStatus.FAILED
    assert route.error is not None and route.error.type == "ExpressionError"
    assert "node 'route' case 1 condition ('input.missing > 1') failed" in route.error.message
    assert t.dead_lettered == ()  # only task nodes are dead-lettered
    e = sim.execution
    assert e.status is ExecutionStatus.FAILED
    assert e.error is not None and e.error.type == "ExpressionError" and e.error.node_id == "route"
    assert statuses(sim, ["big", "medium", "small", "join"]) == [NodeStatus.SKIPPED] * 4


# -- next, skip_if, input and output mapping ------------------------------------------------


def fan_out() -> WorkflowDef:
    return wf(
        task("a"), task("b"), task("c"), task("d"), edges=(("a", "b"), ("a", "c"), ("b", "d"))
    )


def test_next_takes_only_the_named_children() -> None:
    sim = start(fan_out())
    t = complete(sim, "a", b'"A"', next=("c",))
    assert statuses(sim, "bcd") == [NodeStatus.SKIPPED, NodeStatus.READY, NodeStatus.SKIPPED]
    assert details(t, EventType.NODE_SKIPPED, "b") == {"reason": "not chosen by 'a'"}
    sim.complete("c")
    assert sim.execution.status is ExecutionStatus.SUCCEEDED


@pytest.mark.parametrize("next", [None, ()])
def test_no_next_takes_every_child(next: tuple[str, ...] | None) -> None:
    sim = start(fan_out())
    complete(sim, "a", next=next)
    assert statuses(sim, "bc") == [NodeStatus.READY] * 2


def test_next_naming_a_non_child_changes_nothing() -> None:
    sim = start(fan_out())
    sim.claim("a")
    with pytest.raises(InvalidArgument, match=r"next names 'd', not a child of node 'a'"):
        complete_node(sim.defn, sim.execution, sim.nodes, "a", b"1", sim.now, next=("b", "d"))
    assert sim.status("a") is NodeStatus.LEASED


def test_skip_if_sees_the_input_and_input_output_expressions_map_data() -> None:
    defn = wf(
        task("a", output_expr="{'total': output.n * 2, 'in': input.x}"),
        task("b", input_expr="{'value': parents.a.total, 'run': execution.id}"),
        task("c", skip_if="input.total > 5"),
        edges=(("a", "b"), ("a", "c")),
    )
    sim = start(defn, {"x": "X"})
    t = sim.complete("a", b'{"n": 4}')
    assert json.loads(sim.nodes["a"].output or b"") == {"total": 8, "in": "X"}
    assert json.loads(sim.nodes["b"].input or b"") == {"value": 8, "run": "e1"}
    assert sim.status("c") is NodeStatus.SKIPPED
    assert details(t, EventType.NODE_SKIPPED, "c") == {
        "reason": "skip_if 'input.total > 5' was true"
    }


def test_an_output_expression_error_fails_the_task_for_good() -> None:
    defn = wf(task("a", output_expr="output.nope", retry_policy=None))
    sim = start(defn)
    t = sim.complete("a", b"{}")
    a = sim.nodes["a"]
    assert (a.status, a.error.type if a.error else None) == (NodeStatus.FAILED, "ExpressionError")
    assert t.dead_lettered == ("a",)
    assert sim.execution.status is ExecutionStatus.FAILED


def test_the_plain_path_parses_no_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kw: object) -> Any:
        raise AssertionError("a payload was parsed")

    monkeypatch.setattr(_exprs, "parse", refuse)
    sim = start(fan_out())
    for nid in "abcd":
        sim.complete(nid)
    assert sim.execution.status is ExecutionStatus.SUCCEEDED


# -- map -------------------------------------------------------------------------------


def map_defn(**kw: Any) -> WorkflowDef:
    kw.setdefault("items_expr", "input.items")
    return wf(
        NodeSpec("m", task_type="square", kind="map", retry_policy=NO_WAIT, priority=3, **kw),
        task("after"),
        edges=(("m", "after"),),
    )


def test_map_runs_a_window_of_elements_and_collects_outputs_in_order() -> None:
    sim, t = started(map_defn(max_concurrency=2), {"items": [1, 2, 3, 4]})
    m = sim.nodes["m"]
    assert m.status is NodeStatus.WAITING
    assert details(t, EventType.NODE_WAITING, "m") == {"items": 4}
    items = [sim.nodes[f"m[{i}]"] for i in range(4)]
    assert [i.status for i in items] == [NodeStatus.READY] * 2 + [NodeStatus.BLOCKED] * 2
    assert [i.input for i in items] == [b"1", b"2", b"3", b"4"]
    assert {(i.role, i.task_type, i.priority) for i in items} == {(NodeRole.MAP_ITEM, "square", 3)}
    sim.complete("m[1]", b"4")  # out of order: the next BLOCKED one (2) is released
    assert statuses(sim, ["m[2]", "m[3]"]) == [NodeStatus.READY, NodeStatus.BLOCKED]
    sim.complete("m[0]", b"1")
    assert sim.status("m[3]") is NodeStatus.READY
    sim.complete("m[3]", b"16")
    assert sim.status("m") is NodeStatus.WAITING
    t = sim.complete("m[2]", b"9")
    assert sim.nodes["m"].output == b"[1,4,9,16]"
    assert details(t, EventType.NODE_SUCCEEDED, "m") == {"items": 4}
    assert sim.nodes["after"].input == b"[1,4,9,16]"
    sim.complete("after")
    assert sim.execution.status is ExecutionStatus.SUCCEEDED


def test_an_empty_map_succeeds_at_once_with_its_output_mapped() -> None:
    sim = start(map_defn(output_expr="{'n': output.size()}"), {"items": []})
    assert (sim.status("m"), sim.nodes["m"].output) == (NodeStatus.SUCCEEDED, b'{"n":0}')
    assert sim.status("after") is NodeStatus.READY


def test_a_failing_element_fails_the_map_and_cancels_the_others() -> None:
    sim = start(map_defn(), {"items": ["a", "b", "c"]})
    sim.complete("m[0]", b'"A"')
    sim.claim("m[2]", worker="w2")
    t = sim.fail("m[1]", "Boom", "broken", retryable=False)
    assert t.dead_lettered == ("m[1]",)
    assert statuses(sim, ["m[0]", "m[1]", "m[2]", "m", "after"]) == [
        NodeStatus.SUCCEEDED,
        NodeStatus.FAILED,
        NodeStatus.CANCELLED,
        NodeStatus.FAILED,
        NodeStatus.SKIPPED,
    ]
    m = sim.nodes["m"]
    assert m.error is not None
    assert m.error.message == "element 1 ('m[1]') failed on attempt 1: broken"
    e = sim.execution
    assert e.status is ExecutionStatus.FAILED
    assert e.error is not None and (e.error.type, e.error.node_id) == ("Boom", "m")
    with pytest.raises(FailedPrecondition, match="redriving map elements is not supported"):
        redrive(sim.defn, e, sim.nodes, "m[1]", "dl", sim.now)


def test_an_element_timing_out_unstarted_fails_the_map() -> None:
    sim = start(map_defn(schedule_to_start_timeout=SEC), {"items": [1]})
    sim.now += SEC
    sim.do(time_out_unstarted, "m[0]")
    assert statuses(sim, ["m[0]", "m"]) == [NodeStatus.TIMED_OUT, NodeStatus.FAILED]
    assert sim.execution.status is ExecutionStatus.FAILED


@pytest.mark.parametrize(
    ("input", "message"),
    [
        ({"items": 3}, "gave int, not a list"),
        ({"items": [1, 2, 3]}, "gave 3 elements, more than the limit of 2"),
    ],
)
def test_a_map_without_a_usable_list_fails(
    monkeypatch: pytest.MonkeyPatch, input: Any, message: str
) -> None:
    monkeypatch.setattr(_kinds, "MAX_MAP_ITEMS", 2)
    sim = start(map_defn(), input)
    m = sim.nodes["m"]
    assert m.status is NodeStatus.FAILED
    assert m.error is not None and m.error.type == "ExpressionError"
    assert message in m.error.message
    assert sim.execution.status is ExecutionStatus.FAILED


def test_cancelling_an_element_cancels_its_map() -> None:
    sim = start(map_defn(), {"items": [1, 2]})
    sim.do(cancel_node, "m[0]", "op")
    assert statuses(sim, ["m[0]", "m[1]", "m", "after"]) == [
        NodeStatus.CANCELLED,
        NodeStatus.CANCELLED,
        NodeStatus.CANCELLED,
        NodeStatus.SKIPPED,
    ]
    assert sim.execution.status is ExecutionStatus.CANCELLED


# -- workflow nodes ----------------------------------------------------------------------


def child_defn(**kw: Any) -> WorkflowDef:
    return wf(
        task("a"),
        NodeSpec("sub", task_type="", kind="workflow", workflow_name="child", priority=2, **kw),
        task("b"),
        edges=(("a", "sub"), ("sub", "b")),
    )


def child(status: ExecutionStatus, **kw: Any) -> Execution:
    return Execution(
        id="c1",
        workflow_name="child",
        workflow_version=4,
        status=status,
        input=b"{}",
        created_at=T0,
        updated_at=T0,
        parent_execution_id="e1",
        parent_node_id="sub",
        depth=1,
        **kw,
    )


def waiting(sim: Sim) -> Transition:
    t = sim.complete("a", b'{"n": 1}')
    assert t.start_children[0].node_id == "sub"
    sim.nodes["sub"] = replace(sim.nodes["sub"], child_execution_id="c1")  # as the service does
    return t


def test_a_ready_workflow_node_waits_for_its_child() -> None:
    sim = start(child_defn(input_expr="{'m': input.n + 1}"))
    t = waiting(sim)
    (start_child,) = t.start_children
    assert (start_child.workflow_name, start_child.workflow_version) == ("child", 0)
    assert (json.loads(start_child.input), start_child.priority) == ({"m": 2}, 2)
    assert sim.status("sub") is NodeStatus.WAITING
    assert (EventType.NODE_WAITING, "sub") in kinds(t)
    assert not any(n.node_id == "sub" for n in t.ready)


def test_a_succeeded_child_gives_the_node_its_output() -> None:
    sim = start(child_defn(output_expr="output.total"))
    waiting(sim)
    t = sim.do(child_ended, "sub", child(ExecutionStatus.SUCCEEDED, output=b'{"total": 7}'))
    assert (sim.status("sub"), sim.nodes["sub"].output) == (NodeStatus.SUCCEEDED, b"7")
    assert details(t, EventType.NODE_SUCCEEDED, "sub") == {"child_execution_id": "c1"}
    assert (sim.status("b"), sim.nodes["b"].input) == (NodeStatus.READY, b"7")


def test_a_failed_child_fails_the_node_with_the_chain_of_errors() -> None:
    sim = start(child_defn())
    waiting(sim)
    error = ErrorInfo("Boom", "node 'x' failed on attempt 1: broken", node_id="x")
    t = sim.do(child_ended, "sub", child(ExecutionStatus.FAILED, error=error))
    sub = sim.nodes["sub"]
    assert sub.status is NodeStatus.FAILED and sub.error is not None
    assert (sub.error.type, sub.error.message) == (
        "Boom",
        "child execution 'c1' of workflow 'child' failed: node 'x' failed on attempt 1: broken",
    )
    assert t.dead_lettered == ()
    e = sim.execution
    assert e.status is ExecutionStatus.FAILED and e.error is not None
    assert e.error.message == f"node 'sub' failed: {sub.error.message}"
    assert sim.status("b") is NodeStatus.SKIPPED


def test_a_timed_out_child_without_error_fails_the_node_as_child_workflow_failed() -> None:
    sim = start(child_defn())
    waiting(sim)
    sim.do(child_ended, "sub", child(ExecutionStatus.TIMED_OUT))
    sub = sim.nodes["sub"]
    assert sub.error is not None and sub.error.type == "ChildWorkflowFailed"


def test_a_cancelled_child_cancels_the_node_and_the_execution() -> None:
    sim = start(child_defn())
    waiting(sim)
    t = sim.do(child_ended, "sub", child(ExecutionStatus.CANCELLED))
    assert statuses(sim, ["sub", "b"]) == [NodeStatus.CANCELLED, NodeStatus.SKIPPED]
    assert t.cancel_children == ()  # it has ended already
    assert sim.execution.status is ExecutionStatus.CANCELLED


def test_child_ended_refuses_what_does_not_fit() -> None:
    sim = start(child_defn())
    with pytest.raises(FailedPrecondition, match="node is BLOCKED, not WAITING"):
        sim.do(child_ended, "sub", child(ExecutionStatus.SUCCEEDED))
    waiting(sim)
    with pytest.raises(FailedPrecondition, match="is RUNNING; report it once it has ended"):
        sim.do(child_ended, "sub", child(ExecutionStatus.RUNNING))
    with pytest.raises(FailedPrecondition, match="waits for child execution 'c1', not 'c2'"):
        sim.do(child_ended, "sub", replace(child(ExecutionStatus.SUCCEEDED), id="c2"))
    with pytest.raises(FailedPrecondition, match="it is a task node, not a workflow node"):
        sim.do(child_ended, "b", child(ExecutionStatus.SUCCEEDED))


def test_a_child_that_cannot_start_fails_the_node() -> None:
    sim = start(child_defn())
    sim.complete("a")
    sim.do(fail_waiting_node, "sub", ErrorInfo("NotFound", "workflow 'child' is not registered"))
    sub = sim.nodes["sub"]
    assert sub.status is NodeStatus.FAILED and sub.error is not None
    assert (sub.error.type, sub.error.node_id) == ("NotFound", "sub")
    assert sim.execution.status is ExecutionStatus.FAILED


@pytest.mark.parametrize("how", ["execution", "node", "failure"])
def test_cancelling_a_waiting_node_cancels_its_child(how: str) -> None:
    defn = wf(
        task("a"),
        NodeSpec("sub", task_type="", kind="workflow", workflow_name="child"),
        task("other"),
        edges=(("a", "sub"),),
    )
    sim = start(defn)
    waiting(sim)
    if how == "execution":
        t = sim.do(cancel_execution, "stop")
    elif how == "node":
        t = sim.do(cancel_node, "sub", "stop")
    else:
        t = sim.fail("other", retryable=False)
    assert t.cancel_children == ("c1",)
    assert sim.status("sub") is NodeStatus.CANCELLED


# -- dynamic expansion ---------------------------------------------------------------------


def test_an_expansion_adds_nodes_that_run_like_the_others() -> None:
    defn = wf(task("a"), task("z"), edges=(("a", "z"),))
    sim = start(defn)
    sim.complete("a", b'"A"')
    extra = Expansion(
        nodes=(task("x"), task("y", input_expr="{'from': input}")),
        edges=(("z", "x"), ("x", "y")),
    )
    t = complete(sim, "z", b'"Z"', expansion=extra)
    assert details(t, EventType.NODE_SUCCEEDED, "z") == {"expanded": ["x", "y"]}
    doc = json.loads(sim.execution.expansion or b"")
    assert [n["id"] for n in doc["nodes"]] == ["x", "y"] and doc["edges"] == [
        ["z", "x"],
        ["x", "y"],
    ]
    assert (sim.status("x"), sim.nodes["x"].input, sim.status("y")) == (
        NodeStatus.READY,
        b'"Z"',
        NodeStatus.BLOCKED,
    )
    merged = effective_definition(defn, sim.execution)
    assert [n.id for n in merged.nodes] == ["a", "z", "x", "y"]
    assert effective_definition(defn, sim.execution) is merged  # cached
    assert effective_definition(merged, sim.execution) is merged  # idempotent
    sim.defn = merged
    sim.complete("x", b'"X"')
    assert json.loads(sim.nodes["y"].input or b"") == {"from": "X"}
    sim.complete("y", b'"Y"')
    assert (sim.execution.status, sim.execution.output) == (ExecutionStatus.SUCCEEDED, b'"Y"')


@pytest.mark.parametrize(
    ("expansion", "message"),
    [
        (Expansion(nodes=(task("b"),)), "adds node 'b', which the execution already has"),
        (Expansion(nodes=(task("x"), task("x"))), "adds node 'x' twice"),
        (Expansion(edges=(("q", "b"),)), "edge q -> b starts at unknown node 'q'"),
        (Expansion(edges=(("a", "q"),)), "edge a -> q ends at unknown node 'q'"),
        (
            Expansion(nodes=(task("x"),), edges=(("x", "a"),)),
            "ends at node 'a', which has already started (LEASED)",
        ),
        (
            Expansion(nodes=(task("x"),), edges=(("b", "x"), ("x", "b"))),
            "has a cycle: ",
        ),
        (Expansion(nodes=(task("x", skip_if="1 +"),)), "node 'x' skip_if is not a valid CEL"),
    ],
)
def test_an_invalid_expansion_changes_nothing(expansion: Expansion, message: str) -> None:
    defn = wf(task("a"), task("b"), edges=(("a", "b"),))
    sim = start(defn)
    sim.claim("a")
    with pytest.raises(InvalidArgument, match="expansion by node 'a'") as info:
        complete_node(defn, sim.execution, sim.nodes, "a", b"1", sim.now, expansion=expansion)
    assert message in str(info.value)


def test_an_expansion_over_the_limits_is_refused() -> None:
    from coordinator.engine import Limits

    sim = start(wf(task("a")))
    sim.claim("a")
    with pytest.raises(InvalidArgument, match="more than the limit of 1"):
        complete_node(
            sim.defn,
            sim.execution,
            sim.nodes,
            "a",
            b"1",
            sim.now,
            expansion=Expansion(nodes=(task("x"),)),
            limits=Limits(max_nodes=1),
        )


# -- a delayed execution -------------------------------------------------------------------


def test_cancelling_a_pending_execution_needs_no_node_runs() -> None:
    defn = wf(task("a"))
    pending = new_execution(defn, b"{}")
    t = cancel_execution(defn, pending, {}, "changed my mind", T0 + SEC)
    assert (t.execution.status, t.execution.ended_at, t.nodes) == (
        ExecutionStatus.CANCELLED,
        T0 + SEC,
        (),
    )
    assert kinds(t) == [(EventType.EXECUTION_CANCELLED, None)]
