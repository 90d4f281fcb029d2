"""The node kinds the coordinator runs itself: switch, workflow, map and approval nodes
(pure).

- A **switch** is evaluated the moment it is ready: it SUCCEEDS with its input as output
  (event details ``{"taken": [...]}``); the children it does not take are SKIPPED.
- A **workflow** node is WAITING for a child execution it asks the service to start
  (``Transition.start_children``); ``_children`` ends it when the child ends.
- A **map** node evaluates ``items_expr`` and runs one element run (role MAP_ITEM, id
  ``"<id>[<i>]"``) per element, at most ``max_concurrency`` READY or LEASED at once, while
  it is WAITING. When all have succeeded it SUCCEEDS with the list of their outputs in
  index order (composed without re-parsing); the first element failing for good fails it.
- An **approval** node is WAITING (no worker, no lease) for a person's decision, until its
  ``approval_timeout`` when it has one (the deadline is the row's ``schedule_deadline``);
  ``_approvals`` ends it.

Functions here evaluate every expression before changing anything, so an
``ExpressionError`` they raise leaves the step untouched.
"""

from __future__ import annotations

import json
from dataclasses import replace

from coordinator.engine._cel import ExpressionError
from coordinator.engine._common import (
    Step,
    end_node,
    end_unfinished,
    item_id,
    make_ready,
    new_run,
    rfc3339,
    split_item_id,
)
from coordinator.engine._exprs import NodeVars
from coordinator.engine._flow import end_failed
from coordinator.engine._routing import fail_for_good, succeed
from coordinator.engine._validate import Limits
from coordinator.model import (
    NULL_JSON,
    ChildStart,
    ErrorInfo,
    EventType,
    NodeRole,
    NodeRun,
    NodeStatus,
)

MAX_MAP_ITEMS = Limits().max_map_items


def run_switch(step: Step, run: NodeRun, variables: NodeVars) -> list[str]:
    """Evaluate a ready switch; returns the ids it ended (itself, the children it skips)."""
    taken = variables.switch_targets()
    output = variables.output(run.input or NULL_JSON)
    sid = run.node_id
    done = replace(run, output=output, error=None)
    end_node(step, done, NodeStatus.SUCCEEDED, EventType.NODE_SUCCEEDED, {"taken": taken})
    ended = [sid]
    for child in sorted(step.defn.children[sid], key=step.order):
        node = step.get(child)
        if child not in taken and node.status is NodeStatus.BLOCKED:
            reason = {"reason": f"not chosen by '{sid}'"}
            end_node(step, node, NodeStatus.SKIPPED, EventType.NODE_SKIPPED, reason)
            ended.append(child)
    return ended


def start_child(step: Step, run: NodeRun, payload: bytes) -> None:
    """A ready workflow node WAITs for the child execution the service starts."""
    spec = step.defn.node_map[run.node_id]
    details = {"workflow_name": spec.workflow_name, "workflow_version": spec.workflow_version}
    waiting = replace(run, status=NodeStatus.WAITING, input=payload, child_execution_id=None)
    step.put(waiting, EventType.NODE_WAITING, details)
    step.start_children.append(
        ChildStart(
            node_id=run.node_id,
            workflow_name=spec.workflow_name,
            workflow_version=spec.workflow_version,
            input=payload,
            priority=run.priority,
        )
    )


def wait_for_approval(step: Step, run: NodeRun, payload: bytes) -> None:
    """A ready approval node WAITs for a decision (``NODE_WAITING`` with its role, prompt
    and deadline)."""
    spec = step.defn.node_map[run.node_id]
    timeout = spec.approval_timeout
    deadline = None if timeout is None else step.now + timeout
    waiting = replace(
        run,
        status=NodeStatus.WAITING,
        input=payload,
        held=False,
        available_at=None,
        schedule_deadline=deadline,
    )
    details: dict[str, object] = {"required_role": spec.required_role}
    if spec.prompt:
        details["prompt"] = spec.prompt
    if deadline is not None:
        details["deadline"] = rfc3339(deadline)
    step.put(waiting, EventType.NODE_WAITING, details)


