"""Workflow definitions: the ``Workflow`` builder and ``load_workflow`` for YAML/JSON files."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from trellis.v1 import common_pb2
from worker_sdk._convert import duration_to_proto
from worker_sdk._duration import Duration, parse_duration, parse_positive_duration
from worker_sdk._errors import DefinitionError
from worker_sdk._task import Task

_NODE_ID = re.compile(r"[A-Za-z0-9_.\-]+")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _retries(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DefinitionError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _duration(value: Duration, what: str, *, positive: bool = True) -> Any:
    try:
        parsed = (parse_positive_duration if positive else parse_duration)(value, what=what)
    except ValueError as exc:
        raise DefinitionError(str(exc)) from None
    return duration_to_proto(parsed)


@dataclass
class _Node:
    proto: common_pb2.NodeDefinition
    after: tuple[str, ...] = field(default=())


class Workflow:
    """Builds a workflow definition in code::

        wf = Workflow("orders", default_retries=2)
        a = wf.node("fetch", fetch_task)
        b = wf.node("price", "price-order", after=[a], timeout="30s")
        c = wf.node("stock", "check-stock", after=[a])
        wf.node("ship", ship_task, after=[b, c], config={"carrier": "ups"})
        await client.register_workflow(wf)

    ``node`` returns the node id, so dependencies read naturally; a node may only
    depend on nodes added before it. A node that runs a ``Task`` object takes the
    task's timeout and retries unless it sets its own. Semantic validation (limits,
    known task types ...) happens on the coordinator at registration.
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
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise DefinitionError(f"workflow name must be a non-empty string, got {name!r}")
        self.name = name
        self.description = description
        self._default_retries = (
            None
            if default_retries is None
            else _retries(default_retries, f"workflow {name!r}: default_retries")
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
        self._nodes: dict[str, _Node] = {}

    @property
    def node_ids(self) -> tuple[str, ...]:
        """The ids of the nodes added so far, in order."""
        return tuple(self._nodes)

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
    ) -> str:
        """Adds a node running ``task`` (a task type name or a ``Task``) and returns its id.

        ``after`` names the nodes it depends on; ``retries`` is the number of extra
        attempts (max_attempts = retries + 1); ``timeout`` bounds one attempt
        (start_to_close); ``non_retryable_errors`` lists error types never retried.
        ``on_failure`` names a handler node (added with no ``after`` and depended on by
        none) that runs with this node's failure as input; ``compensation`` is the task
        that undoes this node if the execution fails later (run in reverse order of
        completion); ``pause_before`` holds the node until an operator resumes it.
        Raises DefinitionError on a bad argument.
        """
        where = f"workflow {self.name!r}, node {id!r}"
        if not isinstance(id, str) or not _NODE_ID.fullmatch(id):
            raise DefinitionError(
                f"workflow {self.name!r}: invalid node id {id!r} "
                "(use letters, digits, '_', '-' and '.')"
            )
        if id in self._nodes:
            raise DefinitionError(f"{where}: a node with this id already exists")
        if isinstance(task, Task):
            task_type = task.name
            if retries is None:
                retries = task.retries
            if timeout is None:
                timeout = task.timeout
        elif isinstance(task, str) and task.strip():
            task_type = task
        else:
            raise DefinitionError(f"{where}: task must be a task type name or a Task, got {task!r}")
        deps = (after,) if isinstance(after, str) else tuple(after)
        for dep in deps:
            if dep not in self._nodes:
                raise DefinitionError(
                    f"{where}: depends on {dep!r}, which is not a node added before it"
                )
        if len(set(deps)) != len(deps):
            raise DefinitionError(f"{where}: 'after' lists a node twice")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise DefinitionError(f"{where}: priority must be an integer, got {priority!r}")

        node = common_pb2.NodeDefinition(id=id, task_type=task_type, priority=priority)
        if config is not None:
            if not isinstance(config, Mapping):
                raise DefinitionError(f"{where}: config must be a mapping, got {config!r}")
            try:
                node.config.update(config)
            except (TypeError, ValueError, AttributeError) as exc:
                raise DefinitionError(
                    f"{where}: config is not a JSON object: {_one_line(str(exc))}"
                ) from None
        if timeout is not None:
            node.start_to_close_timeout.CopyFrom(_duration(timeout, f"{where}: timeout"))
        if heartbeat_timeout is not None:
            node.heartbeat_timeout.CopyFrom(
                _duration(heartbeat_timeout, f"{where}: heartbeat_timeout")
            )
        if schedule_to_start_timeout is not None:
            node.schedule_to_start_timeout.CopyFrom(
                _duration(schedule_to_start_timeout, f"{where}: schedule_to_start_timeout")
            )
        if on_failure is not None:
            node.on_failure = on_failure
        if compensation is not None:
            node.compensation_task_type = (
                compensation.name if isinstance(compensation, Task) else compensation
            )
        node.pause_before = bool(pause_before)

        policy = common_pb2.RetryPolicy()
        if retries is not None:
            policy.max_attempts = _retries(retries, f"{where}: retries") + 1
        if retry_initial_interval is not None:
            policy.initial_interval.CopyFrom(
                _duration(retry_initial_interval, f"{where}: retry_initial_interval")
            )
        if retry_backoff is not None:
            if isinstance(retry_backoff, bool) or not isinstance(retry_backoff, int | float):
                raise DefinitionError(f"{where}: retry_backoff must be a number")
            if retry_backoff < 1:
                raise DefinitionError(f"{where}: retry_backoff must be at least 1.0")
            policy.backoff_coefficient = float(retry_backoff)
        if retry_max_interval is not None:
            policy.max_interval.CopyFrom(
                _duration(retry_max_interval, f"{where}: retry_max_interval")
            )
        if isinstance(non_retryable_errors, str):
            non_retryable_errors = (non_retryable_errors,)
        policy.non_retryable_error_types.extend(non_retryable_errors)
        if retry_jitter is not None:
            if not 0 <= retry_jitter <= 1:
                raise DefinitionError(f"{where}: retry_jitter must be between 0 and 1")
            policy.jitter = float(retry_jitter)
        if policy.ByteSize():
            node.retry_policy.CopyFrom(policy)

        self._nodes[id] = _Node(node, deps)
        return id

    def to_proto(self) -> common_pb2.WorkflowDefinition:
        """The definition as sent to ``RegisterWorkflow`` (version 0: assigned on registration)."""
        msg = common_pb2.WorkflowDefinition(name=self.name, description=self.description)
        for node in self._nodes.values():
            msg.nodes.append(node.proto)
            msg.edges.extend(
                common_pb2.Edge(source=dep, target=node.proto.id) for dep in node.after
            )
        if self._default_retries is not None:
            msg.default_retry_policy.max_attempts = self._default_retries + 1
        if self._default_timeout is not None:
            msg.default_start_to_close_timeout.CopyFrom(self._default_timeout)
        for key, value in self._timeouts.items():
            getattr(msg, key).CopyFrom(value)
        return msg


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
        raise DefinitionError(f"{file}: invalid YAML: {_one_line(str(exc))}") from None


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
        raise DefinitionError(f"{file}: cannot read: {_one_line(str(exc))}") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DefinitionError(f"{file}: invalid JSON: {_one_line(str(exc))}") from None
    else:
        data = _load_yaml(file, text)
    if data is None:
        raise DefinitionError(f"{file}: the file is empty")
    if not isinstance(data, dict):
        raise DefinitionError(
            f"{file}: the document must be a mapping (a workflow definition), "
            f"not {type(data).__name__}"
        )
    try:
        return json_format.ParseDict(data, common_pb2.WorkflowDefinition())
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as exc:
        raise DefinitionError(f"{file}: {_one_line(str(exc))}") from None
