"""Approval nodes in the engine: waiting for a decision, approve, reject, time out, and the
checks at registration."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import pytest

from coordinator.engine import (
    APPROVAL_REJECTED,
    APPROVAL_TIMEOUT,
    Limits,
    approval_role,
    approve_node,
    cancel_execution,
    cancel_node,
    reject_node,
    time_out_approval,
    validate_definition,
)
from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound
from coordinator.model import (
    EventType,
    ExecutionStatus,
    NodeSpec,
    NodeStatus,
    RetryPolicy,
    Transition,
    TriggerRule,
    WorkflowDef,
    definition_from_document,
    definition_to_document,
)
from tests.support.engine_sim import NO_WAIT, SEC, Sim, details, kinds

HOUR = timedelta(hours=1)


def task(id: str, **kw: Any) -> NodeSpec:
    kw.setdefault("task_type", "t")
    kw.setdefault("retry_policy", NO_WAIT)
    return NodeSpec(id=id, **kw)


def approval(id: str = "review", **kw: Any) -> NodeSpec:
    kw.setdefault("required_role", "operator")
    kw.setdefault("task_type", "")
    return NodeSpec(id=id, kind="approval", **kw)


def wf(*nodes: NodeSpec, edges: tuple[tuple[str, str], ...] = ()) -> WorkflowDef:
    defn = WorkflowDef(name="ap", nodes=nodes, edges=edges, tenant_id="acme")
    validate_definition(defn)
    return defn


def flow(**review: Any) -> WorkflowDef:
    """prepare -> review (approval) -> ship."""
    return wf(
        task("prepare"),
        approval(**review),
        task("ship"),
        edges=(("prepare", "review"), ("review", "ship")),
    )


def waiting(defn: WorkflowDef) -> tuple[Sim, Transition]:
    sim = Sim(defn, input=b'{"order": 7}')
    t = sim.complete("prepare", b'{"amount": 4800}')
    return sim, t


def decide(
    fn: Callable[..., Transition], node_id: str = "review", by: str = "ann", comment: str = ""
) -> Callable[..., Transition]:
    """``fn`` in ``Sim.do``'s calling convention (defn, execution, nodes, now)."""

    def call(defn: WorkflowDef, execution: Any, nodes: Any, now: datetime) -> Transition:
        return fn(defn, execution, nodes, node_id, by=by, comment=comment, now=now)

    return call


def at(sim: Sim) -> str:
    return sim.now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- waiting ------------------------------------------------------------------------------


