"""Property tests: random DAGs driven to the end by a simulated, randomly failing worker."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.engine import (
    backoff_delay,
    complete_node,
    fail_node,
    start_execution,
    validate_definition,
)
from coordinator.errors import FailedPrecondition, InvalidArgument
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
    TriggerRule,
    WorkflowDef,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
PROPERTY = settings(max_examples=150, deadline=None)

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
payloads = json_values.map(lambda v: json.dumps(v).encode())

seconds = st.integers(min_value=0, max_value=5).map(lambda s: timedelta(seconds=s))


@st.composite
def retry_policies(draw: st.DrawFn) -> RetryPolicy:
    initial = draw(seconds)
    return RetryPolicy(
        max_attempts=draw(st.integers(1, 4)),
        initial_interval=initial,
        backoff_coefficient=draw(st.sampled_from([1.0, 1.5, 2.0, 3.0])),
        max_interval=initial + draw(seconds),
        non_retryable_error_types=draw(st.sampled_from([(), ("Fatal",)])),
    )


@st.composite
def dags(draw: st.DrawFn, max_nodes: int = 12) -> WorkflowDef:
    n = draw(st.integers(1, max_nodes))
    ids = [f"n{i}" for i in range(n)]
    pairs = [(ids[i], ids[j]) for i in range(n) for j in range(i + 1, n)]
    edges = [p for p in pairs if draw(st.booleans())] if pairs else []
    order = draw(st.permutations(edges))  # edge order decides the composition order
    nodes = tuple(
        NodeSpec(
            id=i,
            task_type=draw(st.sampled_from(["t1", "t2"])),
            retry_policy=draw(st.none() | retry_policies()),
            priority=draw(st.integers(-2, 2)),
        )
        for i in ids
    )
    return WorkflowDef(
        name="prop",
        nodes=nodes,
        edges=tuple(order),
        default_retry_policy=draw(retry_policies()),
        tenant_id="t",
    )


def expected_input(
    defn: WorkflowDef, nodes: dict[str, NodeRun], node_id: str, exec_in: bytes
) -> Any:
    """The oracle for DESIGN §3 data passing, on parsed values."""
    parents = defn.parents[node_id]
    if not parents:
        return json.loads(exec_in)
    outputs = {p: json.loads(nodes[p].output or b"") for p in parents}
    return outputs[parents[0]] if len(parents) == 1 else outputs


def keys_in_order(payload: bytes) -> list[str]:
    pairs: list[tuple[str, Any]] = json.loads(payload, object_pairs_hook=lambda kv: kv)
    return [k for k, _ in pairs]


def descendants(defn: WorkflowDef, node_id: str) -> set[str]:
    out: set[str] = set()
    stack = list(defn.children[node_id])
    while stack:
        nid = stack.pop()
        if nid not in out:
            out.add(nid)
            stack.extend(defn.children[nid])
    return out


def check_step(
    defn: WorkflowDef,
    before: dict[str, NodeRun],
    after: dict[str, NodeRun],
    t: Transition,
    exec_in: bytes,
    now: datetime,
) -> None:
    assert t.execution.version == 7
    assert t.execution.updated_at == now
    assert len({n.node_id for n in t.nodes}) == len(t.nodes)
    for n in t.nodes:
        assert n.updated_at == now
        old = before.get(n.node_id)
        if old is not None:  # the engine never touches attempt or fencing numbers
            assert (n.attempt, n.lease_seq) == (old.attempt, old.lease_seq)
            assert n != old
    for e in t.events:
        assert (e.time, e.tenant_id, e.execution_id) == (now, "t", "x")
        if e.details is not None:
            json.loads(e.details)
    ready_events = [e.node_id for e in t.events if e.type is EventType.NODE_READY]
    newly_ready = [
        n.node_id
        for n in t.nodes
        if n.status is NodeStatus.READY
        and (n.node_id not in before or before[n.node_id].status is NodeStatus.BLOCKED)
    ]
    assert ready_events == newly_ready
    for nid in newly_ready:
        node = after[nid]
        assert node.available_at == now
        assert node.input is not None
        assert json.loads(node.input) == expected_input(defn, after, nid, exec_in)
        if len(defn.parents[nid]) > 1:
            assert keys_in_order(node.input) == list(defn.parents[nid])
    for n in t.nodes:
        if n.status is NodeStatus.READY and n.attempt > 0:  # a retry, after its backoff
            policy = defn.retry_policy_for(defn.node_map[n.node_id])
            assert n.available_at == now + backoff_delay(policy, n.attempt)
            assert n.input == before[n.node_id].input
    for nid, node in after.items():
        assert node.attempt <= defn.retry_policy_for(defn.node_map[nid]).max_attempts
        # Nothing runs or ran before all its parents succeeded.
        if node.status not in (NodeStatus.BLOCKED, NodeStatus.CANCELLED, NodeStatus.SKIPPED):
            assert all(after[p].status is NodeStatus.SUCCEEDED for p in defn.parents[nid])
        for payload in (node.input, node.output):
            if payload is not None:
                json.loads(payload)


@PROPERTY
@given(defn=dags(), exec_in=payloads, data=st.data())
def test_random_runs_always_finish_consistently(
    defn: WorkflowDef, exec_in: bytes, data: st.DataObject
) -> None:
    validate_definition(defn)
    now = T0
    execution = Execution(
        id="x",
        workflow_name="prop",
        workflow_version=0,
        status=ExecutionStatus.PENDING,
        input=exec_in,
        created_at=T0,
        updated_at=T0,
        tenant_id="t",
        version=7,
    )
    t = start_execution(defn, execution, now)
    execution = t.execution
    nodes = {n.node_id: n for n in t.nodes}
    assert list(nodes) == [n.id for n in defn.nodes]
    check_step(defn, {}, nodes, t, exec_in, now)

    bound = sum(defn.retry_policy_for(s).max_attempts for s in defn.nodes)
    steps = 0
    while not execution.status.terminal:
        steps += 1
        assert steps <= bound, "the run did not terminate within the attempt budget"
        ready = [n for n in nodes.values() if n.status is NodeStatus.READY]
        assert ready, "a running execution must have a READY node (no LEASED ones here)"
        node = data.draw(st.sampled_from(ready))
        assert node.available_at is not None
        now = max(now, node.available_at) + timedelta(milliseconds=1)
        nodes[node.node_id] = replace(
            node,
            status=NodeStatus.LEASED,
            attempt=node.attempt + 1,
            lease_seq=node.lease_seq + 1,
            worker_id="w",
            lease_deadline=now + node.start_to_close_timeout,
        )
        before = dict(nodes)
        action = data.draw(st.sampled_from(["complete", "complete", "fail", "fail-permanent"]))
        if action == "complete":
            t = complete_node(defn, execution, nodes, node.node_id, data.draw(payloads), now)
        else:
            error = ErrorInfo(type=data.draw(st.sampled_from(["Boom", "Fatal"])), message="m")
            t = fail_node(defn, execution, nodes, node.node_id, error, action == "fail", now)
        execution = t.execution
        nodes.update((n.node_id, n) for n in t.nodes)
        check_step(defn, before, nodes, t, exec_in, now)

    assert all(n.status.terminal for n in nodes.values())
    all_succeeded = all(n.status is NodeStatus.SUCCEEDED for n in nodes.values())
    assert (execution.status is ExecutionStatus.SUCCEEDED) == all_succeeded
    assert execution.ended_at == now
    if all_succeeded:
        assert execution.output is not None
        sinks = defn.sinks
        expected = (
            json.loads(nodes[sinks[0]].output or b"")
            if len(sinks) == 1
            else {s: json.loads(nodes[s].output or b"") for s in sinks}
        )
        assert json.loads(execution.output) == expected
    else:
        assert execution.status is ExecutionStatus.FAILED
        failed = [n for n in nodes.values() if n.status is NodeStatus.FAILED]
        assert len(failed) == 1
        assert execution.error is not None
        assert execution.error.node_id == failed[0].node_id
        assert t.dead_lettered == (failed[0].node_id,)
        below = descendants(defn, failed[0].node_id)
        for n in nodes.values():
            if n.node_id in below:  # below the failed node: skipped (never ran)
                assert n.status is NodeStatus.SKIPPED
            elif n.status is not NodeStatus.FAILED:
                assert n.status in (NodeStatus.SUCCEEDED, NodeStatus.CANCELLED)
    # A finished execution accepts no more results.
    leased = replace(next(iter(nodes.values())), status=NodeStatus.LEASED)
    with pytest.raises(FailedPrecondition):
        complete_node(defn, execution, {**nodes, leased.node_id: leased}, leased.node_id, b"1", now)


@PROPERTY
@given(defn=dags(), data=st.data())
def test_a_back_edge_is_reported_as_a_cycle(defn: WorkflowDef, data: st.DataObject) -> None:
    validate_definition(defn)
    if not defn.edges:
        return
    source, target = data.draw(st.sampled_from(defn.edges))
    cyclic = replace(defn, edges=(*defn.edges, (target, source)))
    with pytest.raises(InvalidArgument, match="has a cycle: ") as info:
        validate_definition(cyclic)
    path = str(info.value).split("has a cycle: ")[1].split(";")[0].split(" -> ")
    assert path[0] == path[-1]
    assert len(path) >= 3
    edges = set(cyclic.edges)
    assert all((a, b) in edges for a, b in itertools.pairwise(path))


@PROPERTY
@given(policy=retry_policies(), attempts=st.integers(1, 60))
def test_backoff_grows_and_stays_capped(policy: RetryPolicy, attempts: int) -> None:
    delays = [backoff_delay(policy, a) for a in range(1, attempts + 1)]
    assert delays[0] == min(policy.initial_interval, policy.max_interval)
    assert delays == sorted(delays)
    assert all(timedelta(0) <= d <= policy.max_interval for d in delays)


# -- control flow: trigger rules, skip_if, next ------------------------------------------------

HANDLING = (TriggerRule.ALL_DONE, TriggerRule.ALL_FAILED, TriggerRule.ONE_SUCCESS)
FAILED_STATUSES = (NodeStatus.FAILED, NodeStatus.TIMED_OUT)


@st.composite
def rule_dags(draw: st.DrawFn) -> tuple[WorkflowDef, dict[str, bool]]:
    base = draw(dags(max_nodes=10))
    skips = {n.id: draw(st.integers(0, 5)) == 0 for n in base.nodes}
    nodes = tuple(
        replace(
            n,
            trigger_rule=draw(st.sampled_from(list(TriggerRule))),
            skip_if=f"execution.input.skip.{n.id}" if draw(st.booleans()) else "",
        )
        for n in base.nodes
    )
    return replace(base, nodes=nodes), skips


def rule_allows(rule: TriggerRule, parents: list[NodeStatus]) -> bool:
    """The trigger rule table, on the parents' final statuses (docs/control-flow.md)."""
    if not parents:
        return True
    ok = sum(s is NodeStatus.SUCCEEDED for s in parents)
    failed = sum(s in FAILED_STATUSES for s in parents)
    return {
        TriggerRule.ALL_SUCCESS: ok == len(parents),
        TriggerRule.ALL_DONE: True,
        TriggerRule.ONE_SUCCESS: ok > 0,
        TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS: failed == 0 and ok > 0,
        TriggerRule.ALL_FAILED: failed == len(parents),
    }[rule]


