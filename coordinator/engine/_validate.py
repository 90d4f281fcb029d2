"""Registration-time checks of a workflow definition (pure; raises ``InvalidArgument``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import timedelta

from coordinator.engine._cel import OUTPUT_VARIABLES, compile_expression
from coordinator.engine._json import decode_json
from coordinator.errors import InvalidArgument
from coordinator.model import (
    NodeKind,
    NodeSpec,
    RetryPolicy,
    TriggerRule,
    WorkflowDef,
    malformed_reference,
)

ALLOWED_KINDS: tuple[str, ...] = tuple(k.value for k in NodeKind)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TASK_TYPE_RE = re.compile(r"[A-Za-z0-9_.:/-]+")
_NAME_CHARSET = "letters, digits, '_', '.' and '-', starting with a letter or digit"
_TASK_TYPE_CHARSET = "letters, digits, '_', '.', ':', '/' and '-'"


@dataclass(frozen=True)
class Limits:
    """Size limits a definition must respect to be registered."""

    max_nodes: int = 1000
    max_edges: int = 10000
    max_id_length: int = 128  # node ids and task types
    max_name_length: int = 128  # workflow names
    max_config_bytes: int = 64 * 1024
    max_map_items: int = 10000  # elements one map node fans out over
    max_prompt_length: int = 4096  # an approval node's prompt, in characters


def validate_definition(defn: WorkflowDef, limits: Limits = Limits()) -> None:
    """Raise ``InvalidArgument`` naming the first problem found in ``defn``, or return None.

    Checks the name, node ids, kinds and task types (also compensation task types),
    configs (valid JSON within the size limit), retry policies (jitter a fraction in
    [0, 1]) and timeouts (positive when set), edges (known nodes, no self or duplicate
    edges), on_failure handlers (an existing other node with no edges, no handler or
    compensation of its own), approval nodes (a valid required_role, a positive
    approval_timeout when set, none of a worker's settings) and that the graph is acyclic;
    size limits come from ``limits``.
    """
    _check_name(defn.name, limits)
    wf = f"workflow '{defn.name}'"
    if not defn.nodes:
        raise InvalidArgument(f"{wf} has no nodes; add at least one node")
    if len(defn.nodes) > limits.max_nodes:
        raise InvalidArgument(
            f"{wf} has {len(defn.nodes)} nodes, more than the limit of {limits.max_nodes}; "
            "split it into smaller workflows"
        )
    if len(defn.edges) > limits.max_edges:
        raise InvalidArgument(
            f"{wf} has {len(defn.edges)} edges, more than the limit of {limits.max_edges}; "
            "split it into smaller workflows"
        )
    _check_retry_policy(defn.default_retry_policy, f"{wf} default retry policy")
    _check_timeout(
        defn.default_start_to_close_timeout, f"{wf} default_start_to_close_timeout", required=True
    )
    _check_timeout(defn.execution_timeout, f"{wf} execution_timeout")
    _check_timeout(
        defn.default_schedule_to_start_timeout, f"{wf} default_schedule_to_start_timeout"
    )
    _check_timeout(defn.default_heartbeat_timeout, f"{wf} default_heartbeat_timeout")
    seen: set[str] = set()
    for node in defn.nodes:
        if node.id in seen:
            raise InvalidArgument(f"duplicate node id '{node.id}' in {wf}; node ids must be unique")
        seen.add(node.id)
        _check_node(node, limits)
    _check_edges(defn, seen)
    _check_switches(defn)
    _check_handlers(defn, seen)
    _check_acyclic(defn)


def _check_name(name: str, limits: Limits) -> None:
    if not name:
        raise InvalidArgument("workflow name is empty; give the workflow a name")
    if len(name) > limits.max_name_length:
        raise InvalidArgument(
            f"workflow name '{name[:32]}...' is {len(name)} characters long; "
            f"use at most {limits.max_name_length}"
        )
    if not _NAME_RE.fullmatch(name):
        raise InvalidArgument(f"workflow name {name!r} is invalid; use only {_NAME_CHARSET}")


def _check_node(node: NodeSpec, limits: Limits) -> None:
    if not node.id:
        raise InvalidArgument("a node has an empty id; give every node an id")
    if len(node.id) > limits.max_id_length:
        raise InvalidArgument(
            f"node id '{node.id[:32]}...' is {len(node.id)} characters long; "
            f"use at most {limits.max_id_length}"
        )
    if not _NAME_RE.fullmatch(node.id):
        raise InvalidArgument(f"node id {node.id!r} is invalid; use only {_NAME_CHARSET}")
    where = f"node '{node.id}'"
    if node.kind not in ALLOWED_KINDS:
        allowed = ", ".join(repr(k) for k in ALLOWED_KINDS)
        raise InvalidArgument(f"{where} has unknown kind {node.kind!r}; allowed kinds: {allowed}")
    if node.kind != NodeKind.APPROVAL and (
        node.task_type or node.kind in (NodeKind.TASK, NodeKind.MAP)
    ):
        _check_task_type(node, limits)
    _check_kind_fields(node, limits)
    if node.output_schema and node.kind not in (NodeKind.TASK, NodeKind.MAP):
        raise InvalidArgument(
            f"{where} sets output_schema but is a {node.kind} node; output_schema applies to "
            "what workers return (task and map nodes): remove it"
        )
    _check_expressions(node)
    _check_config(node, limits)
    if node.retry_policy is not None:
        _check_retry_policy(node.retry_policy, f"{where} retry policy")
    _check_timeout(node.start_to_close_timeout, f"{where} start_to_close_timeout")
    _check_timeout(node.heartbeat_timeout, f"{where} heartbeat_timeout")
    _check_timeout(node.schedule_to_start_timeout, f"{where} schedule_to_start_timeout")
    compensation = node.compensation_task_type
    if compensation is not None:
        if len(compensation) > limits.max_id_length:
            raise InvalidArgument(
                f"{where} compensation_task_type is {len(compensation)} characters long; "
                f"use at most {limits.max_id_length}"
            )
        if not _TASK_TYPE_RE.fullmatch(compensation):
            raise InvalidArgument(
                f"{where} compensation_task_type {compensation!r} is invalid; "
                f"use only {_TASK_TYPE_CHARSET}"
            )


def _check_task_type(node: NodeSpec, limits: Limits) -> None:
    check_task_type(node.task_type, f"node '{node.id}'", limits)


def check_task_type(task_type: str, where: str, limits: Limits | None = None) -> None:
    """A task type name: not empty, not too long, of the allowed characters."""
    limits = limits or Limits()
    if not task_type:
        raise InvalidArgument(f"{where} has an empty task_type; name the task its workers run")
    if len(task_type) > limits.max_id_length:
        raise InvalidArgument(
            f"{where} task_type is {len(task_type)} characters long; "
            f"use at most {limits.max_id_length}"
        )
    if not _TASK_TYPE_RE.fullmatch(task_type):
        raise InvalidArgument(
            f"{where} task_type {task_type!r} is invalid; use only {_TASK_TYPE_CHARSET}"
        )


# The fields only one kind uses, and that kind.
_KIND_FIELDS: tuple[tuple[str, NodeKind], ...] = (
    ("cases", NodeKind.SWITCH),
    ("default_targets", NodeKind.SWITCH),
    ("match_all", NodeKind.SWITCH),
    ("workflow_name", NodeKind.WORKFLOW),
    ("workflow_version", NodeKind.WORKFLOW),
    ("items_expr", NodeKind.MAP),
    ("max_concurrency", NodeKind.MAP),
    ("required_role", NodeKind.APPROVAL),
    ("approval_timeout", NodeKind.APPROVAL),
    ("prompt", NodeKind.APPROVAL),
)

# What only nodes run by workers use: an approval node (decided by people) refuses them.
_WORKER_FIELDS = (
    "task_type",
    "config",
    "retry_policy",
    "start_to_close_timeout",
    "heartbeat_timeout",
    "schedule_to_start_timeout",
    "pause_before",
)


def _check_kind_fields(node: NodeSpec, limits: Limits) -> None:
    where = f"node '{node.id}'"
    for name, kind in _KIND_FIELDS:
        if getattr(node, name) and node.kind != kind:
            raise InvalidArgument(
                f"{where} sets {name} but is a {node.kind} node; {name} only applies to "
                f"{kind} nodes, remove it or change the kind"
            )
    try:
        TriggerRule(node.trigger_rule)
    except ValueError:
        allowed = ", ".join(repr(r.value) for r in TriggerRule)
        raise InvalidArgument(
            f"{where} has unknown trigger_rule {node.trigger_rule!r}; allowed: {allowed}"
        ) from None
    if node.kind == NodeKind.SWITCH and not (node.cases or node.default_targets):
        raise InvalidArgument(
            f"{where} is a switch with no cases and no default_targets; add a case "
            "(condition and targets) or default targets"
        )
    if node.kind == NodeKind.WORKFLOW:
        if not node.workflow_name:
            raise InvalidArgument(
                f"{where} is a workflow node with no workflow_name; name the workflow it starts"
            )
        try:
            _check_name(node.workflow_name, limits)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where} workflow_name: {exc}") from None
        if node.workflow_version < 0:
            raise InvalidArgument(
                f"{where} has workflow_version {node.workflow_version}; use 0 (the latest "
                "version when the child starts) or a version number"
            )
    if node.kind == NodeKind.MAP:
        if not node.items_expr:
            raise InvalidArgument(
                f"{where} is a map node with no items_expr; write a CEL expression giving "
                "the list to fan out over, such as input.items"
            )
        if node.max_concurrency < 0:
            raise InvalidArgument(
                f"{where} has max_concurrency {node.max_concurrency}; use 0 (no limit) or more"
            )
    if node.kind == NodeKind.APPROVAL:
        _check_approval(node, limits)


def _check_approval(node: NodeSpec, limits: Limits) -> None:
    where = f"node '{node.id}'"
    for name in _WORKER_FIELDS:
        if getattr(node, name):
            raise InvalidArgument(
                f"{where} is an approval node and sets {name}, which only applies to nodes "
                "run by workers; remove it (an approval node's own limit is approval_timeout)"
            )
    role = node.required_role
    if not role:
        raise InvalidArgument(
            f"{where} is an approval node with no required_role; name the role a person "
            "needs to approve or reject it, such as operator"
        )
    if len(role) > limits.max_id_length or not _NAME_RE.fullmatch(role):
        raise InvalidArgument(
            f"{where} required_role {role[:32]!r} is invalid; use at most "
            f"{limits.max_id_length} characters: {_NAME_CHARSET}"
        )
    _check_timeout(node.approval_timeout, f"{where} approval_timeout")
    if len(node.prompt) > limits.max_prompt_length:
        raise InvalidArgument(
            f"{where} prompt is {len(node.prompt)} characters long; use at most "
            f"{limits.max_prompt_length} (link to longer instructions instead)"
        )


def _check_expressions(node: NodeSpec) -> None:
    where = f"node '{node.id}'"
    if node.skip_if:
        compile_expression(node.skip_if, where=f"{where} skip_if", boolean=True)
    if node.input_expr:
        compile_expression(node.input_expr, where=f"{where} input_expr")
    if node.output_expr:
        compile_expression(
            node.output_expr, where=f"{where} output_expr", variables=OUTPUT_VARIABLES
        )
    if node.items_expr:
        compile_expression(node.items_expr, where=f"{where} items_expr")
    for number, case in enumerate(node.cases, 1):
        compile_expression(case.condition, where=f"{where} case {number} condition", boolean=True)


def _check_switches(defn: WorkflowDef) -> None:
    """Every target of a switch is one of its children (an edge switch -> target exists)."""
    for node in defn.nodes:
        if node.kind != NodeKind.SWITCH:
            continue
        children = set(defn.children[node.id])
        named = [(f"case {n}", t) for n, c in enumerate(node.cases, 1) for t in c.targets]
        named += [("default_targets", t) for t in node.default_targets]
        for where, target in named:
            if target not in children:
                raise InvalidArgument(
                    f"node '{node.id}' {where} names {target!r}, which is not a child of the "
                    f"switch; add the edge {node.id} -> {target} or fix the target"
                )
        for number, case in enumerate(node.cases, 1):
            if not case.targets:
                raise InvalidArgument(
                    f"node '{node.id}' case {number} has no targets; name the children it runs"
                )


def _check_config(node: NodeSpec, limits: Limits) -> None:
    if not node.config:
        return
    where = f"node '{node.id}' config"
    if len(node.config) > limits.max_config_bytes:
        raise InvalidArgument(
            f"{where} is {len(node.config)} bytes, more than the limit of "
            f"{limits.max_config_bytes}; pass large data as execution input instead"
        )
    decode_json(node.config, where)
    bad = malformed_reference(node.config)
    if bad is not None:
        raise InvalidArgument(
            f"{where} has a malformed secret reference {bad!r}; write ${{secret:NAME}} with "
            "NAME of 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )


# Every timeout and retry interval is bounded so deadlines stay representable.
MAX_DURATION = timedelta(days=3650)


def _check_retry_policy(policy: RetryPolicy, where: str) -> None:
    if policy.max_attempts < 1:
        raise InvalidArgument(
            f"{where} has max_attempts {policy.max_attempts}; use 1 or more (1 means no retries)"
        )
    if policy.initial_interval < timedelta(0):
        raise InvalidArgument(f"{where} has a negative initial_interval; use 0 or more")
    if policy.max_interval < timedelta(0):
        raise InvalidArgument(f"{where} has a negative max_interval; use 0 or more")
    for name, value in (
        ("initial_interval", policy.initial_interval),
        ("max_interval", policy.max_interval),
    ):
        if value > MAX_DURATION:
            raise InvalidArgument(
                f"{where} has {name} {value.total_seconds():.0f}s, over the "
                f"{MAX_DURATION.days}-day limit; use a shorter interval"
            )
    if policy.max_interval < policy.initial_interval:
        raise InvalidArgument(
            f"{where} has max_interval {policy.max_interval.total_seconds()}s below "
            f"initial_interval {policy.initial_interval.total_seconds()}s; "
            "raise max_interval or lower initial_interval"
        )
    coefficient = policy.backoff_coefficient
    if not (math.isfinite(coefficient) and coefficient >= 1):
        raise InvalidArgument(
            f"{where} has backoff_coefficient {coefficient}; use a finite number >= 1"
        )
    if not (math.isfinite(policy.jitter) and 0 <= policy.jitter <= 1):
        raise InvalidArgument(
            f"{where} has jitter {policy.jitter}; use a fraction between 0 (none) and 1"
        )
    for error_type in policy.non_retryable_error_types:
        if not error_type:
            raise InvalidArgument(f"{where} lists an empty non-retryable error type; remove it")


def _check_timeout(value: timedelta | None, where: str, *, required: bool = False) -> None:
    if value is None:
        if required:
            raise InvalidArgument(f"{where} is missing; set a positive duration")
        return
    if value <= timedelta(0):
        raise InvalidArgument(
            f"{where} is {value.total_seconds()}s; use a positive duration or leave it unset"
        )
    if value > MAX_DURATION:
        raise InvalidArgument(
            f"{where} is {value.total_seconds():.0f}s, over the {MAX_DURATION.days}-day limit; "
            "use a shorter duration or leave it unset"
        )


def _check_edges(defn: WorkflowDef, ids: set[str]) -> None:
    seen: set[tuple[str, str]] = set()
    for source, target in defn.edges:
        edge = f"edge {source} -> {target}"
        for end in (source, target):
            if end not in ids:
                raise InvalidArgument(
                    f"{edge} refers to unknown node '{end}'; declare the node or fix the edge"
                )
        if source == target:
            raise InvalidArgument(f"{edge} connects node '{source}' to itself; remove it")
        if (source, target) in seen:
            raise InvalidArgument(f"duplicate {edge}; declare each edge once")
        seen.add((source, target))


def _check_handlers(defn: WorkflowDef, ids: set[str]) -> None:
    """on_failure names a separate node that stays outside the graph and handles no one."""
    touching: dict[str, tuple[str, str]] = {}
    for source, target in defn.edges:
        touching.setdefault(source, (source, target))
        touching.setdefault(target, (source, target))
    for node in defn.nodes:
        handler = node.on_failure
        if handler is None:
            continue
        where = f"node '{node.id}' on_failure"
        if handler not in ids:
            raise InvalidArgument(
                f"{where} names unknown node {handler!r}; declare the handler node or fix "
                "on_failure"
            )
        if handler == node.id:
            raise InvalidArgument(
                f"{where} names the node itself; point it at a separate handler node"
            )
        spec = defn.node_map[handler]
        role = f"node '{handler}' is the on_failure handler of '{node.id}'"
        if spec.kind != NodeKind.TASK:
            raise InvalidArgument(
                f"{role} and so must be a task node, but is a {spec.kind} node; "
                "point on_failure at a task node"
            )
        if handler in touching:
            source, target = touching[handler]
            raise InvalidArgument(
                f"{role} and so must have no edges, but has edge {source} -> {target}; "
                "remove the edge (a handler runs only when the node fails)"
            )
        if spec.on_failure is not None:
            raise InvalidArgument(
                f"{role} and declares on_failure {spec.on_failure!r} itself; handlers cannot "
                "have handlers, remove it"
            )
        if spec.compensation_task_type is not None:
            raise InvalidArgument(
                f"{role} and declares compensation_task_type; only workflow nodes are "
                "compensated, remove it"
            )


def _check_acyclic(defn: WorkflowDef) -> None:
    """Iterative depth-first search; reports the first cycle found as a path."""
    children = defn.children
    done: set[str] = set()
    for root in defn.nodes:
        if root.id in done:
            continue
        path: list[str] = [root.id]
        on_path: dict[str, int] = {root.id: 0}
        iters = [iter(children[root.id])]
        while iters:
            child = next(iters[-1], None)
            if child is None:
                iters.pop()
                finished = path.pop()
                del on_path[finished]
                done.add(finished)
            elif child in on_path:
                cycle = [*path[on_path[child] :], child]
                raise InvalidArgument(
                    f"workflow '{defn.name}' has a cycle: {' -> '.join(cycle)}; "
                    "remove one of these edges"
                )
            elif child not in done:
                on_path[child] = len(path)
                path.append(child)
                iters.append(iter(children[child]))
