"""Workflow definitions: the ``Workflow`` builder and ``load_workflow`` for YAML/JSON files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from trellis.v1 import common_pb2
from worker_sdk._convert import duration_to_proto
from worker_sdk._duration import Duration
from worker_sdk._errors import DefinitionError
from worker_sdk._nodes import (
    NODE_KINDS,
    NODE_TYPES,
    TRIGGER_RULES,
    ApprovalNode,
    Case,
    MapNode,
    Node,
    SwitchNode,
    TaskNode,
    WorkflowNode,
    check_duration,
    check_retries,
    json_schema,
    one_line,
)
from worker_sdk._task import Task


def _duration(value: Duration, what: str) -> Any:
    return duration_to_proto(check_duration(value, what))


class Workflow:
    """Builds a workflow definition in code::

        wf = Workflow("orders", default_retries=2)
        a = wf.node("fetch", fetch_task)
        b = wf.node("price", "price-order", after=[a], timeout="30s")
        c = wf.node("stock", "check-stock", after=[a])
        wf.node("ship", ship_task, after=[b, c], config={"carrier": "ups"})
        await client.register_workflow(wf)

    ``node`` (and ``switch``, ``subworkflow``, ``map``, ``approval``, ``add``) returns the
    node id, so dependencies read naturally; a node may only depend on nodes added before
    it (switch targets may name nodes added later). A node that runs a ``Task`` object
    takes the task's timeout and retries unless it sets its own. Semantic validation
    (references, cycles, CEL types, limits) happens on the coordinator at registration.

    ``max_concurrency`` caps the nodes of one execution running at once (a start may set
    its own); ``max_running_executions`` caps the running executions of the workflow,
    and ``overflow_policy`` ("queue", the default, or "reject") says what a start beyond
    it does (0: no limit). ``input_schema`` (a JSON Schema, a mapping) is what every
    execution input must match, on every kind of start; a node's ``output_schema`` is what
    its outputs must match (docs/control-flow.md).
    """

    def __init__(
        self,
        name: str,
        description: str = "",
        default_retries: int | None = None,
        default_timeout: Duration | None = None,
        *,
        execution_timeout: Duration | None = None,
        default_heartbeat_timeout: Duration | None = None,
        default_schedule_to_start_timeout: Duration | None = None,
        max_concurrency: int = 0,
        max_running_executions: int = 0,
        overflow_policy: str | None = None,
        input_schema: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise DefinitionError(f"workflow name must be a non-empty string, got {name!r}")
        self.name = name
        self.max_concurrency = _count(max_concurrency, f"workflow {name!r}: max_concurrency")
        self.max_running_executions = _count(
            max_running_executions, f"workflow {name!r}: max_running_executions"
        )
        self._overflow_policy = (
            common_pb2.OVERFLOW_POLICY_UNSPECIFIED  # the coordinator's default: queue
            if overflow_policy is None
            else overflow_policy_value(overflow_policy, f"workflow {name!r}: overflow_policy")
        )
        self.description = description
        self._input_schema = (
            None
            if input_schema is None
            else json_schema(input_schema, f"workflow {name!r}: input_schema")
        )
        self._default_retries = (
            None
            if default_retries is None
            else check_retries(default_retries, f"workflow {name!r}: default_retries")
        )
        self._default_timeout = (
            None
            if default_timeout is None
            else _duration(default_timeout, f"workflow {name!r}: default_timeout")
        )
        self._timeouts = {
            key: _duration(value, f"workflow {name!r}: {key}")
            for key, value in (
                ("execution_timeout", execution_timeout),
                ("default_heartbeat_timeout", default_heartbeat_timeout),
                ("default_schedule_to_start_timeout", default_schedule_to_start_timeout),
            )
            if value is not None
        }
        self._nodes: dict[str, tuple[Node, tuple[str, ...]]] = {}

    @property
    def node_ids(self) -> tuple[str, ...]:
        """The ids of the nodes added so far, in order."""
        return tuple(self._nodes)

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The nodes added so far, in order."""
        return tuple(node for node, _ in self._nodes.values())

    def add(self, node: Node, *, after: str | Iterable[str] = ()) -> str:
        """Adds a node built by hand (``TaskNode``, ``SwitchNode`` ...) and returns its id.

        ``after`` names the nodes it depends on (added before it).
        """
        if not isinstance(node, NODE_TYPES):
            raise DefinitionError(
                f"workflow {self.name!r}: add() takes a TaskNode, SwitchNode, WorkflowNode, "
                f"MapNode or ApprovalNode, got {node!r}"
            )
        where = f"workflow {self.name!r}, node {node.id!r}"
        if node.id in self._nodes:
            raise DefinitionError(f"{where}: a node with this id already exists")
        deps = (after,) if isinstance(after, str) else tuple(after)
        for dep in deps:
            if dep not in self._nodes:
                raise DefinitionError(
                    f"{where}: depends on {dep!r}, which is not a node added before it"
                )
        if len(set(deps)) != len(deps):
            raise DefinitionError(f"{where}: 'after' lists a node twice")
        self._nodes[node.id] = (node, deps)
        return node.id

    def _build(self, make: Any, *args: Any, after: str | Iterable[str], **options: Any) -> str:
        try:
            node = make(*args, **options)
        except DefinitionError as exc:
            raise DefinitionError(f"workflow {self.name!r}: {exc}") from None
        return self.add(node, after=after)

    def node(
        self,
        id: str,
        task: str | Task,
        *,
        after: str | Iterable[str] = (),
        config: Mapping[str, Any] | None = None,
        retries: int | None = None,
        timeout: Duration | None = None,
        heartbeat_timeout: Duration | None = None,
        priority: int = 0,
        retry_initial_interval: Duration | None = None,
        retry_backoff: float | None = None,
        retry_max_interval: Duration | None = None,
        non_retryable_errors: Iterable[str] = (),
        retry_jitter: float | None = None,
        schedule_to_start_timeout: Duration | None = None,
        on_failure: str | None = None,
        compensation: str | Task | None = None,
        pause_before: bool = False,
        trigger_rule: str = "",
        skip_if: str = "",
        input: str = "",
        output: str = "",
        output_schema: Mapping[str, Any] | None = None,
    ) -> str:
        """Adds a node running ``task`` (a task type name or a ``Task``) and returns its id.

        ``after`` names the nodes it depends on; ``retries`` is the number of extra
        attempts (max_attempts = retries + 1); ``timeout`` bounds one attempt
        (start_to_close); ``non_retryable_errors`` lists error types never retried.
        ``on_failure`` names a handler node (added with no ``after`` and depended on by
        none) that runs with this node's failure as input; ``compensation`` is the task
        that undoes this node if the execution fails later (run in reverse order of
        completion); ``pause_before`` holds the node until an operator resumes it.
        ``trigger_rule``, ``skip_if``, ``input`` and ``output`` steer the flow (see
        ``TaskNode`` and docs/control-flow.md). ``output_schema`` (a JSON Schema) is what
        the node's outputs must match. Raises DefinitionError on a bad argument.
        """
        if isinstance(non_retryable_errors, str):
            non_retryable_errors = (non_retryable_errors,)
        return self._build(
            TaskNode,
            id,
            task,
            after=after,
            config=config,
            retries=retries,
            timeout=timeout,
            heartbeat_timeout=heartbeat_timeout,
            priority=priority,
            retry_initial_interval=retry_initial_interval,
            retry_backoff=retry_backoff,
            retry_max_interval=retry_max_interval,
            non_retryable_errors=tuple(non_retryable_errors),
            retry_jitter=retry_jitter,
            schedule_to_start_timeout=schedule_to_start_timeout,
            on_failure=on_failure,
            compensation=compensation,
            pause_before=pause_before,
            trigger_rule=trigger_rule,
            skip_if=skip_if,
            input=input,
            output=output,
            output_schema=output_schema,
        )

    def switch(
        self,
        id: str,
        cases: Iterable[Case | tuple[str, str | Iterable[str]]],
        *,
        after: str | Iterable[str] = (),
        default_targets: str | Iterable[str] = (),
        match_all: bool = False,
        **options: Any,
    ) -> str:
        """Adds a switch node choosing which of its children run, and returns its id::

            route = wf.switch("route", [("input.amount > 1000", "manual_review")],
                              after=check, default_targets="auto_approve")

        ``cases`` are ``Case`` objects or ``(condition, targets)`` pairs, tried in
        order; the targets are children of the switch added after it. ``options`` are
        ``trigger_rule``, ``skip_if``, ``input``, ``output``, ``priority``.
        """
        built: list[Case] = []
        for case in cases:
            if isinstance(case, Case):
                built.append(case)
                continue
            try:
                condition, targets = case
            except (TypeError, ValueError):
                raise DefinitionError(
                    f"workflow {self.name!r}, node {id!r}: a case must be Case(condition, "
                    f"targets) or a (condition, targets) pair, got {case!r}"
                ) from None
            built.append(self._case(id, condition, targets))
        return self._build(
            SwitchNode,
            id,
            built,
            after=after,
            default_targets=(
                (default_targets,) if isinstance(default_targets, str) else tuple(default_targets)
            ),
            match_all=match_all,
            **options,
        )

    def _case(self, id: str, condition: str, targets: str | Iterable[str]) -> Case:
        try:
            return Case(condition, (targets,) if isinstance(targets, str) else tuple(targets))
        except DefinitionError as exc:
            raise DefinitionError(f"workflow {self.name!r}, node {id!r}: {exc}") from None

    def subworkflow(
        self,
        id: str,
        workflow: str,
        *,
        version: int = 0,
        after: str | Iterable[str] = (),
        **options: Any,
    ) -> str:
        """Adds a node running a child execution of the registered workflow ``workflow``.

        ``version`` 0 means the child's latest version when it starts; ``options`` are
        ``input`` (CEL: the child's input), ``output`` (CEL over the child's ``output``),
        ``trigger_rule``, ``skip_if``, ``priority``. See ``WorkflowNode``.
        """
        return self._build(WorkflowNode, id, workflow, version=version, after=after, **options)

    def map(
        self,
        id: str,
        task: str | Task,
        *,
        items: str,
        max_concurrency: int = 0,
        after: str | Iterable[str] = (),
        **options: Any,
    ) -> str:
        """Adds a map node: ``task`` runs once per element of the list ``items`` gives.

        ``max_concurrency`` caps the elements ready or running at once (0: no limit);
        ``options`` are those of ``node`` (retries, timeout, config, input, output ...).
        See ``MapNode``.
        """
        return self._build(
            MapNode,
            id,
            task,
            items=items,
            max_concurrency=max_concurrency,
            after=after,
            **options,
        )

    def approval(
        self,
        id: str,
        required_role: str,
        *,
        timeout: Duration | None = None,
        prompt: str = "",
        after: str | Iterable[str] = (),
        **options: Any,
    ) -> str:
        """Adds an approval node: it waits, with no worker, for a person holding
        ``required_role`` (or ``admin``) to approve or reject it, and returns its id::

            review = wf.approval("review", required_role="operator", timeout="24h",
                                 prompt="Check the amount", after=check)

        Approved, it succeeds with the decision as output and its children run; rejected,
        it fails (not retried) with the comment as reason; ``timeout`` (none when unset)
        fails it as TIMED_OUT when nobody decided in time. ``options`` are ``input``,
        ``output``, ``trigger_rule``, ``skip_if``, ``priority``, ``on_failure``,
        ``compensation``. See ``ApprovalNode``.
        """
        return self._build(
            ApprovalNode,
            id,
            required_role,
            timeout=timeout,
            prompt=prompt,
            after=after,
            **options,
        )

    def to_proto(self) -> common_pb2.WorkflowDefinition:
        """The definition as sent to ``RegisterWorkflow`` (version 0: assigned on registration)."""
        msg = common_pb2.WorkflowDefinition(name=self.name, description=self.description)
        for node, after in self._nodes.values():
            msg.nodes.append(node.to_proto())
            msg.edges.extend(common_pb2.Edge(source=dep, target=node.id) for dep in after)
        if self._default_retries is not None:
            msg.default_retry_policy.max_attempts = self._default_retries + 1
        if self._default_timeout is not None:
            msg.default_start_to_close_timeout.CopyFrom(self._default_timeout)
        for key, value in self._timeouts.items():
            getattr(msg, key).CopyFrom(value)
        msg.max_concurrency = self.max_concurrency
        msg.max_running_executions = self.max_running_executions
        msg.overflow_policy = self._overflow_policy
        if self._input_schema is not None:
            msg.input_schema.CopyFrom(self._input_schema)
        return msg


