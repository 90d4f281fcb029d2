"""Property test: random workflows with handlers, compensations, pauses and timeouts, driven
by a simulated scheduler and operator taking random actions, then driven to the end.

After every transition (see ``check_step``):
- the transition keeps the loaded version, stamps ``now`` on changed rows and events,
  changes only rows that differ, never touches ``attempt`` or ``lease_seq``;
- only READY rows are held; a held row has no schedule deadline; a READY row is held when
  paused on its own, when its execution is paused (on_failure handlers excepted), and is
  not held otherwise; an unheld READY row has a schedule deadline iff it has a timeout;
- a workflow node is READY, LEASED or finished-by-running (SUCCEEDED, FAILED, TIMED_OUT)
  only when all its parents SUCCEEDED; ``NODE_READY`` events name exactly the rows that
  just became READY, whose inputs follow the data-passing rules (handlers and compensation
  runs get their documented inputs); every payload is valid JSON;
- attempts since the last redrive stay within the node's retry policy;
- at most one compensation run is active; each is started for the succeeded node that
  finished last among those not yet compensated;
- an unfinished execution always has a READY or LEASED row (it cannot get stuck); a
  failing one (unfinished, with an error) has every workflow node finished; a finished one
  has no READY or LEASED row, so nothing can be claimed;
- dead-lettered ids are workflow nodes that just FAILED or TIMED_OUT.
At the end: everything is finished; the execution SUCCEEDED iff it has no error and every
workflow node SUCCEEDED (then its output is the sinks' outputs); FAILED means exactly one
workflow node FAILED or TIMED_OUT, it is the error's node, and every succeeded node with a
compensation has a compensation run; TIMED_OUT only after the execution timeout and
CANCELLED only after a cancel; no finished execution accepts a result.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

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
    start_execution,
    time_out_execution,
    time_out_unstarted,
    validate_definition,
)
from coordinator.errors import FailedPrecondition
from coordinator.model import (
    COMPENSATION_SUFFIX,
    ErrorInfo,
    EventType,
    Execution,
    ExecutionStatus,
    NodeRole,
    NodeRun,
    NodeSpec,
    NodeStatus,
    RetryPolicy,
    Transition,
    WorkflowDef,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
SEC = timedelta(seconds=1)
ACTIVE = (NodeStatus.READY, NodeStatus.LEASED)
RAN = (NodeStatus.READY, NodeStatus.LEASED, NodeStatus.SUCCEEDED, NodeStatus.FAILED)

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=2), inner),
    max_leaves=4,
)
payloads = json_values.map(lambda v: json.dumps(v).encode())
timeouts = st.none() | st.sampled_from([SEC, 3 * SEC])


@st.composite
def policies(draw: st.DrawFn) -> RetryPolicy:
    initial = draw(st.integers(0, 2)) * SEC
    return RetryPolicy(
        max_attempts=draw(st.integers(1, 3)),
        initial_interval=initial,
        backoff_coefficient=draw(st.sampled_from([1.0, 2.0])),
        max_interval=initial + draw(st.integers(0, 3)) * SEC,
        non_retryable_error_types=draw(st.sampled_from([(), ("Fatal",)])),
        jitter=draw(st.sampled_from([0.0, 0.5, 1.0])),
    )


@st.composite
def fault_dags(draw: st.DrawFn) -> WorkflowDef:
    handlers = [f"h{i}" for i in range(draw(st.integers(0, 2)))]
    ids = [f"n{i}" for i in range(draw(st.integers(1, 12 - len(handlers))))]
    edges = [
        (ids[i], ids[j])
        for i in range(len(ids))
        for j in range(i + 1, len(ids))
        if draw(st.integers(0, 2)) == 0
    ]
    specs = [
        NodeSpec(
            id=i,
            task_type=draw(st.sampled_from(["t1", "t2"])),
            retry_policy=draw(st.none() | policies()),
            priority=draw(st.integers(-1, 1)),
            on_failure=draw(st.none() | st.sampled_from(handlers)) if handlers else None,
            compensation_task_type=draw(st.sampled_from([None, "undo"])),
            pause_before=draw(st.integers(0, 6)) == 0,
            schedule_to_start_timeout=draw(st.none() | timeouts),
        )
        for i in ids
    ]
    specs += [
        NodeSpec(
            id=h,
            task_type="alert",
            retry_policy=draw(st.none() | policies()),
            pause_before=draw(st.integers(0, 4)) == 0,
            schedule_to_start_timeout=draw(timeouts),
        )
        for h in handlers
    ]
    return WorkflowDef(
        name="faults",
        nodes=tuple(draw(st.permutations(specs))),
        edges=tuple(draw(st.permutations(edges))),
        default_retry_policy=draw(policies()),
        execution_timeout=draw(st.none() | st.sampled_from([20 * SEC, 60 * SEC])),
        default_schedule_to_start_timeout=draw(st.none() | st.just(5 * SEC)),
        tenant_id="t",
    )


def descendants(defn: WorkflowDef, node_id: str) -> set[str]:
    out: set[str] = set()
    stack = list(defn.children[node_id])
    while stack:
        nid = stack.pop()
        if nid not in out:
            out.add(nid)
            stack.extend(defn.children[nid])
    return out


def base_of(node_id: str) -> str:
    return node_id.removesuffix(COMPENSATION_SUFFIX)


class World:
    """One execution, changed only by engine transitions and simulated claims."""

    def __init__(self, defn: WorkflowDef, exec_in: bytes) -> None:
        self.defn = defn
        self.exec_in = exec_in
        self.now = T0
        self.execution = Execution(
            id="x",
            workflow_name="faults",
            workflow_version=0,
            status=ExecutionStatus.PENDING,
            input=exec_in,
            created_at=T0,
            updated_at=T0,
            tenant_id="t",
            version=7,
        )
        self.nodes: dict[str, NodeRun] = {}
        self.redrives = 0
        self.cancelled = False
        self.timed_out = False
        self.apply(start_execution(defn, self.execution, self.now))

    # -- acting ------------------------------------------------------------------------

    def claimable(self) -> list[NodeRun]:
        return [n for n in self.nodes.values() if n.status is NodeStatus.READY and not n.held]

    def claim(self, node: NodeRun) -> None:
        assert node.status is NodeStatus.READY and not node.held  # never a held row
        assert not self.execution.status.terminal
        assert node.available_at is not None
        self.now = max(self.now, node.available_at)
        self.nodes[node.node_id] = replace(
            node,
            status=NodeStatus.LEASED,
            attempt=node.attempt + 1,
            lease_seq=node.lease_seq + 1,
            worker_id="w",
            lease_deadline=self.now + node.start_to_close_timeout,
            schedule_deadline=None,  # as the store's claim does
        )

    def call(self, fn: Any, *args: Any) -> Transition:
        self.now += SEC
        return self.apply(fn(self.defn, self.execution, self.nodes, *args, self.now))

    def apply(self, t: Transition) -> Transition:
        before = dict(self.nodes)
        self.execution = t.execution
        self.nodes.update((n.node_id, n) for n in t.nodes)
        check_step(self, before, t)
        return t

    def get(self, node_id: str) -> NodeRun:
        return self.nodes[node_id]

    def task_ids(self) -> list[str]:
        return [n.id for n in self.defn.nodes if n.id not in self.defn.handlers]


def expected_input(w: World, node: NodeRun) -> Any:
    if node.role is NodeRole.COMPENSATION:
        done = w.get(base_of(node.node_id))
        return {
            "node_id": done.node_id,
            "input": json.loads(done.input or b""),
            "output": json.loads(done.output or b""),
        }
    if node.role is NodeRole.ON_FAILURE:
        doc = json.loads(node.input or b"")
        failed = w.get(doc["node_id"])
        assert w.defn.node_map[failed.node_id].on_failure == node.node_id
        assert failed.error is not None
        assert doc["error"]["type"] == failed.error.type
        assert doc["error"]["attempt"] == failed.error.attempt
        return {**doc, "input": json.loads(failed.input or b"")}
    parents = w.defn.parents[node.node_id]
    if not parents:
        return json.loads(w.exec_in)
    outputs = {p: json.loads(w.get(p).output or b"") for p in parents}
    return outputs[parents[0]] if len(parents) == 1 else outputs


def check_step(w: World, before: dict[str, NodeRun], t: Transition) -> None:
    defn, e, now = w.defn, w.execution, w.now
    assert e.version == 7 and e.updated_at == now
    assert len({n.node_id for n in t.nodes}) == len(t.nodes)
    for n in t.nodes:
        assert n.updated_at == now
        old = before.get(n.node_id)
        if old is not None:
            assert (n.attempt, n.lease_seq) == (old.attempt, old.lease_seq)
            assert n != old
    for ev in t.events:
        assert (ev.time, ev.tenant_id, ev.execution_id) == (now, "t", "x")
        if ev.details is not None:
            json.loads(ev.details)

    newly_ready = [
        n.node_id
        for n in t.nodes
        if n.status is NodeStatus.READY
        and (n.node_id not in before or before[n.node_id].status not in ACTIVE)
    ]
    assert [ev.node_id for ev in t.events if ev.type is EventType.NODE_READY] == newly_ready
    for nid in newly_ready:
        node = w.get(nid)
        assert node.available_at == now
        assert json.loads(node.input or b"") == expected_input(w, node)
    for nid in t.dead_lettered:
        node = w.get(nid)
        assert node.role is NodeRole.TASK
        assert node.status in (NodeStatus.FAILED, NodeStatus.TIMED_OUT)
        below = descendants(defn, nid)
        for other in w.task_ids():  # below it SKIPPED, elsewhere CANCELLED
            if other != nid and not before[other].status.terminal:
                status = NodeStatus.SKIPPED if other in below else NodeStatus.CANCELLED
                assert w.get(other).status is status

    compensable = [
        w.get(s.id)
        for s in defn.nodes
        if s.compensation_task_type
        and s.id not in defn.handlers
        and w.get(s.id).status is NodeStatus.SUCCEEDED
        and s.id + COMPENSATION_SUFFIX not in w.nodes
    ]
    for nid in newly_ready:
        if w.get(nid).role is NodeRole.COMPENSATION:
            done = w.get(base_of(nid))
            assert all(c.updated_at <= done.updated_at for c in compensable)

    active_comps = 0
    for nid, node in w.nodes.items():
        spec = defn.node_map.get(base_of(nid))
        assert spec is not None
        expected_role = (
            NodeRole.COMPENSATION
            if nid.endswith(COMPENSATION_SUFFIX)
            else NodeRole.ON_FAILURE
            if nid in defn.handlers
            else NodeRole.TASK
        )
        assert node.role is expected_role
        if node.role is NodeRole.COMPENSATION:
            assert w.get(spec.id).status is NodeStatus.SUCCEEDED
            active_comps += node.status in ACTIVE
        if node.held:
            assert node.status is NodeStatus.READY and node.schedule_deadline is None
        if node.status is NodeStatus.READY:
            if node.node_paused:
                assert node.held
            elif e.status is ExecutionStatus.RUNNING:
                assert not node.held
                assert (node.schedule_deadline is None) == (node.schedule_to_start_timeout is None)
            elif e.status is ExecutionStatus.PAUSED and node.role is not NodeRole.ON_FAILURE:
                assert node.held
        if node.role is NodeRole.TASK and node.status in RAN:
            assert all(w.get(p).status is NodeStatus.SUCCEEDED for p in defn.parents[nid])
        policy = defn.retry_policy_for(spec)
        assert node.attempt - node.retry_base <= policy.max_attempts
        for payload in (node.input, node.output):
            if payload is not None:
                json.loads(payload)
    assert active_comps <= 1

    if e.status.terminal:
        assert e.ended_at is not None
        assert not any(n.status in ACTIVE for n in w.nodes.values())
        assert not w.claimable()
    else:
        assert e.ended_at is None
        assert any(n.status in ACTIVE for n in w.nodes.values()), "the execution is stuck"
        if e.error is not None:
            assert all(w.get(i).status.terminal for i in w.task_ids())


def random_action(w: World, data: st.DataObject) -> None:
    e = w.execution
    nodes = list(w.nodes.values())
    leased = [n for n in nodes if n.status is NodeStatus.LEASED]
    unfinished = [n for n in nodes if not n.status.terminal]
    options: list[str] = []
    if e.status.terminal:
        dead = [
            n
            for n in nodes
            if n.role is NodeRole.TASK and n.status in (NodeStatus.FAILED, NodeStatus.TIMED_OUT)
        ]
        if e.status is ExecutionStatus.FAILED and dead and w.redrives < 2:
            w.redrives += 1
            w.call(redrive, data.draw(st.sampled_from(dead)).node_id, f"dl{w.redrives}")
        return
    # Weighted so that runs mostly progress and fail, and are only sometimes cut short.
    options += ["claim"] * 6 if w.claimable() else []
    options += ["complete"] * 6 + ["fail"] * 2 if leased else []
    if unfinished and data.draw(st.integers(0, 2)) == 0:
        options += [
            data.draw(st.sampled_from(["cancel_node", "pause_node", "resume_node", "fuzz"]))
        ]
    waiting = [n for n in w.claimable() if n.schedule_deadline is not None]
    options += ["time_out_unstarted"] if waiting else []
    options += ["pause_execution", "resume_execution"]
    if data.draw(st.integers(0, 40)) == 0:  # rarely: the run is cut short
        options = ["cancel_execution", *(["time_out_execution"] if e.deadline else [])]
    action = data.draw(st.sampled_from(options))
    if action == "claim":
        w.claim(data.draw(st.sampled_from(w.claimable())))
    elif action == "complete":
        w.call(complete_node, data.draw(st.sampled_from(leased)).node_id, data.draw(payloads))
    elif action == "fail":
        node = data.draw(st.sampled_from(leased))
        error = ErrorInfo(type=data.draw(st.sampled_from(["Boom", "Fatal"])), message="m")
        w.call(fail_node, node.node_id, error, data.draw(st.booleans()))
    elif action == "time_out_unstarted":
        node = data.draw(st.sampled_from(waiting))
        assert node.schedule_deadline is not None
        w.now = max(w.now, node.schedule_deadline - SEC)
        w.call(time_out_unstarted, node.node_id)
    elif action == "time_out_execution":
        assert e.deadline is not None
        w.now = max(w.now, e.deadline - SEC)
        w.call(time_out_execution)
        w.timed_out = True
    elif action == "cancel_execution":
        w.call(cancel_execution, "stop")
        w.cancelled = True
    elif action in ("pause_execution", "resume_execution"):
        fn = pause_execution if action == "pause_execution" else resume_execution
        wanted = ExecutionStatus.RUNNING if fn is pause_execution else ExecutionStatus.PAUSED
        try_call(w, fn, must=e.status is wanted)
    else:  # one operation on one node, which the engine may refuse
        node = data.draw(st.sampled_from(unfinished))
        fn = {
            "cancel_node": cancel_node,
            "pause_node": pause_node,
            "resume_node": resume_node,
            "fuzz": data.draw(st.sampled_from([cancel_node, pause_node, resume_node])),
        }[action]
        args = (node.node_id, "op") if fn is cancel_node else (node.node_id,)
        if fn is cancel_node:
            must = True
        elif fn is resume_node:
            must = node.node_paused
        else:
            must = node.status in (NodeStatus.BLOCKED, NodeStatus.READY) and not node.node_paused
        try_call(w, fn, *args, must=must)


def try_call(w: World, fn: Any, *args: Any, must: bool) -> None:
    """Call ``fn``: it must succeed when ``must``, and otherwise refuse without side effects."""
    try:
        w.call(fn, *args)
    except FailedPrecondition:
        assert not must, f"{fn.__name__}{args} was refused"
        return
    assert must, f"{fn.__name__}{args} should have been refused"


def drive_to_end(w: World) -> None:
    """Release everything and complete whatever runs until the execution ends."""
    for _ in range(10 * (len(w.defn.nodes) * 2 + 5)):
        e = w.execution
        if e.status.terminal:
            return
        if e.status is ExecutionStatus.PAUSED:
            w.call(resume_execution)
            continue
        paused = [n for n in w.nodes.values() if n.node_paused and n.status in ACTIVE]
        if paused:
            w.call(resume_node, paused[0].node_id)
            continue
        claimable = w.claimable()
        if claimable:
            w.claim(claimable[0])
        leased = [n for n in w.nodes.values() if n.status is NodeStatus.LEASED]
        assert leased, "nothing left to run in an unfinished execution"
        w.call(complete_node, leased[0].node_id, b'{"ok":true}')
    raise AssertionError("the execution did not end within the bound")


@settings(max_examples=150, deadline=None)
@given(defn=fault_dags(), exec_in=payloads, steps=st.integers(0, 60), data=st.data())
def test_random_fault_runs_end_consistently(
    defn: WorkflowDef, exec_in: bytes, steps: int, data: st.DataObject
) -> None:
    validate_definition(defn)
    w = World(defn, exec_in)
    for _ in range(steps):
        random_action(w, data)
    drive_to_end(w)

    e = w.execution
    assert e.status.terminal
    assert all(n.status.terminal for n in w.nodes.values())
    assert not w.claimable()
    tasks = [w.get(i) for i in w.task_ids()]
    succeeded = e.error is None and all(n.status is NodeStatus.SUCCEEDED for n in tasks)
    assert (e.status is ExecutionStatus.SUCCEEDED) == succeeded
    if succeeded:
        sinks = defn.sinks
        outputs = {s: json.loads(w.get(s).output or b"") for s in sinks}
        expected = outputs[sinks[0]] if len(sinks) == 1 else outputs
        assert json.loads(e.output or b"") == expected
    if e.status is ExecutionStatus.FAILED:
        dead = [n for n in tasks if n.status in (NodeStatus.FAILED, NodeStatus.TIMED_OUT)]
        assert [n.node_id for n in dead] == [e.error.node_id if e.error else None]
        for n in tasks:  # every succeeded node was compensated (runs may have failed)
            if defn.node_map[n.node_id].compensation_task_type and n.status is NodeStatus.SUCCEEDED:
                assert n.node_id + COMPENSATION_SUFFIX in w.nodes
    if e.status is ExecutionStatus.TIMED_OUT:
        assert w.timed_out and e.error is not None and e.error.type == "ExecutionTimeout"
    if e.status is ExecutionStatus.CANCELLED:
        assert w.cancelled or any(n.status is NodeStatus.CANCELLED for n in tasks)
    # A finished execution accepts no more results.
    for n in w.nodes.values():
        leased = replace(n, status=NodeStatus.LEASED)
        try:
            complete_node(defn, e, {**w.nodes, n.node_id: leased}, n.node_id, b"1", w.now)
        except FailedPrecondition:
            continue
        raise AssertionError("a finished execution accepted a result")
