"""Operator and sweeper transitions: cancel, pause/resume, time outs and redrive."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import pytest

from coordinator.engine import (
    cancel_execution,
    cancel_node,
    complete_node,
    fail_node,
    pause_execution,
    pause_node,
    redrive,
    resume_execution,
    resume_node,
    time_out_execution,
    time_out_unstarted,
)
from coordinator.errors import FailedPrecondition, NotFound
from coordinator.model import (
    ErrorInfo,
    EventType,
    ExecutionStatus,
    NodeRole,
    NodeSpec,
    NodeStatus,
    RetryPolicy,
    WorkflowDef,
)
from tests.support.engine_sim import SEC, T0, Sim, comp, details, handler_defn, kinds, saga

# a -> b -> c, a -> d; h handles b
TREE = WorkflowDef(
    name="tree",
    nodes=(
        NodeSpec("a", "t"),
        NodeSpec("b", "t", on_failure="h", schedule_to_start_timeout=5 * SEC),
        NodeSpec("c", "t"),
        NodeSpec("d", "t"),
        NodeSpec("h", "alert"),
    ),
    edges=(("a", "b"), ("b", "c"), ("a", "d")),
    execution_timeout=timedelta(minutes=10),
)


def precondition(fn: object, sim: Sim, *args: object) -> str:
    with pytest.raises(FailedPrecondition) as info:
        fn(sim.defn, sim.execution, sim.nodes, *args, sim.now)  # type: ignore[operator]
    return str(info.value)


# -- cancel --------------------------------------------------------------------------------


def test_cancel_execution_cancels_every_unfinished_node() -> None:
    sim = Sim(TREE)
    sim.complete("a")
    sim.claim("b", worker="wb")
    t = sim.do(cancel_execution, "by operator")
    assert [(n.node_id, n.status) for n in t.nodes] == [
        ("b", NodeStatus.CANCELLED),
        ("c", NodeStatus.CANCELLED),
        ("d", NodeStatus.CANCELLED),
        ("h", NodeStatus.CANCELLED),
    ]
    assert kinds(t)[-1] == (EventType.EXECUTION_CANCELLED, None)
    assert details(t, EventType.EXECUTION_CANCELLED) == {"reason": "by operator"}
    assert details(t, EventType.NODE_CANCELLED, "c") == {"reason": "by operator"}
    b = sim.nodes["b"]  # the lease stays, so the worker's heartbeat learns of the cancel
    assert (b.worker_id, b.lease_seq, b.lease_deadline) == ("wb", 1, None)
    assert (sim.execution.status, sim.execution.ended_at) == (ExecutionStatus.CANCELLED, sim.now)
    assert precondition(cancel_execution, sim, "again") == (
        "cannot cancel execution 'e1': execution is CANCELLED; "
        "only unfinished executions can be cancelled"
    )
    with pytest.raises(FailedPrecondition, match="already CANCELLED"):
        complete_node(sim.defn, sim.execution, sim.nodes, "b", b"1", sim.now)


def test_cancel_a_succeeded_execution_is_refused() -> None:
    sim = Sim(WorkflowDef(name="w", nodes=(NodeSpec("a", "t"),)))
    sim.complete("a")
    assert "execution is SUCCEEDED; only unfinished executions can be cancelled" in (
        precondition(cancel_execution, sim, "x")
    )


def test_cancel_node_skips_below_and_other_branches_go_on() -> None:
    sim = Sim(TREE)
    sim.complete("a")
    t = sim.do(cancel_node, "b", "not needed")
    assert kinds(t) == [(EventType.NODE_CANCELLED, "b"), (EventType.NODE_SKIPPED, "c")]
    assert details(t, EventType.NODE_SKIPPED, "c") == {"reason": "upstream node 'b' was cancelled"}
    assert sim.execution.status is ExecutionStatus.RUNNING
    t = sim.complete("d")
    assert kinds(t)[-2:] == [
        (EventType.NODE_SKIPPED, "h"),
        (EventType.EXECUTION_CANCELLED, None),
    ]
    assert sim.execution.status is ExecutionStatus.CANCELLED
    assert sim.execution.error is None


def test_cancelling_a_waiting_child_ends_the_run_when_its_parent_completes() -> None:
    # the completing node is not a sink, yet the execution is done
    pair = WorkflowDef(
        name="w", nodes=(NodeSpec("a", "t"), NodeSpec("b", "t")), edges=(("a", "b"),)
    )
    sim = Sim(pair)
    sim.claim("a")
    sim.do(cancel_node, "b", "x")
    t = sim.do(complete_node, "a", b"1")
    assert kinds(t) == [(EventType.NODE_SUCCEEDED, "a"), (EventType.EXECUTION_CANCELLED, None)]


def test_cancel_node_errors() -> None:
    sim = Sim(TREE)
    with pytest.raises(NotFound, match="no node 'zz'"):
        cancel_node(TREE, sim.execution, sim.nodes, "zz", "x", sim.now)
    sim.complete("a")
    assert "cannot cancel node 'a': node is SUCCEEDED; only an unfinished node can be" in (
        precondition(cancel_node, sim, "a", "x")
    )
    sim.do(cancel_execution, "x")
    assert "execution 'e1' is CANCELLED" in precondition(cancel_node, sim, "b", "x")


def test_cancelled_handler_is_not_triggered() -> None:
    sim = Sim(TREE)
    sim.do(cancel_node, "h", "no paging")
    sim.complete("a")
    t = sim.fail("b")
    assert kinds(t)[-1] == (EventType.EXECUTION_FAILED, None)
    assert sim.status("h") is NodeStatus.CANCELLED


def test_cancelling_a_compensation_moves_on_to_the_next() -> None:
    sim = Sim(saga())
    sim.complete("reserve")
    sim.complete("charge")
    sim.fail("plain", retryable=False)
    assert sim.status(comp("charge")) is NodeStatus.READY
    t = sim.do(cancel_node, comp("charge"), "skip refund")
    assert kinds(t) == [
        (EventType.NODE_CANCELLED, comp("charge")),
        (EventType.NODE_READY, comp("reserve")),
    ]
    sim.complete(comp("reserve"))
    assert sim.execution.status is ExecutionStatus.FAILED  # the error wins over the cancel


# -- pause and resume ----------------------------------------------------------------------


def test_pause_holds_ready_nodes_and_new_ones_resume_releases_them() -> None:
    sim = Sim(TREE)
    sim.claim("a")
    t = sim.do(pause_execution)
    assert kinds(t) == [(EventType.EXECUTION_PAUSED, None)]  # nothing READY yet
    t = sim.do(complete_node, "a", b'"A"')  # a running attempt may finish
    assert kinds(t) == [
        (EventType.NODE_SUCCEEDED, "a"),
        (EventType.NODE_READY, "b"),
        (EventType.NODE_HELD, "b"),
        (EventType.NODE_READY, "d"),
        (EventType.NODE_HELD, "d"),
    ]
    assert all(sim.nodes[i].held and sim.nodes[i].schedule_deadline is None for i in "bd")
    assert "execution is PAUSED; only a RUNNING execution can be paused" in (
        precondition(pause_execution, sim)
    )
    sim.do(pause_node, "d")
    t = sim.do(resume_execution)
    assert kinds(t) == [(EventType.EXECUTION_RESUMED, None), (EventType.NODE_RELEASED, "b")]
    b = sim.nodes["b"]
    assert (b.held, b.schedule_deadline) == (False, sim.now + 5 * SEC)
    assert sim.nodes["d"].held  # paused on its own
    assert "execution is RUNNING; only a PAUSED execution can be resumed" in (
        precondition(resume_execution, sim)
    )
    t = sim.do(pause_execution)
    assert kinds(t) == [(EventType.EXECUTION_PAUSED, None), (EventType.NODE_HELD, "b")]


def test_a_paused_execution_can_fail_be_cancelled_and_time_out() -> None:
    sim = Sim(WorkflowDef(name="w", nodes=(NodeSpec("a", "t"),)))
    sim.claim("a")
    sim.do(pause_execution)
    sim.do(fail_node, "a", ErrorInfo("Boom", "x"), False)
    assert sim.execution.status is ExecutionStatus.FAILED

    sim = Sim(WorkflowDef(name="w", nodes=(NodeSpec("a", "t"),)))
    sim.do(pause_execution)
    sim.do(cancel_execution, "x")
    assert sim.execution.status is ExecutionStatus.CANCELLED

    sim = Sim(TREE)
    sim.do(pause_execution)
    sim.now = T0 + timedelta(minutes=10)
    sim.apply(time_out_execution(TREE, sim.execution, sim.nodes, sim.now))
    assert sim.execution.status is ExecutionStatus.TIMED_OUT


def test_a_paused_execution_can_succeed() -> None:
    sim = Sim(WorkflowDef(name="w", nodes=(NodeSpec("a", "t"),)))
    sim.claim("a")
    sim.do(pause_execution)
    sim.do(complete_node, "a", b"7")
    assert (sim.execution.status, sim.execution.output) == (ExecutionStatus.SUCCEEDED, b"7")


def test_pause_and_resume_node() -> None:
    sim = Sim(TREE)
    t = sim.do(pause_node, "b")  # BLOCKED: held once it is READY
    assert kinds(t) == [(EventType.NODE_HELD, "b")]
    assert details(t, EventType.NODE_HELD, "b") == {"reason": "node paused", "held": False}
    assert (sim.nodes["b"].node_paused, sim.nodes["b"].held) == (True, False)
    assert "node is already paused" in precondition(pause_node, sim, "b")
    sim.complete("a")
    b = sim.nodes["b"]
    assert (b.status, b.held, b.schedule_deadline) == (NodeStatus.READY, True, None)
    assert "node is held (paused)" in precondition(time_out_unstarted, sim, "b")
    sim.do(pause_execution)
    t = sim.do(resume_node, "b")  # still held by the paused execution
    assert details(t, EventType.NODE_RELEASED, "b") == {"reason": "node resumed", "held": True}
    assert (sim.nodes["b"].node_paused, sim.nodes["b"].held) == (False, True)
    sim.do(resume_execution)
    assert sim.nodes["b"].held is False
    sim.do(pause_node, "b")  # READY: held at once
    assert sim.nodes["b"].held
    t = sim.do(resume_node, "b")
    assert kinds(t) == [(EventType.NODE_RELEASED, "b")]
    assert sim.nodes["b"].schedule_deadline == sim.now + 5 * SEC
    assert "node is not paused" in precondition(resume_node, sim, "b")
    sim.claim("b")
    message = precondition(pause_node, sim, "b")
    assert (
        message
        == "cannot pause node 'b': node is LEASED; a node can only be paused before it starts"
    )
    with pytest.raises(NotFound):
        pause_node(TREE, sim.execution, sim.nodes, "zz", sim.now)


# -- time outs -----------------------------------------------------------------------------


def test_time_out_unstarted_dead_letters_without_retrying() -> None:
    policy = RetryPolicy(max_attempts=5)
    defn = replace(
        TREE,
        nodes=tuple(replace(n, retry_policy=policy) if n.id == "b" else n for n in TREE.nodes),
    )
    sim = Sim(defn)
    assert "node is BLOCKED, not READY" in precondition(time_out_unstarted, sim, "b")
    assert "no schedule-to-start deadline" in precondition(time_out_unstarted, sim, "a")
    sim.complete("a", b'{"a": 1}')
    deadline = sim.nodes["b"].schedule_deadline
    assert deadline == sim.now + 5 * SEC
    sim.now = deadline - SEC
    assert "has not passed yet" in precondition(time_out_unstarted, sim, "b")
    sim.now = deadline - SEC  # do() adds a second: exactly the deadline
    t = sim.do(time_out_unstarted, "b")
    assert kinds(t) == [
        (EventType.NODE_TIMED_OUT, "b"),
        (EventType.NODE_DEAD_LETTERED, "b"),
        (EventType.NODE_SKIPPED, "c"),
        (EventType.NODE_CANCELLED, "d"),
        (EventType.EXECUTION_FAILING, None),
        (EventType.NODE_READY, "h"),
    ]
    assert t.dead_lettered == ("b",)
    message = (
        "not started within 5s of becoming ready (schedule_to_start_timeout); "
        "check that workers for task type 't' are running and have capacity"
    )
    assert sim.nodes["b"].error == ErrorInfo("ScheduleToStartTimeout", message, None, "b", 0)
    assert sim.execution.error == ErrorInfo(
        "ScheduleToStartTimeout", f"node 'b' was {message}", None, "b", 0
    )
    handler_input = json.loads(sim.nodes["h"].input or b"")
    assert handler_input == {
        "node_id": "b",
        "error": {
            "type": "ScheduleToStartTimeout",
            "message": message,
            "attempt": 0,
            "worker_id": None,
        },
        "input": {"a": 1},
    }
    sim.complete("h")
    assert sim.execution.status is ExecutionStatus.FAILED


def test_a_handler_timing_out_unstarted_ends_the_failure_flow() -> None:
    sim = Sim(handler_defn(schedule_to_start_timeout=2 * SEC))
    sim.complete("a")
    sim.fail("b")
    sim.now += 2 * SEC
    t = sim.do(time_out_unstarted, "h")
    assert kinds(t) == [(EventType.NODE_TIMED_OUT, "h"), (EventType.EXECUTION_FAILED, None)]
    assert t.dead_lettered == ()
    assert sim.execution.error is not None and sim.execution.error.node_id == "b"


def test_time_out_execution() -> None:
    sim = Sim(saga())
    assert "no deadline" in precondition(time_out_execution, sim)
    sim = Sim(TREE)
    assert sim.execution.deadline == T0 + timedelta(minutes=10)
    assert "has not passed yet" in precondition(time_out_execution, sim)
    sim.complete("a")
    sim.claim("b", worker="wb")
    sim.now = T0 + timedelta(minutes=10)
    sim.apply(time_out_execution(TREE, sim.execution, sim.nodes, sim.now))
    e = sim.execution
    assert (e.status, e.ended_at) == (ExecutionStatus.TIMED_OUT, sim.now)
    assert e.error is not None and e.error.type == "ExecutionTimeout"
    assert "did not finish within 600s" in e.error.message
    assert [sim.status(i) for i in "abcdh"] == [
        NodeStatus.SUCCEEDED,
        NodeStatus.CANCELLED,
        NodeStatus.CANCELLED,
        NodeStatus.CANCELLED,
        NodeStatus.CANCELLED,
    ]
    assert sim.nodes["b"].worker_id == "wb"
    assert "execution is TIMED_OUT" in precondition(time_out_execution, sim)


def test_time_out_execution_stops_the_failure_flow_too() -> None:
    defn = replace(saga(), execution_timeout=timedelta(minutes=1))
    sim = Sim(defn)
    sim.complete("reserve")
    sim.fail("charge", retryable=False)
    assert sim.status(comp("reserve")) is NodeStatus.READY
    sim.now = T0 + timedelta(minutes=1)
    t = sim.apply(time_out_execution(defn, sim.execution, sim.nodes, sim.now))
    assert kinds(t) == [
        (EventType.NODE_CANCELLED, comp("reserve")),
        (EventType.EXECUTION_TIMED_OUT, None),
    ]


# -- redrive -------------------------------------------------------------------------------


def test_redrive_rolls_forward_from_the_dead_lettered_node() -> None:
    policy = RetryPolicy(max_attempts=2, initial_interval=SEC, max_interval=SEC)
    defn = WorkflowDef(
        name="w",
        nodes=(
            NodeSpec("a", "t", compensation_task_type="undo"),
            NodeSpec("b", "t", on_failure="h", retry_policy=policy),
            NodeSpec("c", "t"),
            NodeSpec("d", "t"),
            NodeSpec("e", "t"),
            NodeSpec("h", "alert"),
        ),
        edges=(("a", "b"), ("b", "c"), ("a", "d"), ("d", "e")),
        execution_timeout=timedelta(hours=1),
    )
    sim = Sim(defn, input=b'"in"')
    sim.complete("a", b'"A"')
    sim.fail("b")
    sim.fail("b")  # budget used: dead-lettered; c (below b) SKIPPED, d and e CANCELLED
    assert [sim.status(i) for i in "bcde"] == [
        NodeStatus.FAILED,
        NodeStatus.SKIPPED,
        NodeStatus.CANCELLED,
        NodeStatus.CANCELLED,
    ]
    sim.complete("h")
    sim.complete(comp("a"))
    assert sim.execution.status is ExecutionStatus.FAILED
    assert "node is SUCCEEDED; only a FAILED or TIMED_OUT node" in (
        precondition(redrive, sim, "a", "dl1")
    )
    assert "it is a on_failure run" in precondition(redrive, sim, "h", "dl1")
    with pytest.raises(NotFound):
        redrive(defn, sim.execution, sim.nodes, "zz", "dl1", sim.now)
    a_before = sim.nodes["a"]
    comp_before = sim.nodes[comp("a")]

    t = sim.do(redrive, "b", "dl1")
    assert t.redriven_dead_letter == "dl1"
    assert kinds(t) == [
        (EventType.EXECUTION_RESUMED, None),
        (EventType.NODE_REDRIVEN, "b"),
        (EventType.NODE_READY, "b"),
        (EventType.NODE_REDRIVEN, "c"),
        (EventType.NODE_REDRIVEN, "d"),
        (EventType.NODE_READY, "d"),
        (EventType.NODE_REDRIVEN, "e"),
        (EventType.NODE_REDRIVEN, "h"),
    ]
    assert details(t, EventType.NODE_REDRIVEN, "b") == {"dead_letter_id": "dl1"}
    assert details(t, EventType.NODE_REDRIVEN, "d") == {"dead_letter_id": "dl1", "restored_by": "b"}
    assert {n.node_id for n in t.nodes} == set("bcdeh")  # finished nodes are untouched
    assert sim.nodes["a"] == a_before and sim.nodes[comp("a")] == comp_before
    e = sim.execution
    assert (e.status, e.error, e.ended_at) == (ExecutionStatus.RUNNING, None, None)
    assert e.deadline == sim.now + timedelta(hours=1)
    b = sim.nodes["b"]
    assert (b.status, b.input, b.error, b.attempt, b.retry_base) == (
        NodeStatus.READY,
        b'"A"',
        None,
        2,
        2,
    )
    assert (b.available_at, b.worker_id) == (sim.now, None)
    d = sim.nodes["d"]
    assert (d.status, d.input, d.retry_base) == (NodeStatus.READY, b'"A"', 0)
    assert [sim.status(i) for i in "ceh"] == [NodeStatus.BLOCKED] * 3
    assert sim.nodes["h"].role is NodeRole.ON_FAILURE

    sim.fail("b")  # a fresh budget: one retry again
    assert sim.status("b") is NodeStatus.READY
    for nid in "bcde":
        sim.complete(nid, b'"ok"')
    assert sim.execution.status is ExecutionStatus.SUCCEEDED
    assert sim.status("h") is NodeStatus.SKIPPED
    assert sim.nodes["a"] == a_before  # never ran again


def test_redrive_a_timed_out_entry_node_keeps_its_pause_and_refuses_unfailed_runs() -> None:
    defn = WorkflowDef(
        name="w",
        nodes=(
            NodeSpec("a", "t", schedule_to_start_timeout=SEC),
            NodeSpec("p", "t", pause_before=True),
        ),
    )
    sim = Sim(defn, input=b"[1]")
    assert "execution 'e1' is RUNNING; only a FAILED execution" in (
        precondition(redrive, sim, "a", "x")
    )
    sim.do(time_out_unstarted, "a")
    assert sim.execution.status is ExecutionStatus.FAILED
    assert sim.status("p") is NodeStatus.CANCELLED
    sim.do(redrive, "a", "dl")
    assert (sim.status("a"), sim.nodes["a"].input) == (NodeStatus.READY, b"[1]")
    p = sim.nodes["p"]
    assert (p.status, p.input, p.held) == (NodeStatus.READY, b"[1]", True)  # still paused
    sim.do(resume_node, "p")
    sim.complete("p")
    sim.complete("a")
    assert sim.execution.status is ExecutionStatus.SUCCEEDED


def test_a_redriven_node_failing_again_compensates_only_what_is_left() -> None:
    defn = WorkflowDef(
        name="w",
        nodes=(
            NodeSpec("a", "t", compensation_task_type="ua"),
            NodeSpec("b", "t", compensation_task_type="ub"),
            NodeSpec("c", "t"),
        ),
        edges=(("a", "b"), ("b", "c")),
    )
    sim = Sim(defn)
    sim.complete("a")
    sim.fail("b")
    sim.complete(comp("a"))
    sim.do(redrive, "b", "dl")
    sim.complete("b")
    t = sim.fail("c")
    assert kinds(t)[-1] == (EventType.NODE_READY, comp("b"))
    sim.complete(comp("b"))
    assert sim.execution.status is ExecutionStatus.FAILED  # a was compensated already


def test_engine_refuses_results_for_revoked_leases() -> None:
    sim = Sim(TREE)
    sim.complete("a")
    sim.claim("d")
    sim.do(cancel_node, "d", "x")
    assert sim.execution.status is ExecutionStatus.RUNNING
    with pytest.raises(FailedPrecondition, match="is CANCELLED, not LEASED"):
        fail_node(TREE, sim.execution, sim.nodes, "d", ErrorInfo("X", "x"), True, sim.now)
