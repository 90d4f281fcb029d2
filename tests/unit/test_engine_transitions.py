"""start_execution, complete_node and fail_node on hand-built workflows."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from coordinator.engine import backoff_delay, complete_node, fail_node, start_execution
from coordinator.errors import FailedPrecondition, NotFound
from coordinator.model import (
    ErrorInfo,
    EventType,
    Execution,
    ExecutionStatus,
    NodeRun,
    NodeSpec,
    NodeStatus,
    RetryPolicy,
    Transition,
    WorkflowDef,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
SEC = timedelta(seconds=1)

DIAMOND = WorkflowDef(
    name="diamond",
    version=3,
    tenant_id="acme",
    nodes=(
        NodeSpec("a", "ta", priority=1),
        NodeSpec("b", "tb", start_to_close_timeout=timedelta(seconds=7)),
        NodeSpec("c", "tc", heartbeat_timeout=timedelta(seconds=3)),
        NodeSpec("d", "td"),
    ),
    edges=(("a", "b"), ("a", "c"), ("c", "d"), ("b", "d")),
    default_start_to_close_timeout=timedelta(seconds=42),
)


def new_execution(defn: WorkflowDef, input: bytes = b'{"x": 1}', priority: int = 0) -> Execution:
    return Execution(
        id="e1",
        workflow_name=defn.name,
        workflow_version=defn.version,
        status=ExecutionStatus.PENDING,
        input=input,
        created_at=T0,
        updated_at=T0,
        tenant_id=defn.tenant_id,
        priority=priority,
        version=5,
    )


class Run:
    """Holds an execution's state and applies transitions to it, like the store would."""

    def __init__(self, defn: WorkflowDef, input: bytes = b'{"x": 1}', priority: int = 0) -> None:
        self.defn = defn
        self.now = T0
        t = start_execution(defn, new_execution(defn, input, priority), T0)
        self.execution = t.execution
        self.nodes: dict[str, NodeRun] = {}
        self.apply(t)

    def apply(self, t: Transition) -> Transition:
        self.execution = t.execution
        self.nodes.update((n.node_id, n) for n in t.nodes)
        return t

    def claim(self, node_id: str, worker: str = "w1") -> NodeRun:
        n = self.nodes[node_id]
        assert n.status is NodeStatus.READY
        leased = replace(
            n,
            status=NodeStatus.LEASED,
            attempt=n.attempt + 1,
            lease_seq=n.lease_seq + 1,
            worker_id=worker,
            lease_deadline=self.now + n.start_to_close_timeout,
            heartbeat_deadline=self.now + SEC,
        )
        self.nodes[node_id] = leased
        return leased

    def complete(self, node_id: str, output: bytes, worker: str = "w1") -> Transition:
        self.now += SEC
        self.claim(node_id, worker)
        t = complete_node(self.defn, self.execution, self.nodes, node_id, output, self.now)
        return self.apply(t)

    def fail(
        self, node_id: str, error: ErrorInfo, retryable: bool = True, worker: str = "w1"
    ) -> Transition:
        self.now += SEC
        self.claim(node_id, worker)
        t = fail_node(self.defn, self.execution, self.nodes, node_id, error, retryable, self.now)
        return self.apply(t)


def kinds(t: Transition) -> list[tuple[EventType, str | None]]:
    return [(e.type, e.node_id) for e in t.events]


def check_common(t: Transition, run: Run, now: datetime) -> None:
    assert t.execution.version == 5
    assert t.execution.updated_at == now
    for e in t.events:
        assert (e.time, e.tenant_id, e.execution_id) == (now, "acme", "e1")
    for n in t.nodes:
        assert n.updated_at == now


# -- start ---------------------------------------------------------------------------------