def start_map(step: Step, run: NodeRun, variables: NodeVars) -> list[str]:
    """A ready map node: SUCCEEDS at once on an empty list (returns its id), else WAITs for
    its elements (the first ``max_concurrency`` READY, the rest BLOCKED)."""
    spec = step.defn.node_map[run.node_id]
    items = variables.items()
    if len(items) > MAX_MAP_ITEMS:
        raise ExpressionError(
            f"node '{spec.id}' items_expr ({spec.items_expr!r}) gave {len(items)} elements, "
            f"more than the limit of {MAX_MAP_ITEMS}; split the work into batches"
        )
    if not items:
        output = variables.output(b"[]")
        done = replace(run, output=output, error=None)
        end_node(step, done, NodeStatus.SUCCEEDED, EventType.NODE_SUCCEEDED, {"items": 0})
        return [run.node_id]
    try:
        payloads = [
            json.dumps(item, separators=(",", ":"), allow_nan=False).encode() for item in items
        ]
    except (TypeError, ValueError) as exc:
        raise ExpressionError(
            f"node '{spec.id}' items_expr ({spec.items_expr!r}) gave an element that is not "
            f"JSON: {exc}"
        ) from exc

    step.put(replace(run, status=NodeStatus.WAITING), EventType.NODE_WAITING, {"items": len(items)})
    window = spec.max_concurrency or len(payloads)
    template = replace(
        new_run(step.defn, spec, step.execution, step.now, role=NodeRole.MAP_ITEM),
        node_paused=False,
    )
    for index, payload in enumerate(payloads):
        iid = item_id(spec.id, index)
        element = replace(template, node_id=iid, input=payload)
        if step.has(iid):  # run before (a redriven execution): keep its fencing numbers
            old = step.get(iid)
            element = replace(
                element, attempt=old.attempt, lease_seq=old.lease_seq, retry_base=old.attempt
            )
        if index < window:
            make_ready(step, element, input=payload, available_at=step.now)
        else:
            step.put(element)
    return []


def item_succeeded(step: Step, item: NodeRun) -> list[str]:
    """An element SUCCEEDED: the next BLOCKED one becomes READY; when all have succeeded,
    the map node SUCCEEDS (returns its id)."""
    map_id, index = split_item_id(item.node_id)
    ids = step.items(map_id)
    # Elements are released in index order, so the first BLOCKED one is after this one.
    for later in range(index + 1, len(ids)):
        node = step.get(ids[later])
        if node.status is NodeStatus.BLOCKED:
            make_ready(step, node, input=node.input, available_at=step.now)
            return []
    if any(step.get(i).status is not NodeStatus.SUCCEEDED for i in ids):
        return []
    node = step.get(map_id)
    if node.status is not NodeStatus.WAITING:
        return []
    result = b"[" + b",".join(step.get(i).output or NULL_JSON for i in ids) + b"]"
    succeed(step, node, result, {"items": len(ids)})
    return [map_id]


def item_failed(step: Step, item: NodeRun, status: NodeStatus, error: ErrorInfo) -> list[str]:
    """An element failed for good: it is dead-lettered, the other unfinished elements are
    CANCELLED and the map node fails (handled or not); returns the map node's id."""
    map_id, index = split_item_id(item.node_id)
    end_failed(step, item, status, error, dead_letter=True)
    end_unfinished(step, step.items(map_id), f"element {index} of map node '{map_id}' failed")
    message = (
        f"element {index} ('{item.node_id}') failed on attempt {item.attempt}: {error.message}"
    )
    map_error = ErrorInfo(
        type=error.type,
        message=message,
        details=error.details,
        node_id=map_id,
        attempt=item.attempt,
        worker_id=item.worker_id,
    )
    execution_error = replace(map_error, message=f"node '{map_id}' failed: {message}")
    node = step.get(map_id)
    fail_for_good(step, node, NodeStatus.FAILED, map_error, execution_error, dead_letter=False)
    return [map_id]