_OVERFLOW_POLICIES = {
    "queue": common_pb2.OVERFLOW_POLICY_QUEUE,
    "reject": common_pb2.OVERFLOW_POLICY_REJECT,
}


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DefinitionError(f"{what} must be an int of 0 (no limit) or more, got {value!r}")
    return value


def overflow_policy_value(value: Any, what: str) -> common_pb2.OverflowPolicy.ValueType:
    """'queue' or 'reject' (any case, or the proto name OVERFLOW_POLICY_...) as the enum."""
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("overflow_policy_")
        if key in _OVERFLOW_POLICIES:
            return _OVERFLOW_POLICIES[key]
    raise DefinitionError(f"{what} must be 'queue' or 'reject', got {value!r}")


def _load_yaml(file: Path, text: str) -> Any:
    """YAML support is optional: the base (worker) install carries grpcio and protobuf only."""
    try:
        import yaml
    except ImportError:
        raise DefinitionError(
            f"{file}: reading YAML needs PyYAML: pip install 'trellis[yaml]', or use a .json file"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DefinitionError(f"{file}: invalid YAML: {one_line(str(exc))}") from None


def load_workflow(path: str | os.PathLike[str]) -> common_pb2.WorkflowDefinition:
    """Reads a definition from a YAML (.yaml, .yml) or JSON (.json) file.

    The document uses the protobuf JSON mapping of ``WorkflowDefinition``
    (``nodes``, ``edges``, ``taskType`` or ``task_type``, durations as "30s" ...).
    Raises DefinitionError naming the file and the problem on one line.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise DefinitionError(
            f"{file}: unsupported file type {file.suffix or '(none)'!r}; use .yaml, .yml or .json"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DefinitionError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DefinitionError(f"{file}: cannot read: {one_line(str(exc))}") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DefinitionError(f"{file}: invalid JSON: {one_line(str(exc))}") from None
    else:
        data = _load_yaml(file, text)
    if data is None:
        raise DefinitionError(f"{file}: the file is empty")
    if not isinstance(data, dict):
        raise DefinitionError(
            f"{file}: the document must be a mapping (a workflow definition), "
            f"not {type(data).__name__}"
        )
    for key in ("overflow_policy", "overflowPolicy"):
        if key in data:
            try:
                policy = overflow_policy_value(data[key], key)
            except DefinitionError as exc:
                raise DefinitionError(f"{file}: {exc}") from None
            data[key] = common_pb2.OverflowPolicy.Name(policy)
    try:
        msg = json_format.ParseDict(data, common_pb2.WorkflowDefinition())
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as exc:
        raise DefinitionError(f"{file}: {one_line(str(exc))}") from None
    try:
        check_definition(msg)
    except DefinitionError as exc:
        raise DefinitionError(f"{file}: {exc}") from None
    return msg


def check_definition(msg: common_pb2.WorkflowDefinition | Iterable[Any]) -> None:
    """Local checks of a definition's (or an expansion's) nodes: known kinds and trigger rules.

    Everything else (references, cycles, CEL, limits) is the coordinator's to check.
    """
    nodes = msg.nodes if isinstance(msg, common_pb2.WorkflowDefinition) else msg
    for node in nodes:
        where = f"node {node.id!r}"
        if node.kind and node.kind not in NODE_KINDS:
            raise DefinitionError(
                f"{where}: unknown kind {node.kind!r}; use one of {', '.join(NODE_KINDS)}"
            )
        if node.trigger_rule and node.trigger_rule not in TRIGGER_RULES:
            raise DefinitionError(
                f"{where}: unknown trigger_rule {node.trigger_rule!r}; "
                f"use one of {', '.join(TRIGGER_RULES)}"
            )