def test_start_creates_every_node_run() -> None:
    execution = new_execution(DIAMOND, priority=10)
    t = start_execution(DIAMOND, execution, T0 + SEC)
    now = T0 + SEC
    assert t.execution == replace(execution, status=ExecutionStatus.RUNNING, updated_at=now)
    by_id = {n.node_id: n for n in t.nodes}
    assert list(by_id) == ["a", "b", "c", "d"]
    a = by_id["a"]
    assert (a.status, a.input, a.available_at) == (NodeStatus.READY, b'{"x": 1}', now)
    for nid in "bcd":
        assert by_id[nid].status is NodeStatus.BLOCKED
        assert by_id[nid].input is None
        assert by_id[nid].available_at is None
    assert [n.priority for n in t.nodes] == [11, 10, 10, 10]
    assert [n.task_type for n in t.nodes] == ["ta", "tb", "tc", "td"]
    assert by_id["a"].start_to_close_timeout == timedelta(seconds=42)
    assert by_id["b"].start_to_close_timeout == timedelta(seconds=7)
    assert by_id["c"].heartbeat_timeout == timedelta(seconds=3)
    assert by_id["a"].heartbeat_timeout is None
    for n in t.nodes:
        assert (n.execution_id, n.tenant_id) == ("e1", "acme")
        assert (n.workflow_name, n.workflow_version) == ("diamond", 3)
        assert (n.attempt, n.lease_seq, n.updated_at) == (0, 0, now)
    assert kinds(t) == [(EventType.EXECUTION_STARTED, None), (EventType.NODE_READY, "a")]
    assert all((e.time, e.tenant_id) == (now, "acme") for e in t.events)


def test_start_with_several_entry_nodes() -> None:
    defn = WorkflowDef(
        name="two",
        nodes=(NodeSpec("x", "t"), NodeSpec("y", "t"), NodeSpec("z", "t")),
        edges=(("x", "z"), ("y", "z")),
    )
    t = start_execution(defn, new_execution(defn), T0)
    assert kinds(t)[1:] == [(EventType.NODE_READY, "x"), (EventType.NODE_READY, "y")]
    assert [n.node_id for n in t.ready] == ["x", "y"]


def test_start_refuses_a_started_execution() -> None:
    execution = replace(new_execution(DIAMOND), status=ExecutionStatus.RUNNING)
    with pytest.raises(FailedPrecondition, match="not PENDING"):
        start_execution(DIAMOND, execution, T0)


# -- complete: data passing ----------------------------------------------------------------


def test_diamond_data_passing_and_output() -> None:
    run = Run(DIAMOND)
    t = run.complete("a", b'{"a": true}')
    check_common(t, run, run.now)
    assert kinds(t) == [
        (EventType.NODE_SUCCEEDED, "a"),
        (EventType.NODE_READY, "b"),
        (EventType.NODE_READY, "c"),
    ]
    assert t.events[0].attempt == 1
    assert t.events[0].worker_id == "w1"
    assert run.nodes["b"].input == b'{"a": true}'
    assert run.nodes["c"].input == b'{"a": true}'
    assert run.nodes["b"].available_at == run.now
    a = run.nodes["a"]
    assert (a.status, a.output, a.lease_deadline, a.heartbeat_deadline) == (
        NodeStatus.SUCCEEDED,
        b'{"a": true}',
        None,
        None,
    )
    assert (a.worker_id, a.lease_seq, a.attempt) == ("w1", 1, 1)

    # c finishes first: d still waits for b.
    t = run.complete("c", b"[3]", worker="w2")
    assert kinds(t) == [(EventType.NODE_SUCCEEDED, "c")]
    assert [n.node_id for n in t.nodes] == ["c"]
    assert run.nodes["d"].status is NodeStatus.BLOCKED

    t = run.complete("b", b'"bee"')
    assert kinds(t) == [(EventType.NODE_SUCCEEDED, "b"), (EventType.NODE_READY, "d")]
    d_input = run.nodes["d"].input
    assert d_input is not None
    # keyed by parent in edge order (c -> d is declared before b -> d), payloads untouched
    assert d_input == b'{"c":[3],"b":"bee"}'
    assert json.loads(d_input) == {"b": "bee", "c": [3]}
    assert run.execution.status is ExecutionStatus.RUNNING

    t = run.complete("d", b'{"done": 1}')
    check_common(t, run, run.now)
    assert kinds(t) == [(EventType.NODE_SUCCEEDED, "d"), (EventType.EXECUTION_SUCCEEDED, None)]
    e = run.execution
    assert (e.status, e.output, e.ended_at) == (ExecutionStatus.SUCCEEDED, b'{"done": 1}', run.now)
    assert all(n.status is NodeStatus.SUCCEEDED for n in run.nodes.values())


