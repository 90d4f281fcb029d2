"""Fault tolerance in the engine: timeouts at start, holding, retry budgets and jitter,
dead letters, on_failure handlers and compensations (the failure flow)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.engine import (
    backoff_delay,
    complete_node,
    fail_node,
    jitter_fraction,
    pause_execution,
    resume_execution,
    retry_delay,
    start_execution,
)
from coordinator.errors import FailedPrecondition
from coordinator.model import (
    COMPENSATION_SUFFIX,
    ErrorInfo,
    EventType,
    ExecutionStatus,
    NodeRole,
    NodeSpec,
    NodeStatus,
    RetryPolicy,
    WorkflowDef,
)
from tests.support.engine_sim import (
    SEC,
    T0,
    Sim,
    comp,
    details,
    handler_defn,
    kinds,
    new_execution,
    saga,
)

# -- start: deadlines, timeouts, handlers, pause_before ----------------------------------


def test_start_sets_deadline_timeouts_roles_and_holds() -> None:
    defn = WorkflowDef(
        name="w",
        nodes=(
            NodeSpec("a", "t", on_failure="h", schedule_to_start_timeout=timedelta(seconds=9)),
            NodeSpec("p", "t", pause_before=True, heartbeat_timeout=timedelta(seconds=2)),
            NodeSpec("b", "t"),
            NodeSpec("h", "handler"),
        ),
        edges=(("a", "b"),),
        execution_timeout=timedelta(hours=1),
        default_schedule_to_start_timeout=timedelta(seconds=30),
        default_heartbeat_timeout=timedelta(seconds=20),
    )
    sim = Sim(defn)
    e = sim.execution
    assert (e.status, e.deadline) == (ExecutionStatus.RUNNING, T0 + timedelta(hours=1))
    a, p, b, h = (sim.nodes[i] for i in "apbh")
    assert (a.status, a.held, a.schedule_deadline) == (NodeStatus.READY, False, T0 + 9 * SEC)
    assert (a.schedule_to_start_timeout, a.heartbeat_timeout) == (9 * SEC, 20 * SEC)
    assert (p.status, p.held, p.node_paused, p.schedule_deadline) == (
        NodeStatus.READY,
        True,
        True,
        None,
    )
    assert (p.heartbeat_timeout, p.schedule_to_start_timeout) == (2 * SEC, 30 * SEC)
    assert (b.status, b.role, b.schedule_deadline) == (NodeStatus.BLOCKED, NodeRole.TASK, None)
    # a handler has no edges but is not an entry node: it waits for its node to fail
    assert (h.status, h.role, h.input) == (NodeStatus.BLOCKED, NodeRole.ON_FAILURE, None)
    start = start_execution(defn, new_execution(defn, b"1"), T0)
    assert kinds(start) == [
        (EventType.EXECUTION_STARTED, None),
        (EventType.NODE_READY, "a"),
        (EventType.NODE_READY, "p"),
        (EventType.NODE_HELD, "p"),
    ]


def test_no_execution_timeout_means_no_deadline() -> None:
    sim = Sim(WorkflowDef(name="w", nodes=(NodeSpec("a", "t"),)))
    assert sim.execution.deadline is None
    assert sim.nodes["a"].schedule_deadline is None


def test_children_get_schedule_deadlines_and_pause_before_holds_them() -> None:
    defn = WorkflowDef(
        name="w",
        nodes=(NodeSpec("a", "t"), NodeSpec("b", "t"), NodeSpec("c", "t", pause_before=True)),
        edges=(("a", "b"), ("a", "c")),
        default_schedule_to_start_timeout=5 * SEC,
    )
    sim = Sim(defn)
    t = sim.complete("a")
    assert kinds(t) == [
        (EventType.NODE_SUCCEEDED, "a"),
        (EventType.NODE_READY, "b"),
        (EventType.NODE_READY, "c"),
        (EventType.NODE_HELD, "c"),
    ]
    assert sim.nodes["b"].schedule_deadline == sim.now + 5 * SEC
    c = sim.nodes["c"]
    assert (c.held, c.schedule_deadline, c.input) == (True, None, b"1")


# -- retries: budget, jitter, holding ------------------------------------------------------


def test_retry_schedule_deadline_counts_from_the_end_of_the_backoff() -> None:
    policy = RetryPolicy(max_attempts=2, initial_interval=10 * SEC, max_interval=10 * SEC)
    defn = WorkflowDef(
        name="w",
        nodes=(NodeSpec("a", "t", retry_policy=policy, schedule_to_start_timeout=3 * SEC),),
    )
    sim = Sim(defn)
    sim.fail("a")
    a = sim.nodes["a"]
    assert a.available_at == sim.now + 10 * SEC
    assert a.schedule_deadline == sim.now + 13 * SEC


def test_retry_while_paused_is_held() -> None:
    policy = RetryPolicy(max_attempts=3, initial_interval=SEC, max_interval=SEC)
    sim = Sim(WorkflowDef(name="w", nodes=(NodeSpec("a", "t", retry_policy=policy),)))
    sim.claim("a")
    sim.do(pause_execution)
    t = sim.do(fail_node, "a", ErrorInfo("Boom", "x"), True)
    assert kinds(t) == [
        (EventType.NODE_ATTEMPT_FAILED, "a"),
        (EventType.NODE_RETRY_SCHEDULED, "a"),
        (EventType.NODE_HELD, "a"),
    ]
    a = sim.nodes["a"]
    assert (a.status, a.held, a.schedule_deadline) == (NodeStatus.READY, True, None)
    t = sim.do(resume_execution)
    assert kinds(t) == [(EventType.EXECUTION_RESUMED, None), (EventType.NODE_RELEASED, "a")]
    assert sim.nodes["a"].held is False


def test_jitter_is_deterministic_bounded_and_used_by_fail_node() -> None:
    policy = RetryPolicy(
        max_attempts=9,
        initial_interval=10 * SEC,
        backoff_coefficient=2.0,
        max_interval=timedelta(seconds=1000),
        jitter=0.5,
    )
    fractions = {jitter_fraction("e1", "a", n) for n in range(1, 50)}
    assert len(fractions) == 49  # it does vary by attempt
    assert all(-1 <= f <= 1 for f in fractions)
    assert jitter_fraction("e1", "a", 3) == jitter_fraction("e1", "a", 3)
    assert jitter_fraction("e1", "a", 3) != jitter_fraction("e2", "a", 3)
    assert jitter_fraction("e1", "a", 3) != jitter_fraction("e1", "b", 3)
    for attempt in range(1, 6):
        base = backoff_delay(policy, attempt).total_seconds()
        u = jitter_fraction("e1", "a", attempt)
        expected = timedelta(seconds=base * (1 + 0.5 * u))
        assert abs(retry_delay(policy, "e1", "a", attempt) - expected) < timedelta(microseconds=2)
    assert retry_delay(replace(policy, jitter=0.0), "e1", "a", 3) == backoff_delay(policy, 3)

    sim = Sim(WorkflowDef(name="w", nodes=(NodeSpec("a", "t", retry_policy=policy),)))
    for attempt in (1, 2, 3):
        t = sim.fail("a")
        delay = retry_delay(policy, "e1", "a", attempt)
        assert sim.nodes["a"].available_at == sim.now + delay
        assert details(t, EventType.NODE_RETRY_SCHEDULED, "a")["delay_seconds"] == (
            delay.total_seconds()
        )


@settings(max_examples=200, deadline=None)
@given(
    jitter=st.floats(0, 1),
    initial=st.integers(0, 100),
    extra=st.integers(0, 100),
    coefficient=st.sampled_from([1.0, 1.5, 2.0]),
    attempt=st.integers(1, 40),
    node=st.text(max_size=4),
)
def test_jitter_stays_within_its_fraction_and_the_cap(
    jitter: float, initial: int, extra: int, coefficient: float, attempt: int, node: str
) -> None:
    policy = RetryPolicy(
        initial_interval=timedelta(seconds=initial),
        backoff_coefficient=coefficient,
        max_interval=timedelta(seconds=initial + extra),
        jitter=jitter,
    )
    base = backoff_delay(policy, attempt).total_seconds()
    delay = retry_delay(policy, "x", node, attempt).total_seconds()
    assert 0 <= delay <= policy.max_interval.total_seconds()
    assert base * (1 - jitter) - 1e-6 <= delay <= base * (1 + jitter) + 1e-6
    assert delay == retry_delay(policy, "x", node, attempt).total_seconds()


def test_retry_budget_and_backoff_count_from_retry_base() -> None:
    policy = RetryPolicy(max_attempts=2, initial_interval=SEC, max_interval=timedelta(seconds=60))
    sim = Sim(WorkflowDef(name="w", nodes=(NodeSpec("a", "t", retry_policy=policy),)))
    # as after a redrive: five attempts made before, none since
    sim.nodes["a"] = replace(sim.nodes["a"], attempt=5, retry_base=5)
    sim.fail("a")  # attempt 6 is the first of the new budget
    assert sim.status("a") is NodeStatus.READY
    assert sim.nodes["a"].available_at == sim.now + SEC  # backoff restarts too
    t = sim.fail("a")
    assert sim.status("a") is NodeStatus.FAILED
    assert t.dead_lettered == ("a",)


# -- terminal failure: dead letter and on_failure ------------------------------------------


def test_failure_triggers_the_handler_with_the_failed_node_and_its_input() -> None:
    sim = Sim(handler_defn())
    sim.complete("a", b'{"order": [1, 2]}')
    t = sim.fail("b", "Declined", "card declined", worker="w7")
    assert kinds(t) == [
        (EventType.NODE_ATTEMPT_FAILED, "b"),
        (EventType.NODE_FAILED, "b"),
        (EventType.NODE_DEAD_LETTERED, "b"),
        (EventType.NODE_SKIPPED, "c"),
        (EventType.EXECUTION_FAILING, None),
        (EventType.NODE_READY, "h"),
    ]
    assert t.dead_lettered == ("b",)
    e = sim.execution
    assert e.status is ExecutionStatus.RUNNING and e.ended_at is None
    assert e.error == ErrorInfo(
        "Declined", "node 'b' failed on attempt 1: card declined", None, "b", 1, "w7"
    )
    assert details(t, EventType.EXECUTION_FAILING) == {
        "error_type": "Declined",
        "message": "node 'b' failed on attempt 1: card declined",
        "node_id": "b",
    }
    h = sim.nodes["h"]
    assert (h.status, h.held, h.role) == (NodeStatus.READY, False, NodeRole.ON_FAILURE)
    assert h.input is not None
    assert h.input.endswith(b'"input":{"order": [1, 2]}}')  # the payload is not re-encoded
    assert json.loads(h.input) == {
        "node_id": "b",
        "error": {"type": "Declined", "message": "card declined", "attempt": 1, "worker_id": "w7"},
        "input": {"order": [1, 2]},
    }
    t = sim.complete("h", b'"paged"')
    assert kinds(t) == [(EventType.NODE_SUCCEEDED, "h"), (EventType.EXECUTION_FAILED, None)]
    assert sim.execution.status is ExecutionStatus.FAILED
    assert sim.execution.ended_at == sim.now
    assert sim.execution.error is not None and sim.execution.error.node_id == "b"
    assert t.dead_lettered == ()


def test_handler_uses_its_own_policy_and_failing_it_is_not_dead_lettered() -> None:
    policy = RetryPolicy(max_attempts=2, initial_interval=timedelta(0), max_interval=timedelta(0))
    sim = Sim(handler_defn(retry_policy=policy))
    sim.complete("a")
    sim.fail("b", "Declined", "no")
    original = sim.execution.error
    t = sim.fail("h", "PagerDown")
    assert kinds(t)[1] == (EventType.NODE_RETRY_SCHEDULED, "h")
    t = sim.fail("h", "PagerDown")
    assert kinds(t) == [
        (EventType.NODE_ATTEMPT_FAILED, "h"),
        (EventType.NODE_FAILED, "h"),
        (EventType.EXECUTION_FAILED, None),
    ]
    assert t.dead_lettered == ()
    assert sim.status("h") is NodeStatus.FAILED
    assert sim.execution.status is ExecutionStatus.FAILED
    assert sim.execution.error == original


def test_without_a_handler_the_execution_fails_at_once() -> None:
    sim = Sim(handler_defn())
    t = sim.fail("a", "Boom", "x")
    assert kinds(t)[-1] == (EventType.EXECUTION_FAILED, None)
    assert EventType.EXECUTION_FAILING not in [e.type for e in t.events]
    # the other node's handler never ran: skipped when the execution ended
    assert details(t, EventType.NODE_SKIPPED, "h") == {"reason": "no node it handles failed"}
    assert [sim.status(i) for i in "abch"] == [
        NodeStatus.FAILED,
        NodeStatus.SKIPPED,
        NodeStatus.SKIPPED,
        NodeStatus.SKIPPED,
    ]


def test_untriggered_handler_is_skipped_when_the_execution_succeeds() -> None:
    sim = Sim(handler_defn())
    sim.complete("a")
    sim.complete("b")
    t = sim.complete("c", b'"done"')
    assert kinds(t) == [
        (EventType.NODE_SUCCEEDED, "c"),
        (EventType.NODE_SKIPPED, "h"),
        (EventType.EXECUTION_SUCCEEDED, None),
    ]
    assert sim.execution.output == b'"done"'  # handlers are not sinks


def test_handler_runs_even_while_the_execution_is_paused_unless_paused_itself() -> None:
    sim = Sim(handler_defn())
    sim.complete("a")
    sim.claim("b")
    sim.do(pause_execution)
    sim.do(fail_node, "b", ErrorInfo("Boom", "x"), False)
    assert sim.execution.status is ExecutionStatus.PAUSED
    assert (sim.status("h"), sim.nodes["h"].held) == (NodeStatus.READY, False)

    sim = Sim(handler_defn(pause_before=True))
    sim.complete("a")
    sim.fail("b")
    h = sim.nodes["h"]
    assert (h.status, h.held, h.node_paused) == (NodeStatus.READY, True, True)


# -- compensations -------------------------------------------------------------------------


def test_compensations_run_one_at_a_time_in_reverse_completion_order() -> None:
    sim = Sim(saga())
    sim.complete("reserve", b'{"r": 1}')
    sim.complete("charge", b'{"c": 2}')
    sim.complete("plain")
    sim.complete("ship", b'"s"')
    t = sim.fail("notify", "Boom", "down")
    assert kinds(t)[-2:] == [
        (EventType.EXECUTION_FAILING, None),
        (EventType.NODE_READY, comp("ship")),
    ]
    run = sim.nodes[comp("ship")]
    assert (run.status, run.role, run.task_type, run.attempt) == (
        NodeStatus.READY,
        NodeRole.COMPENSATION,
        "unship",
        0,
    )
    assert run.heartbeat_timeout == 4 * SEC
    assert run.input == b'{"node_id":"ship","input":1,"output":"s"}'
    assert sim.execution.status is ExecutionStatus.RUNNING

    order = [comp("ship")]
    t = sim.complete(comp("ship"))
    assert kinds(t) == [
        (EventType.NODE_SUCCEEDED, comp("ship")),
        (EventType.NODE_READY, comp("charge")),
    ]
    order.append(comp("charge"))
    charge = sim.nodes[comp("charge")]
    assert json.loads(charge.input or b"") == {
        "node_id": "charge",
        "input": {"r": 1},
        "output": {"c": 2},
    }
    # a compensation retries under its node's policy, then fails without dead-lettering
    t = sim.fail(comp("charge"))
    assert sim.nodes[comp("charge")].available_at == sim.now + 7 * SEC
    t = sim.fail(comp("charge"), "RefundFailed")
    assert kinds(t) == [
        (EventType.NODE_ATTEMPT_FAILED, comp("charge")),
        (EventType.NODE_FAILED, comp("charge")),
        (EventType.NODE_READY, comp("reserve")),
    ]
    assert t.dead_lettered == ()
    order.append(comp("reserve"))
    reserve = sim.nodes[comp("reserve")]
    assert reserve.priority == sim.nodes["reserve"].priority == 3
    t = sim.complete(comp("reserve"))
    assert kinds(t)[-1] == (EventType.EXECUTION_FAILED, None)
    e = sim.execution
    assert e.status is ExecutionStatus.FAILED
    assert e.error is not None and (e.error.node_id, e.error.type) == ("notify", "Boom")
    assert [n for n in sim.nodes if n.endswith(COMPENSATION_SUFFIX)] == order


def test_compensation_order_follows_completion_time_then_definition_order() -> None:
    defn = WorkflowDef(
        name="w",
        nodes=(
            NodeSpec("x", "t", compensation_task_type="ux"),
            NodeSpec("y", "t", compensation_task_type="uy"),
            NodeSpec("z", "t", compensation_task_type="uz"),
            NodeSpec("boom", "t"),
        ),
        edges=(("x", "boom"), ("y", "boom"), ("z", "boom")),
    )
    sim = Sim(defn)
    sim.complete("y")  # finished first, so undone last
    for nid in ("x", "z"):  # finished at the same time: later in the definition first
        sim.claim(nid)
    sim.now += SEC
    for nid in ("x", "z"):
        sim.apply(complete_node(defn, sim.execution, sim.nodes, nid, b"1", sim.now))
    sim.fail("boom")
    seen = []
    while sim.execution.status is ExecutionStatus.RUNNING:
        (active,) = [n for n in sim.nodes.values() if n.status is NodeStatus.READY]
        seen.append(active.node_id)
        sim.complete(active.node_id)
    assert seen == [comp("z"), comp("x"), comp("y")]
    assert sim.execution.status is ExecutionStatus.FAILED


def test_handler_and_compensation_run_together_and_both_must_end() -> None:
    defn = WorkflowDef(
        name="w",
        nodes=(
            NodeSpec("a", "t", compensation_task_type="undo-a"),
            NodeSpec("b", "t", on_failure="h"),
            NodeSpec("h", "alert"),
        ),
        edges=(("a", "b"),),
    )
    sim = Sim(defn)
    sim.complete("a")
    t = sim.fail("b")
    assert kinds(t)[-3:] == [
        (EventType.EXECUTION_FAILING, None),
        (EventType.NODE_READY, "h"),
        (EventType.NODE_READY, comp("a")),
    ]
    sim.complete(comp("a"))
    assert sim.execution.status is ExecutionStatus.RUNNING
    sim.complete("h")
    assert sim.execution.status is ExecutionStatus.FAILED


def test_compensation_is_held_while_the_execution_is_paused() -> None:
    sim = Sim(saga())
    sim.complete("reserve")
    sim.claim("charge")
    sim.do(pause_execution)
    sim.do(fail_node, "charge", ErrorInfo("Boom", "x"), False)
    run = sim.nodes[comp("reserve")]
    assert (run.status, run.held) == (NodeStatus.READY, True)
    assert sim.execution.status is ExecutionStatus.PAUSED
    sim.do(resume_execution)
    sim.complete(comp("reserve"))
    assert sim.execution.status is ExecutionStatus.FAILED


def test_nothing_to_compensate_when_no_compensated_node_succeeded() -> None:
    sim = Sim(saga())
    t = sim.fail("reserve")
    assert sim.execution.status is ExecutionStatus.FAILED
    assert not any(n.endswith(COMPENSATION_SUFFIX) for n in sim.nodes)
    assert EventType.EXECUTION_FAILING not in [e.type for e in t.events]


@pytest.mark.parametrize("role", ["handler", "compensation"])
def test_cleanup_runs_can_be_completed_and_failed_only_while_leased(role: str) -> None:
    sim = Sim(saga() if role == "compensation" else handler_defn())
    if role == "compensation":
        sim.complete("reserve")
        sim.fail("charge", retryable=False)
        nid = comp("reserve")
    else:
        sim.complete("a")
        sim.fail("b")
        nid = "h"
    assert sim.status(nid) is NodeStatus.READY
    with pytest.raises(FailedPrecondition, match="not LEASED"):
        complete_node(sim.defn, sim.execution, sim.nodes, nid, b"1", sim.now)
