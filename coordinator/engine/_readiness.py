"""When nodes run: trigger rules, skipping, and what a node does when it is ready (pure).

When a node ends (any terminal status) each BLOCKED child is evaluated by its trigger rule
(``verdict``): it runs, is SKIPPED, or waits for more parents. A SKIPPED node, and a node
that ends the moment it is ready (a switch, ``skip_if`` true, an empty map, an expression
error), is evaluated the same way in turn: ``propagate`` works through a worklist in
definition order until nothing more changes.

Trigger rules (parents' statuses; FAILED and TIMED_OUT count as failed):

==============================  ==========================  ===============================
rule                            runs                        SKIPPED
==============================  ==========================  ===============================
all_success (default)           all SUCCEEDED               as soon as one ended otherwise
all_done                        all finished                never
one_success                     as soon as one SUCCEEDED    all finished, none SUCCEEDED
none_failed_min_one_success     all finished, none failed,  all finished, otherwise
                                at least one SUCCEEDED
all_failed                      all finished, all failed    all finished, otherwise
==============================  ==========================  ===============================

A node that runs first gets its input (``input_expr`` or the default data passing), then
``skip_if`` may skip it; a task node is then READY, a switch is evaluated, a workflow node
WAITs for its child execution, a map node starts its elements and an approval node WAITs
for a decision (``_kinds``).
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterable
from dataclasses import replace

from coordinator.engine._cel import ExpressionError
from coordinator.engine._common import Step, end_node, make_ready
from coordinator.engine._exprs import NodeVars
from coordinator.engine._kinds import run_switch, start_child, start_map, wait_for_approval
from coordinator.engine._routing import expression_failed
from coordinator.model import EventType, NodeKind, NodeStatus, TriggerRule

_FAILED = frozenset({NodeStatus.FAILED, NodeStatus.TIMED_OUT})
_ENDED = {
    NodeStatus.SKIPPED: "was skipped",
    NodeStatus.CANCELLED: "was cancelled",
    NodeStatus.FAILED: "failed",
    NodeStatus.TIMED_OUT: "timed out",
}


class Verdict(enum.Enum):
    RUN = "run"
    SKIP = "skip"
    WAIT = "wait"


def verdict(step: Step, node_id: str) -> tuple[Verdict, str]:
    """What ``node_id``'s trigger rule says now, and why (for a skip)."""
    parents = step.defn.parents[node_id]
    if not parents:
        return Verdict.RUN, ""
    rule = step.defn.node_map[node_id].trigger_rule
    statuses = [(p, step.get(p).status) for p in parents]
    done = all(s.terminal for _, s in statuses)
    succeeded = [p for p, s in statuses if s is NodeStatus.SUCCEEDED]
    failed = [p for p, s in statuses if s in _FAILED]
    prefix = f"trigger rule {rule.value}"
    if rule is TriggerRule.ALL_SUCCESS:
        if len(succeeded) == len(statuses):
            return Verdict.RUN, ""
        for p, s in statuses:
            if s.terminal and s is not NodeStatus.SUCCEEDED:
                return Verdict.SKIP, f"upstream node '{p}' {_ENDED[s]}"
        return Verdict.WAIT, ""
    if rule is TriggerRule.ONE_SUCCESS:
        if succeeded:
            return Verdict.RUN, ""
        return (Verdict.SKIP, f"{prefix}: no parent succeeded") if done else (Verdict.WAIT, "")
    if not done:
        return Verdict.WAIT, ""
    if rule is TriggerRule.ALL_DONE:
        return Verdict.RUN, ""
    if rule is TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS:
        if failed:
            return Verdict.SKIP, f"{prefix}: parent '{failed[0]}' failed"
        if not succeeded:
            return Verdict.SKIP, f"{prefix}: no parent succeeded"
        return Verdict.RUN, ""
    # all_failed
    for p, s in statuses:
        if s not in _FAILED:
            return Verdict.SKIP, f"{prefix}: parent '{p}' is {s}"
    return Verdict.RUN, ""


def propagate(step: Step, ended: Iterable[str]) -> None:
    """Evaluate the BLOCKED children of the ``ended`` definition nodes, and of every node
    that ends because of that, in definition order."""
    heap = [(step.order(i), i) for i in ended]
    heapq.heapify(heap)
    seen: set[str] = set()
    while heap:
        _, nid = heapq.heappop(heap)
        if nid in seen:
            continue
        seen.add(nid)
        for child in sorted(step.defn.children[nid], key=step.order):
            if step.get(child).status is NodeStatus.BLOCKED:
                for done in evaluate(step, child):
                    heapq.heappush(heap, (step.order(done), done))


def evaluate(step: Step, node_id: str) -> list[str]:
    """Apply ``node_id``'s trigger rule (it is BLOCKED); returns the ids that ended."""
    decision, reason = verdict(step, node_id)
    if decision is Verdict.WAIT:
        return []
    if decision is Verdict.SKIP:
        node = step.get(node_id)
        end_node(step, node, NodeStatus.SKIPPED, EventType.NODE_SKIPPED, {"reason": reason})
        return [node_id]
    return activate(step, node_id)


def activate(step: Step, node_id: str) -> list[str]:
    """``node_id`` may run: compute its input, apply ``skip_if``, then act by kind.

    Returns the ids that ended here (the node itself, and children a switch skipped);
    an expression error fails the node for good (``ExpressionError``).
    """
    spec = step.defn.node_map[node_id]
    run = step.get(node_id)
    variables = NodeVars(step, spec)
    try:
        payload = variables.node_input()
        if variables.skip():
            reason = {"reason": f"skip_if {spec.skip_if!r} was true"}
            skipped = replace(run, input=payload)
            end_node(step, skipped, NodeStatus.SKIPPED, EventType.NODE_SKIPPED, reason)
            return [node_id]
        if spec.kind == NodeKind.SWITCH:
            return run_switch(step, replace(run, input=payload), variables)
        if spec.kind == NodeKind.MAP:
            return start_map(step, replace(run, input=payload), variables)
    except ExpressionError as exc:
        expression_failed(step, run, exc)
        return [node_id]
    if spec.kind == NodeKind.WORKFLOW:
        start_child(step, run, payload)
    elif spec.kind == NodeKind.APPROVAL:
        wait_for_approval(step, run, payload)
    else:
        make_ready(step, run, input=payload, available_at=step.now)
    return []