def test_multiple_sinks_compose_the_output() -> None:
    defn = WorkflowDef(
        name="fan",
        tenant_id="acme",
        nodes=(NodeSpec("root", "t"), NodeSpec("s2", "t"), NodeSpec("s1", "t")),
        edges=(("root", "s1"), ("root", "s2")),
    )
    run = Run(defn)
    run.complete("root", b"1")
    assert run.nodes["s1"].input == b"1"
    run.complete("s1", b'"one"')
    assert run.execution.status is ExecutionStatus.RUNNING
    t = run.complete("s2", b"null")
    assert t.events[-1].type is EventType.EXECUTION_SUCCEEDED
    # sinks in node order: s2 before s1
    assert run.execution.output == b'{"s2":null,"s1":"one"}'


def test_single_node_workflow_passes_input_and_output() -> None:
    defn = WorkflowDef(name="one", tenant_id="acme", nodes=(NodeSpec("only", "t"),))
    run = Run(defn, input=b"[1,2]")
    assert run.nodes["only"].input == b"[1,2]"
    run.complete("only", b"")  # empty output means null
    assert run.nodes["only"].output == b"null"
    assert run.execution.output == b"null"
    assert run.execution.status is ExecutionStatus.SUCCEEDED


def test_complete_clears_an_earlier_attempt_error() -> None:
    defn = WorkflowDef(
        name="one",
        tenant_id="acme",
        nodes=(NodeSpec("a", "t", retry_policy=RetryPolicy(max_attempts=2)),),
    )
    run = Run(defn)
    run.fail("a", ErrorInfo("Boom", "first"))
    assert run.nodes["a"].error is not None
    run.now = run.nodes["a"].available_at or run.now
    run.complete("a", b"2")
    assert run.nodes["a"].error is None
    assert run.nodes["a"].attempt == 2


# -- preconditions -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [NodeStatus.READY, NodeStatus.BLOCKED, NodeStatus.SUCCEEDED])
def test_complete_and_fail_need_a_leased_node(status: NodeStatus) -> None:
    run = Run(DIAMOND)
    run.nodes["a"] = replace(run.nodes["a"], status=status)
    with pytest.raises(FailedPrecondition, match=f"node 'a' of execution 'e1' is {status}"):
        complete_node(DIAMOND, run.execution, run.nodes, "a", b"1", T0)
    with pytest.raises(FailedPrecondition, match="not LEASED"):
        fail_node(DIAMOND, run.execution, run.nodes, "a", ErrorInfo("X", "x"), True, T0)


@pytest.mark.parametrize(
    "status", [ExecutionStatus.SUCCEEDED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED]
)
def test_complete_and_fail_refuse_a_terminal_execution(status: ExecutionStatus) -> None:
    run = Run(DIAMOND)
    run.claim("a")
    ended = replace(run.execution, status=status)
    with pytest.raises(FailedPrecondition, match=f"execution 'e1' is already {status}"):
        complete_node(DIAMOND, ended, run.nodes, "a", b"1", T0)
    with pytest.raises(FailedPrecondition, match="already"):
        fail_node(DIAMOND, ended, run.nodes, "a", ErrorInfo("X", "x"), True, T0)


def test_unknown_node_is_not_found() -> None:
    run = Run(DIAMOND)
    with pytest.raises(NotFound, match="no node 'zz'"):
        complete_node(DIAMOND, run.execution, run.nodes, "zz", b"1", T0)


# -- fail: retries -------------------------------------------------------------------------

POLICY = RetryPolicy(
    max_attempts=5,
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=3.0,
    max_interval=timedelta(seconds=30),
    non_retryable_error_types=("Fatal",),
)


def retrying_defn(policy: RetryPolicy = POLICY) -> WorkflowDef:
    return WorkflowDef(
        name="retry",
        tenant_id="acme",
        nodes=(NodeSpec("a", "t", retry_policy=policy), NodeSpec("b", "t"), NodeSpec("c", "t")),
        edges=(("a", "b"),),
    )