def test_a_ready_approval_node_waits_without_a_worker() -> None:
    sim, t = waiting(flow(prompt="Check the amount", approval_timeout=HOUR))
    review = sim.nodes["review"]
    assert review.status is NodeStatus.WAITING
    assert (review.input, review.worker_id, review.lease_deadline) == (
        b'{"amount": 4800}',
        None,
        None,
    )
    assert review.schedule_deadline == sim.now + HOUR
    assert review.task_type == ""
    assert t.ready == ()  # nothing to dispatch
    assert (EventType.NODE_WAITING, "review") in kinds(t)
    assert details(t, EventType.NODE_WAITING, "review") == {
        "required_role": "operator",
        "prompt": "Check the amount",
        "deadline": (sim.now + HOUR).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    assert sim.status("ship") is NodeStatus.BLOCKED
    assert sim.execution.status is ExecutionStatus.RUNNING


def test_an_entry_approval_node_waits_from_the_start_with_no_deadline() -> None:
    sim = Sim(wf(approval(), task("after"), edges=(("review", "after"),)), input=b'{"x": 1}')
    review = sim.nodes["review"]
    assert (review.status, review.input, review.schedule_deadline) == (
        NodeStatus.WAITING,
        b'{"x": 1}',
        None,
    )


# -- approve ------------------------------------------------------------------------------


def test_approving_succeeds_the_node_with_the_decision_and_the_flow_goes_on() -> None:
    sim, _ = waiting(flow(approval_timeout=HOUR))
    t = sim.do(decide(approve_node, comment="looks fine"))
    decision = {"approved": True, "by": "ann", "at": at(sim), "comment": "looks fine"}
    assert kinds(t)[:2] == [
        (EventType.NODE_APPROVED, "review"),
        (EventType.NODE_SUCCEEDED, "review"),
    ]
    assert details(t, EventType.NODE_APPROVED, "review") == decision
    review = sim.nodes["review"]
    assert review.status is NodeStatus.SUCCEEDED
    assert json.loads(review.output or b"") == decision
    assert review.schedule_deadline is None
    assert sim.status("ship") is NodeStatus.READY
    assert json.loads(sim.nodes["ship"].input or b"") == decision
    sim.complete("ship", b'"shipped"')
    assert sim.execution.status is ExecutionStatus.SUCCEEDED


def test_the_output_mapping_sees_the_decision_and_the_nodes_input() -> None:
    sim, _ = waiting(flow(output_expr="{'ok': output.approved, 'amount': input.amount}"))
    sim.do(decide(approve_node))
    assert json.loads(sim.nodes["review"].output or b"") == {"ok": True, "amount": 4800}


# -- reject -------------------------------------------------------------------------------


def test_rejecting_fails_the_node_for_good_with_the_comment_as_reason() -> None:
    sim, _ = waiting(flow())
    t = sim.do(decide(reject_node, by="bob", comment="amount too high"))
    decision = {"approved": False, "by": "bob", "at": at(sim), "comment": "amount too high"}
    assert details(t, EventType.NODE_REJECTED, "review") == decision
    assert details(t, EventType.NODE_FAILED, "review") == {
        "error_type": APPROVAL_REJECTED,
        "message": "amount too high",
    }
    review = sim.nodes["review"]
    assert review.status is NodeStatus.FAILED and review.error is not None
    assert (review.error.type, review.error.message) == (APPROVAL_REJECTED, "amount too high")
    assert json.loads(review.error.details or b"") == decision
    assert t.dead_lettered == ()  # people decided: nothing to redrive
    assert sim.status("ship") is NodeStatus.SKIPPED
    e = sim.execution
    assert e.status is ExecutionStatus.FAILED and e.error is not None
    assert e.error.message == "node 'review' was rejected by bob: amount too high"
    assert (e.error.type, e.error.node_id) == (APPROVAL_REJECTED, "review")


def test_a_rejection_without_comment_says_so() -> None:
    sim, _ = waiting(flow())
    sim.do(decide(reject_node, by="bob"))
    review, e = sim.nodes["review"], sim.execution
    assert review.error is not None and review.error.message == "rejected by bob, no comment given"
    assert e.error is not None
    assert e.error.message == "node 'review' was rejected by bob (no comment given)"


def test_a_rejection_is_handled_by_a_child_that_runs_after_failures() -> None:
    defn = wf(
        task("prepare"),
        approval(on_failure="notify"),
        task("cleanup", trigger_rule=TriggerRule.ALL_DONE),
        task("notify"),
        edges=(("prepare", "review"), ("review", "cleanup")),
    )
    sim, _ = waiting(defn)
    sim.do(decide(reject_node, comment="no"))
    assert sim.status("review") is NodeStatus.FAILED
    assert sim.status("cleanup") is NodeStatus.READY
    assert json.loads(sim.nodes["notify"].input or b"")["error"]["type"] == APPROVAL_REJECTED
    assert sim.execution.status is ExecutionStatus.RUNNING


# -- what cannot be decided ---------------------------------------------------------------


def refused(sim: Sim, fn: Callable[..., Transition], node_id: str) -> str:
    with pytest.raises(FailedPrecondition) as info:
        fn(sim.defn, sim.execution, sim.nodes, node_id, by="ann", comment="", now=sim.now)
    return str(info.value)


def test_only_a_waiting_approval_node_can_be_decided() -> None:
    sim = Sim(flow(), input=b"{}")
    message = refused(sim, approve_node, "review")
    assert "node is BLOCKED, not WAITING; it has not been reached yet" in message
    message = refused(sim, reject_node, "prepare")
    assert "it is a task node, not an approval node" in message
    with pytest.raises(NotFound, match="has no node 'nope'"):
        approve_node(sim.defn, sim.execution, sim.nodes, "nope", by="a", comment="", now=sim.now)

    sim.complete("prepare")
    sim.do(decide(approve_node))
    assert "it was approved already" in refused(sim, approve_node, "review")
    assert "it was approved already" in refused(sim, reject_node, "review")


def test_a_rejected_node_or_an_ended_execution_cannot_be_decided_again() -> None:
    sim, _ = waiting(flow())
    sim.do(decide(reject_node))
    message = refused(sim, approve_node, "review")
    assert "execution 'e1' is FAILED" in message


def test_approval_role_names_the_role_or_refuses_other_nodes() -> None:
    sim, _ = waiting(flow(required_role="finance"))
    assert approval_role(sim.defn, sim.execution, sim.nodes, "review", "approve") == "finance"
    with pytest.raises(FailedPrecondition, match="cannot reject node 'ship': it is a task node"):
        approval_role(sim.defn, sim.execution, sim.nodes, "ship", "reject")


def test_a_cancelled_approval_cannot_be_decided() -> None:
    defn = wf(
        task("prepare"),
        approval(approval_timeout=HOUR),
        task("ship"),
        task("other"),
        edges=(("prepare", "review"), ("review", "ship"), ("prepare", "other")),
    )
    sim, _ = waiting(defn)
    sim.do(cancel_node, "review", "not needed")
    review = sim.nodes["review"]
    assert (review.status, review.schedule_deadline) == (NodeStatus.CANCELLED, None)
    assert sim.status("ship") is NodeStatus.SKIPPED
    assert "node is CANCELLED, not WAITING; it was cancelled" in refused(
        sim, approve_node, "review"
    )


def test_cancelling_the_execution_cancels_a_waiting_approval() -> None:
    sim, _ = waiting(flow(approval_timeout=HOUR))
    sim.do(cancel_execution, "stop")
    assert sim.status("review") is NodeStatus.CANCELLED
    assert "execution 'e1' is CANCELLED" in refused(sim, approve_node, "review")


# -- time out -----------------------------------------------------------------------------


def test_an_undecided_approval_times_out_at_its_deadline() -> None:
    sim, _ = waiting(flow(approval_timeout=HOUR))
    early = partial(time_out_approval, node_id="review")
    with pytest.raises(FailedPrecondition, match="has not passed yet"):
        early(sim.defn, sim.execution, sim.nodes, now=sim.now + HOUR - SEC)
    sim.now += HOUR
    t = sim.do(time_out_approval, "review")
    review = sim.nodes["review"]
    assert review.status is NodeStatus.TIMED_OUT and review.error is not None
    assert review.error.type == APPROVAL_TIMEOUT
    assert "no decision within 3600s" in review.error.message
    assert (EventType.NODE_TIMED_OUT, "review") in kinds(t)
    assert t.dead_lettered == ()
    assert sim.status("ship") is NodeStatus.SKIPPED
    e = sim.execution
    assert e.status is ExecutionStatus.FAILED and e.error is not None
    assert e.error.message.startswith("node 'review' timed out: no decision within 3600s")


def test_an_approval_without_timeout_never_times_out() -> None:
    sim, _ = waiting(flow())
    with pytest.raises(FailedPrecondition, match="it has no approval_timeout"):
        time_out_approval(sim.defn, sim.execution, sim.nodes, "review", sim.now + 1000 * HOUR)


# -- registration -------------------------------------------------------------------------


def invalid(*nodes: NodeSpec, limits: Limits | None = None) -> str:
    defn = WorkflowDef(name="ap", nodes=nodes)
    with pytest.raises(InvalidArgument) as info:
        validate_definition(defn, limits or Limits())
    return str(info.value)


def test_registration_checks_approval_nodes() -> None:
    assert "approval node with no required_role" in invalid(approval(required_role=""))
    assert "required_role 'two words' is invalid" in invalid(approval(required_role="two words"))
    assert "approval_timeout is 0.0s" in invalid(approval(approval_timeout=timedelta(0)))
    assert "prompt is 11 characters long; use at most 10" in invalid(
        approval(prompt="x" * 11), limits=Limits(max_prompt_length=10)
    )
    for field, value in (
        ("task_type", "t"),
        ("config", b"{}"),
        ("retry_policy", RetryPolicy()),
        ("start_to_close_timeout", HOUR),
        ("schedule_to_start_timeout", HOUR),
        ("pause_before", True),
    ):
        message = invalid(approval(**{field: value}))
        assert f"is an approval node and sets {field}" in message, message
    assert "sets required_role but is a task node" in invalid(task("a", required_role="x"))
    assert "sets prompt but is a task node" in invalid(task("a", prompt="x"))


def test_the_approval_settings_survive_the_stored_document() -> None:
    defn = flow(required_role="finance", approval_timeout=90 * SEC, prompt="Check it")
    back = definition_from_document(json.loads(json.dumps(definition_to_document(defn))))
    assert back.node_map["review"] == defn.node_map["review"]
    assert back.content_hash == defn.content_hash
    assert flow(prompt="other").content_hash != flow().content_hash
    plain = definition_to_document(wf(task("a")))["nodes"][0]
    assert not {"required_role", "approval_timeout", "prompt"} & plain.keys()
