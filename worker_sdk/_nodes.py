"""Node types of a workflow definition: ``TaskNode``, ``SwitchNode``, ``WorkflowNode``,
``MapNode``, ``ApprovalNode``.

They are frozen dataclasses, checked for obvious mistakes when built (a bad id,
an unknown trigger rule, a malformed duration); whether the graph is sound
(references, cycles, CEL types, limits) is checked by the coordinator at
registration. ``Workflow`` builds them for you (``wf.node``, ``wf.switch``,
``wf.subworkflow``, ``wf.map``, ``wf.approval``); a handler passes them to ``Result(add_nodes=...)``
to grow its execution.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import timedelta
from typing import Any, ClassVar, TypeAlias

from google.protobuf import duration_pb2

from trellis.v1 import common_pb2
from worker_sdk._duration import Duration, parse_duration, parse_positive_duration
from worker_sdk._errors import DefinitionError
from worker_sdk._task import Task

NODE_ID = re.compile(r"[A-Za-z0-9_.\-]+")
ROLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")

TRIGGER_RULES = (
    "all_success",
    "all_done",
    "one_success",
    "none_failed_min_one_success",
    "all_failed",
)
"""When a node runs given how its parents ended (docs/control-flow.md); "" is all_success."""

NODE_KINDS = ("task", "switch", "workflow", "map", "approval")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def check_retries(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DefinitionError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def check_duration(value: Duration, what: str, *, positive: bool = True) -> timedelta:
    try:
        return (parse_positive_duration if positive else parse_duration)(value, what=what)
    except ValueError as exc:
        raise DefinitionError(str(exc)) from None


def check_trigger_rule(value: Any, where: str) -> str:
    if value in ("", None):
        return ""
    if value not in TRIGGER_RULES:
        raise DefinitionError(
            f"{where}: unknown trigger_rule {value!r}; use one of {', '.join(TRIGGER_RULES)}"
        )
    return str(value)


def _duration_proto(value: timedelta) -> duration_pb2.Duration:
    msg = duration_pb2.Duration()
    msg.FromTimedelta(value)
    return msg


def _names(value: str | Iterable[str], where: str, what: str) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise DefinitionError(f"{where}: {what} must be node ids, got {name!r}")
    return names


def _expression(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DefinitionError(f"{where}: {what} must be a CEL expression (a string), got {value!r}")
    return value.strip()


def json_schema(schema: Any, where: str) -> Any:
    """A JSON Schema (a mapping) as the Struct the definition carries; the coordinator
    checks that it is a valid schema at registration."""
    if not isinstance(schema, Mapping):
        raise DefinitionError(f"{where} must be a JSON Schema (a mapping), got {schema!r}")
    struct = common_pb2.NodeDefinition().output_schema
    try:
        struct.update(schema)
    except (TypeError, ValueError, AttributeError) as exc:
        raise DefinitionError(f"{where} is not a JSON object: {one_line(str(exc))}") from None
    return struct


@dataclass(frozen=True)
class _Node:
    """Options every node kind has (see the concrete classes)."""

    id: str
    _: KW_ONLY
    trigger_rule: str = ""
    skip_if: str = ""
    input: str = ""
    output: str = ""
    priority: int = 0

    kind: ClassVar[str] = "task"

    @property
    def _where(self) -> str:
        return f"node {self.id!r}"

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not NODE_ID.fullmatch(self.id):
            raise DefinitionError(
                f"invalid node id {self.id!r} (use letters, digits, '_', '-' and '.')"
            )
        where = self._where
        object.__setattr__(self, "trigger_rule", check_trigger_rule(self.trigger_rule, where))
        for name in ("skip_if", "input", "output"):
            object.__setattr__(self, name, _expression(getattr(self, name), where, name))
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise DefinitionError(f"{where}: priority must be an integer, got {self.priority!r}")

    def to_proto(self) -> common_pb2.NodeDefinition:
        """The node as sent in a ``WorkflowDefinition`` or a ``DagExpansion``."""
        msg = common_pb2.NodeDefinition(
            id=self.id,
            kind="" if self.kind == "task" else self.kind,
            trigger_rule=self.trigger_rule,
            skip_if=self.skip_if,
            input=self.input,
            output=self.output,
            priority=self.priority,
        )
        self._fill(msg)
        return msg

    def _fill(self, msg: common_pb2.NodeDefinition) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class _Work(_Node):
    """Options of the nodes whose work a worker does (task and map nodes)."""

    task: str | Task
    _: KW_ONLY
    config: Mapping[str, Any] | None = None
    retries: int | None = None
    timeout: Duration | None = None
    heartbeat_timeout: Duration | None = None
    schedule_to_start_timeout: Duration | None = None
    retry_initial_interval: Duration | None = None
    retry_backoff: float | None = None
    retry_max_interval: Duration | None = None
    retry_jitter: float | None = None
    non_retryable_errors: Sequence[str] = ()
    on_failure: str | None = None
    compensation: str | Task | None = None
    pause_before: bool = False
    output_schema: Mapping[str, Any] | None = None
    _config: Any = field(default=None, init=False, repr=False, compare=False)
    _output_schema: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        where = self._where
        task = self.task
        if not (isinstance(task, Task) or (isinstance(task, str) and task.strip())):
            raise DefinitionError(f"{where}: task must be a task type name or a Task, got {task!r}")
        if self.config is not None:
            if not isinstance(self.config, Mapping):
                raise DefinitionError(f"{where}: config must be a mapping, got {self.config!r}")
            struct = common_pb2.NodeDefinition().config
            try:
                struct.update(self.config)
            except (TypeError, ValueError, AttributeError) as exc:
                raise DefinitionError(
                    f"{where}: config is not a JSON object: {one_line(str(exc))}"
                ) from None
            object.__setattr__(self, "_config", struct)
        if self.output_schema is not None:
            schema = json_schema(self.output_schema, f"{where}: output_schema")
            object.__setattr__(self, "_output_schema", schema)
        if self.retries is not None:
            check_retries(self.retries, f"{where}: retries")
        for name in (
            "timeout",
            "heartbeat_timeout",
            "schedule_to_start_timeout",
            "retry_initial_interval",
            "retry_max_interval",
        ):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_duration(value, f"{where}: {name}"))
        backoff = self.retry_backoff
        if backoff is not None:
            if isinstance(backoff, bool) or not isinstance(backoff, int | float):
                raise DefinitionError(f"{where}: retry_backoff must be a number")
            if backoff < 1:
                raise DefinitionError(f"{where}: retry_backoff must be at least 1.0")
        jitter = self.retry_jitter
        if jitter is not None and not (isinstance(jitter, int | float) and 0 <= jitter <= 1):
            raise DefinitionError(f"{where}: retry_jitter must be between 0 and 1")
        errors = self.non_retryable_errors
        object.__setattr__(
            self, "non_retryable_errors", (errors,) if isinstance(errors, str) else tuple(errors)
        )

    def _fill(self, msg: common_pb2.NodeDefinition) -> None:
        task = self.task
        retries, timeout = self.retries, self.timeout
        if isinstance(task, Task):
            msg.task_type = task.name
            retries = task.retries if retries is None else retries
            timeout = task.timeout if timeout is None else timeout
        else:
            msg.task_type = task
        if self._config is not None:
            msg.config.CopyFrom(self._config)
        if self._output_schema is not None:
            msg.output_schema.CopyFrom(self._output_schema)
        for name, value in (
            ("start_to_close_timeout", timeout),
            ("heartbeat_timeout", self.heartbeat_timeout),
            ("schedule_to_start_timeout", self.schedule_to_start_timeout),
        ):
            if value is not None:
                getattr(msg, name).CopyFrom(_duration_proto(check_duration(value, name)))
        if self.on_failure is not None:
            msg.on_failure = self.on_failure
        compensation = self.compensation
        if compensation is not None:
            msg.compensation_task_type = (
                compensation.name if isinstance(compensation, Task) else compensation
            )
        msg.pause_before = bool(self.pause_before)
        policy = common_pb2.RetryPolicy()
        if retries is not None:
            policy.max_attempts = retries + 1
        if self.retry_initial_interval is not None:
            policy.initial_interval.CopyFrom(
                _duration_proto(check_duration(self.retry_initial_interval, "interval"))
            )
        if self.retry_backoff is not None:
            policy.backoff_coefficient = float(self.retry_backoff)
        if self.retry_max_interval is not None:
            policy.max_interval.CopyFrom(
                _duration_proto(check_duration(self.retry_max_interval, "interval"))
            )
        policy.non_retryable_error_types.extend(self.non_retryable_errors)
        if self.retry_jitter is not None:
            policy.jitter = float(self.retry_jitter)
        if policy.ByteSize():
            msg.retry_policy.CopyFrom(policy)


@dataclass(frozen=True)
class TaskNode(_Work):
    """A node run by a worker serving ``task`` (a task type name or a ``Task``)::

        TaskNode("charge", "charge-card", retries=3, timeout="30s",
                 trigger_rule="none_failed_min_one_success")

    Every node kind takes ``trigger_rule`` (when it runs given how its parents ended:
    all_success (default), all_done, one_success, none_failed_min_one_success,
    all_failed), ``skip_if`` (CEL: true means SKIPPED instead of run), ``input`` (CEL
    computing its input) and ``output`` (CEL over ``output`` mapping its result), and
    ``priority`` (higher runs first).

    ``retries`` is the number of extra attempts; ``timeout`` bounds one attempt
    (start_to_close); a ``Task``'s own timeout and retries are the defaults.
    ``on_failure`` names a handler node run with this node's failure; ``compensation``
    is the task that undoes it if the execution fails later; ``pause_before`` holds it
    until an operator resumes it. ``output_schema`` (a JSON Schema, a mapping) is what
    every output of the node must match: one that does not fails the attempt, not retried
    (error type ``OutputSchemaViolation``). Raises DefinitionError on a bad argument.
    """

    kind: ClassVar[str] = "task"


@dataclass(frozen=True)
class MapNode(_Work):
    """Runs ``task`` once per element of the list the CEL expression ``items`` gives::

        MapNode("resize", "resize-image", items="input.images", max_concurrency=20)

    Each element is one task (its input is the element; ``ctx.map_index`` its index),
    with the node's retry policy and timeouts; at most ``max_concurrency`` elements
    are ready or running at once (0: no limit). The node's output is the list of the
    elements' outputs, in order (mapped by ``output`` when set). Takes every option of
    ``TaskNode``.
    """

    _: KW_ONLY
    items: str
    max_concurrency: int = 0

    kind: ClassVar[str] = "map"

    def __post_init__(self) -> None:
        super().__post_init__()
        items = _expression(self.items, self._where, "items")
        if not items:
            raise DefinitionError(f"{self._where}: items must be a CEL expression giving a list")
        object.__setattr__(self, "items", items)
        limit = self.max_concurrency
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise DefinitionError(
                f"{self._where}: max_concurrency must be a non-negative integer (0: no limit), "
                f"got {limit!r}"
            )

    def _fill(self, msg: common_pb2.NodeDefinition) -> None:
        super()._fill(msg)
        msg.items = self.items
        msg.max_concurrency = self.max_concurrency


@dataclass(frozen=True)
class Case:
    """One branch of a ``SwitchNode``: when ``condition`` (CEL, bool) holds, ``targets`` run."""

    condition: str
    targets: Sequence[str]

    def __post_init__(self) -> None:
        condition = _expression(self.condition, "switch case", "condition")
        if not condition:
            raise DefinitionError("switch case: condition must be a non-empty CEL expression")
        object.__setattr__(self, "condition", condition)
        object.__setattr__(self, "targets", _names(self.targets, f"case {condition!r}", "targets"))


@dataclass(frozen=True)
class SwitchNode(_Node):
    """Chooses which of its children run; evaluated by the coordinator, no worker::

        SwitchNode("route", [Case("input.amount > 1000", ["manual_review"])],
                   default_targets=["auto_approve"])

    The cases are tried in order; the first that holds names the children that run
    (every one that holds with ``match_all``), ``default_targets`` run when none does,
    and the other children are SKIPPED. Its output is its input.
    """

    cases: Sequence[Case]
    _: KW_ONLY
    default_targets: Sequence[str] = ()
    match_all: bool = False

    kind: ClassVar[str] = "switch"

    def __post_init__(self) -> None:
        super().__post_init__()
        cases = tuple(self.cases)
        for case in cases:
            if not isinstance(case, Case):
                raise DefinitionError(
                    f"{self._where}: cases must be Case(condition, targets) objects, got {case!r}"
                )
        object.__setattr__(self, "cases", cases)
        object.__setattr__(
            self,
            "default_targets",
            _names(self.default_targets, self._where, "default_targets"),
        )

    def _fill(self, msg: common_pb2.NodeDefinition) -> None:
        msg.cases.extend(
            common_pb2.SwitchCase(condition=c.condition, targets=c.targets) for c in self.cases
        )
        msg.default_targets.extend(self.default_targets)
        msg.match_all = bool(self.match_all)


@dataclass(frozen=True)
class WorkflowNode(_Node):
    """Runs a child execution of the registered workflow ``workflow`` and waits for it::

        WorkflowNode("pay", "payments", version=2, input="{'amount': input.total}")

    ``version`` 0 means the child's latest version when it starts. The node is
    WAITING while the child runs; it succeeds with the child's output (mapped by
    ``output``) and fails with the child's error. The child must be registered first.
    """

    workflow: str
    _: KW_ONLY
    version: int = 0

    kind: ClassVar[str] = "workflow"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.workflow, str) or not self.workflow.strip():
            raise DefinitionError(
                f"{self._where}: workflow must be the name of a registered workflow, "
                f"got {self.workflow!r}"
            )
        version = self.version
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise DefinitionError(
                f"{self._where}: version must be a non-negative integer (0: latest), "
                f"got {version!r}"
            )

    def _fill(self, msg: common_pb2.NodeDefinition) -> None:
        msg.workflow_name = self.workflow
        msg.workflow_version = self.version


@dataclass(frozen=True)
class ApprovalNode(_Node):
    """Waits for a person holding ``required_role`` to approve or reject it; no worker::

        ApprovalNode("review", "operator", timeout="24h", prompt="Check the amount")

    The node is WAITING until someone approves it (``trellis approve``,
    ``Client.approve_node``): it then succeeds with the decision as its output,
    ``{"approved": true, "by": ..., "at": ..., "comment": ...}`` (mapped by ``output``,
    which also sees ``input``), and its children run. A rejection fails it, not retried,
    with error type ``ApprovalRejected`` and the comment as message. ``timeout`` (none
    when unset) fails it as TIMED_OUT (``ApprovalTimeout``) when nobody decided in time;
    ``prompt`` is shown to approvers. Holders of the ``admin`` role may always decide.
    Also takes ``on_failure`` (a handler run with the rejection) and ``compensation``.
    """

    required_role: str
    _: KW_ONLY
    timeout: Duration | None = None
    prompt: str = ""
    on_failure: str | None = None
    compensation: str | Task | None = None

    kind: ClassVar[str] = "approval"

    def __post_init__(self) -> None:
        super().__post_init__()
        where = self._where
        role = self.required_role
        if not isinstance(role, str) or not ROLE_NAME.fullmatch(role):
            raise DefinitionError(
                f"{where}: required_role must be a role name (letters, digits, '_', '-' and "
                f"'.'), such as 'operator', got {role!r}"
            )
        if self.timeout is not None:
            object.__setattr__(self, "timeout", check_duration(self.timeout, f"{where}: timeout"))
        if not isinstance(self.prompt, str):
            raise DefinitionError(f"{where}: prompt must be a string, got {self.prompt!r}")

    def _fill(self, msg: common_pb2.NodeDefinition) -> None:
        msg.required_role = self.required_role
        if self.timeout is not None:
            msg.approval_timeout.CopyFrom(
                _duration_proto(check_duration(self.timeout, "approval timeout"))
            )
        msg.prompt = self.prompt
        if self.on_failure is not None:
            msg.on_failure = self.on_failure
        compensation = self.compensation
        if compensation is not None:
            msg.compensation_task_type = (
                compensation.name if isinstance(compensation, Task) else compensation
            )


Node: TypeAlias = TaskNode | SwitchNode | WorkflowNode | MapNode | ApprovalNode
"""Any node a ``Workflow`` or a ``Result`` carries."""

NODE_TYPES = (TaskNode, SwitchNode, WorkflowNode, MapNode, ApprovalNode)