def test_retry_is_scheduled_with_growing_capped_backoff() -> None:
    run = Run(retrying_defn())
    delays = []
    for attempt in range(1, 5):
        t = run.fail("a", ErrorInfo("Boom", f"try {attempt}", details=b'{"k": 1}'), worker="w9")
        check_common(t, run, run.now)
        a = run.nodes["a"]
        assert [n.node_id for n in t.nodes] == ["a"]
        assert (a.status, a.attempt, a.lease_seq) == (NodeStatus.READY, attempt, attempt)
        assert (a.lease_deadline, a.heartbeat_deadline) == (None, None)
        assert a.error == ErrorInfo("Boom", f"try {attempt}", b'{"k": 1}', "a", attempt, "w9")
        assert kinds(t) == [
            (EventType.NODE_ATTEMPT_FAILED, "a"),
            (EventType.NODE_RETRY_SCHEDULED, "a"),
        ]
        assert all((e.attempt, e.worker_id) == (attempt, "w9") for e in t.events)
        details = t.events[1].details
        assert details is not None
        doc = json.loads(details)
        assert doc == {
            "delay_seconds": doc["delay_seconds"],
            "error_type": "Boom",
            "message": f"try {attempt}",
        }
        assert a.available_at == run.now + timedelta(seconds=doc["delay_seconds"])
        delays.append(doc["delay_seconds"])
        assert run.execution.status is ExecutionStatus.RUNNING
        run.now = a.available_at
    assert delays == [2.0, 6.0, 18.0, 30.0]  # 2 * 3**(n-1), capped at 30


def test_backoff_delay_values() -> None:
    assert backoff_delay(POLICY, 1) == timedelta(seconds=2)
    assert backoff_delay(POLICY, 3) == timedelta(seconds=18)
    assert backoff_delay(POLICY, 4) == timedelta(seconds=30)
    assert backoff_delay(POLICY, 10_000) == timedelta(seconds=30)  # no overflow
    flat = RetryPolicy(initial_interval=timedelta(milliseconds=250), backoff_coefficient=1.0)
    assert backoff_delay(flat, 7) == timedelta(milliseconds=250)
    zero = RetryPolicy(initial_interval=timedelta(0), max_interval=timedelta(0))
    assert backoff_delay(zero, 3) == timedelta(0)


def test_default_retry_policy_applies_to_nodes_without_one() -> None:
    defn = WorkflowDef(
        name="d",
        tenant_id="acme",
        nodes=(NodeSpec("a", "t"),),
        default_retry_policy=RetryPolicy(max_attempts=2, initial_interval=timedelta(seconds=5)),
    )
    run = Run(defn)
    run.fail("a", ErrorInfo("Boom", "x"))
    assert run.nodes["a"].status is NodeStatus.READY
    assert run.nodes["a"].available_at == run.now + timedelta(seconds=5)
    run.now += timedelta(seconds=5)
    run.fail("a", ErrorInfo("Boom", "x"))
    assert run.execution.status is ExecutionStatus.FAILED


# -- fail: the node and execution fail -----------------------------------------------------


def assert_execution_failed(
    run: Run, t: Transition, node_id: str, attempt: int, error_type: str, message: str
) -> None:
    check_common(t, run, run.now)
    e = run.execution
    assert (e.status, e.ended_at) == (ExecutionStatus.FAILED, run.now)
    assert e.error == ErrorInfo(
        error_type,
        f"node '{node_id}' failed on attempt {attempt}: {message}",
        b'{"why": "x"}',
        node_id,
        attempt,
        "w1",
    )
    assert run.nodes[node_id].status is NodeStatus.FAILED
    assert all(n.status.terminal for n in run.nodes.values())
    assert t.events[0].type is EventType.NODE_ATTEMPT_FAILED
    assert t.events[1].type is EventType.NODE_FAILED
    assert t.events[-1].type is EventType.EXECUTION_FAILED
    details = t.events[-1].details
    assert details is not None
    assert json.loads(details)["node_id"] == node_id