@PROPERTY
@given(drawn=rule_dags(), data=st.data())
def test_random_trigger_rules_skips_and_failures_always_end(
    drawn: tuple[WorkflowDef, dict[str, bool]], data: st.DataObject
) -> None:
    defn, skips = drawn
    validate_definition(defn)
    exec_in = json.dumps({"skip": skips}).encode()
    execution = Execution(
        id="x",
        workflow_name="prop",
        workflow_version=0,
        status=ExecutionStatus.PENDING,
        input=exec_in,
        created_at=T0,
        updated_at=T0,
        tenant_id="t",
        version=7,
    )
    now = T0
    t = start_execution(defn, execution, now)
    execution = t.execution
    nodes = {n.node_id: n for n in t.nodes}
    not_chosen: set[str] = set()
    bound = sum(defn.retry_policy_for(s).max_attempts for s in defn.nodes)
    steps = 0
    while not execution.status.terminal:
        steps += 1
        assert steps <= bound, "the run did not terminate within the attempt budget"
        ready = [n for n in nodes.values() if n.status is NodeStatus.READY]
        assert ready, "a running execution must have a READY node"
        node = data.draw(st.sampled_from(ready))
        assert node.available_at is not None
        now = max(now, node.available_at) + timedelta(milliseconds=1)
        nodes[node.node_id] = replace(
            node, status=NodeStatus.LEASED, attempt=node.attempt + 1, lease_seq=node.lease_seq + 1
        )
        action = data.draw(st.sampled_from(["complete", "complete", "fail", "fail-permanent"]))
        if action == "complete":
            children = defn.children[node.node_id]
            chosen = None
            if children and data.draw(st.booleans()):
                chosen = tuple(c for c in children if data.draw(st.booleans()))
                not_chosen |= {
                    c
                    for c in children
                    if chosen and c not in chosen and nodes[c].status is NodeStatus.BLOCKED
                }
            t = complete_node(defn, execution, nodes, node.node_id, b"1", now, next=chosen)
        else:
            error = ErrorInfo(type="Boom", message="m")
            t = fail_node(defn, execution, nodes, node.node_id, error, action == "fail", now)
        execution = t.execution
        nodes.update((n.node_id, n) for n in t.nodes)
        for n in t.nodes:  # never held, never waiting: only task nodes here
            assert n.status is not NodeStatus.WAITING

    assert all(n.status.terminal for n in nodes.values())
    unhandled = [
        n.node_id
        for n in nodes.values()
        if n.status in FAILED_STATUSES
        and not any(defn.node_map[c].trigger_rule in HANDLING for c in defn.children[n.node_id])
    ]
    if execution.status is ExecutionStatus.FAILED:
        assert execution.error is not None and unhandled == [execution.error.node_id]
        return
    assert execution.status is ExecutionStatus.SUCCEEDED
    assert execution.error is None and unhandled == []
    for nid, n in nodes.items():
        spec = defn.node_map[nid]
        parents = [nodes[p].status for p in defn.parents[nid]]
        if n.status is not NodeStatus.SKIPPED:  # it ran: its rule allowed it
            assert rule_allows(spec.trigger_rule, parents), nid
            assert not (spec.skip_if and skips[nid])
        elif not (spec.skip_if and skips[nid]) and nid not in not_chosen:
            assert not rule_allows(spec.trigger_rule, parents), nid