def test_exhausted_retries_fail_the_execution_skip_below_and_cancel_the_rest() -> None:
    policy = RetryPolicy(max_attempts=2, initial_interval=timedelta(0), max_interval=timedelta(0))
    defn = WorkflowDef(
        name="x",
        tenant_id="acme",
        nodes=(
            NodeSpec("a", "t"),
            NodeSpec("b", "t", retry_policy=policy),
            NodeSpec("c", "t"),
            NodeSpec("d", "t"),
            NodeSpec("e", "t"),
        ),
        edges=(("a", "b"), ("a", "c"), ("a", "d"), ("b", "e")),
    )
    run = Run(defn)
    run.complete("a", b"1")
    run.claim("c", worker="wc")  # c is LEASED when b fails; d stays READY, e BLOCKED
    err = ErrorInfo("Boom", "disk full", details=b'{"why": "x"}')
    t = run.fail("b", err)
    assert run.nodes["b"].status is NodeStatus.READY
    assert t.dead_lettered == ()
    t = run.fail("b", err)
    assert_execution_failed(run, t, "b", 2, "Boom", "disk full")
    assert t.dead_lettered == ("b",)
    assert [(n.node_id, n.status) for n in t.nodes] == [
        ("b", NodeStatus.FAILED),
        ("e", NodeStatus.SKIPPED),  # below the failed node
        ("c", NodeStatus.CANCELLED),
        ("d", NodeStatus.CANCELLED),
    ]
    assert run.nodes["a"].status is NodeStatus.SUCCEEDED  # finished nodes are kept
    assert kinds(t)[2:6] == [
        (EventType.NODE_DEAD_LETTERED, "b"),
        (EventType.NODE_SKIPPED, "e"),
        (EventType.NODE_CANCELLED, "c"),
        (EventType.NODE_CANCELLED, "d"),
    ]
    assert json.loads(t.events[3].details or b"") == {"reason": "upstream node 'b' failed"}
    assert json.loads(t.events[4].details or b"") == {"reason": "node 'b' failed"}
    c = run.nodes["c"]
    assert (c.worker_id, c.lease_seq, c.lease_deadline) == ("wc", 1, None)
    assert t.events[4].worker_id == "wc"
    assert run.nodes["b"].error == ErrorInfo("Boom", "disk full", b'{"why": "x"}', "b", 2, "w1")


def test_non_retryable_error_type_fails_at_once() -> None:
    run = Run(retrying_defn())
    t = run.fail("a", ErrorInfo("Fatal", "bad input", details=b'{"why": "x"}'))
    assert_execution_failed(run, t, "a", 1, "Fatal", "bad input")
    assert EventType.NODE_RETRY_SCHEDULED not in [e.type for e in t.events]
    assert run.nodes["b"].status is NodeStatus.SKIPPED
    assert run.nodes["c"].status is NodeStatus.CANCELLED


def test_retryable_false_fails_at_once() -> None:
    run = Run(retrying_defn())
    t = run.fail("a", ErrorInfo("Boom", "no", details=b'{"why": "x"}'), retryable=False)
    assert_execution_failed(run, t, "a", 1, "Boom", "no")
    attempt_failed = t.events[0].details
    assert attempt_failed is not None
    assert json.loads(attempt_failed) == {
        "error_type": "Boom",
        "message": "no",
        "retryable": False,
        "details": '{"why": "x"}',  # the worker's details, kept for the dead letter
    }


def test_no_retry_by_default() -> None:
    run = Run(DIAMOND)
    t = run.fail("a", ErrorInfo("Boom", "x", details=b'{"why": "x"}'))
    assert_execution_failed(run, t, "a", 1, "Boom", "x")


def test_transitions_do_not_mutate_their_inputs() -> None:
    run = Run(DIAMOND)
    run.claim("a")
    before_nodes = dict(run.nodes)
    before_exec = run.execution
    complete_node(DIAMOND, run.execution, run.nodes, "a", b"1", T0)
    fail_node(DIAMOND, run.execution, run.nodes, "a", ErrorInfo("X", "x"), False, T0)
    assert run.nodes == before_nodes
    assert run.execution == before_exec
