"""Workflow definitions: the builder and load_workflow."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from trellis.v1 import common_pb2
from worker_sdk import DefinitionError, TaskContext, Workflow, load_workflow, task


@task("fetch", timeout="30s", retries=2)
async def fetch(ctx: TaskContext, data: Any) -> Any:
    return data


def diamond() -> Workflow:
    wf = Workflow("etl", description="diamond", default_retries=1, default_timeout="10m")
    a = wf.node("a", fetch)
    b = wf.node("b", "transform", after=[a], config={"mode": "fast", "n": 3, "tags": ["x"]})
    c = wf.node("c", fetch, after=a, timeout="5s", retries=0)
    wf.node(
        "d",
        "load",
        after=[b, c],
        heartbeat_timeout="1m",
        priority=7,
        retry_initial_interval="2s",
        retry_backoff=3,
        retry_max_interval="1h",
        non_retryable_errors=["ValueError"],
    )
    return wf


def test_builder_diamond_to_proto() -> None:
    msg = diamond().to_proto()
    assert (msg.name, msg.description, msg.version) == ("etl", "diamond", 0)
    assert [n.id for n in msg.nodes] == ["a", "b", "c", "d"]
    assert [(e.source, e.target) for e in msg.edges] == [
        ("a", "b"),
        ("a", "c"),
        ("b", "d"),
        ("c", "d"),
    ]
    assert msg.default_retry_policy.max_attempts == 2
    assert msg.default_start_to_close_timeout.ToTimedelta() == timedelta(minutes=10)
    a, b, c, d = msg.nodes
    # A Task's timeout and retries are the node's defaults ...
    assert a.task_type == "fetch"
    assert a.start_to_close_timeout.ToTimedelta() == timedelta(seconds=30)
    assert a.retry_policy.max_attempts == 3
    # ... unless the node sets its own.
    assert c.start_to_close_timeout.ToTimedelta() == timedelta(seconds=5)
    assert c.retry_policy.max_attempts == 1
    # A task type given by name has no defaults: the definition's apply.
    assert not b.HasField("retry_policy") and not b.HasField("start_to_close_timeout")
    assert json_format.MessageToDict(b.config) == {"mode": "fast", "n": 3, "tags": ["x"]}
    assert d.heartbeat_timeout.ToTimedelta() == timedelta(minutes=1)
    assert d.priority == 7
    assert d.retry_policy == common_pb2.RetryPolicy(
        initial_interval=d.retry_policy.initial_interval,
        backoff_coefficient=3.0,
        max_interval=d.retry_policy.max_interval,
        non_retryable_error_types=["ValueError"],
    )
    assert d.retry_policy.max_attempts == 0  # the definition default
    assert d.retry_policy.initial_interval.ToTimedelta() == timedelta(seconds=2)
    assert d.retry_policy.max_interval.ToTimedelta() == timedelta(hours=1)
    assert not d.HasField("config")


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda wf: [wf.node("a", "t"), wf.node("a", "t")], "already exists"),
        (lambda wf: wf.node("b", "t", after=["a"]), "depends on 'a'"),
        (lambda wf: wf.node("has space", "t"), "invalid node id"),
        (lambda wf: wf.node("a", ""), "task must be"),
        (lambda wf: wf.node("a", "t", timeout="soon"), "workflow 'w': invalid node 'a': timeout"),
        (lambda wf: wf.node("a", "t", retries=-1), "retries must be a non-negative"),
        (lambda wf: wf.node("a", "t", config={"x": object()}), "config is not a JSON object"),
        (lambda wf: wf.node("a", "t", config=[1]), "config must be a mapping"),
        (lambda wf: wf.node("a", "t", retry_backoff=0.5), "at least 1.0"),
    ],
)
def test_builder_errors(build: Any, problem: str) -> None:
    with pytest.raises(DefinitionError, match=problem):
        build(Workflow("w"))


def test_workflow_errors() -> None:
    with pytest.raises(DefinitionError, match="workflow name"):
        Workflow("")
    with pytest.raises(DefinitionError, match="default_timeout"):
        Workflow("w", default_timeout="-1s")


YAML_DEFINITION = """\
name: etl
description: diamond
defaultRetryPolicy: {maxAttempts: 2}
defaultStartToCloseTimeout: 600s
nodes:
  - id: a
    taskType: fetch
    startToCloseTimeout: 30s
    retryPolicy: {maxAttempts: 3}
  - id: b
    task_type: transform
    config: {mode: fast, n: 3, tags: [x]}
  - id: c
    taskType: fetch
    startToCloseTimeout: 5s
    retryPolicy: {maxAttempts: 1}
  - id: d
    taskType: load
    heartbeatTimeout: 60s
    priority: 7
    retryPolicy:
      initialInterval: 2s
      backoffCoefficient: 3
      maxInterval: 3600s
      nonRetryableErrorTypes: [ValueError]
edges:
  - {source: a, target: b}
  - {source: a, target: c}
  - {source: b, target: d}
  - {source: c, target: d}
"""


def test_load_workflow_yaml_and_json_match_the_builder(tmp_path: Path) -> None:
    import yaml

    expected = diamond().to_proto()
    yaml_path = tmp_path / "etl.yaml"
    yaml_path.write_text(YAML_DEFINITION)
    assert load_workflow(yaml_path) == expected
    json_path = tmp_path / "etl.json"
    json_path.write_text(json.dumps(yaml.safe_load(YAML_DEFINITION)))
    assert load_workflow(str(json_path)) == expected
    yml_path = tmp_path / "etl.yml"
    yml_path.write_text(YAML_DEFINITION)
    assert load_workflow(yml_path) == expected


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("missing.yaml", None, "no such file"),
        ("bad.yaml", "name: etl\nnodes: [\n", "invalid YAML"),
        ("bad.json", '{"name": "etl",', "invalid JSON"),
        ("unknown.yaml", "name: etl\nnodez: []\n", 'has no field named "nodez"'),
        ("typed.yaml", "name: etl\nnodes: [{id: a, priority: high}]\n", "priority"),
        ("list.yaml", "- a\n- b\n", "must be a mapping"),
        ("empty.yaml", "", "the file is empty"),
        ("etl.toml", "name = 'etl'", "unsupported file type '.toml'"),
    ],
)
def test_load_workflow_errors(tmp_path: Path, name: str, content: str | None, problem: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DefinitionError, match=problem) as info:
        load_workflow(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message


def test_builder_carries_fault_tolerance_settings() -> None:
    wf = Workflow(
        "saga",
        execution_timeout="10m",
        default_heartbeat_timeout="20s",
        default_schedule_to_start_timeout="1m",
    )
    wf.node("alert", "notify")
    a = wf.node(
        "charge",
        "charge-card",
        compensation="refund-card",
        on_failure="alert",
        schedule_to_start_timeout="30s",
        retry_jitter=0.2,
        retries=2,
    )
    wf.node("ship", "ship", after=[a], pause_before=True)
    msg = wf.to_proto()
    assert msg.execution_timeout.seconds == 600
    assert msg.default_heartbeat_timeout.seconds == 20
    assert msg.default_schedule_to_start_timeout.seconds == 60
    charge = msg.nodes[1]
    assert (charge.compensation_task_type, charge.on_failure) == ("refund-card", "alert")
    assert charge.schedule_to_start_timeout.seconds == 30
    assert charge.retry_policy.jitter == pytest.approx(0.2)
    assert msg.nodes[2].pause_before is True
    with pytest.raises(DefinitionError, match="retry_jitter"):
        wf.node("bad", "t", retry_jitter=2)


# -- JSON Schemas ---------------------------------------------------------------------


ORDER_SCHEMA = {
    "type": "object",
    "required": ["customer"],
    "properties": {"customer": {"type": "object", "properties": {"email": {"format": "email"}}}},
}


def test_schemas_travel_in_the_definition() -> None:
    wf = Workflow("orders", input_schema=ORDER_SCHEMA)
    wf.node("price", "price", output_schema={"type": "object", "required": ["total"]})
    wf.map("each", "resize", items="input.images", output_schema={"type": "string"})
    msg = wf.to_proto()
    assert json_format.MessageToDict(msg.input_schema) == ORDER_SCHEMA
    assert json_format.MessageToDict(msg.nodes[0].output_schema) == {
        "type": "object",
        "required": ["total"],
    }
    assert json_format.MessageToDict(msg.nodes[1].output_schema) == {"type": "string"}
    plain = Workflow("plain")
    plain.node("a", "t")
    assert not plain.to_proto().HasField("input_schema")
    assert not plain.to_proto().nodes[0].HasField("output_schema")


def test_a_schema_must_be_a_mapping() -> None:
    with pytest.raises(DefinitionError, match="workflow 'w': input_schema must be a JSON Schema"):
        Workflow("w", input_schema=True)  # type: ignore[arg-type]
    wf = Workflow("w")
    with pytest.raises(DefinitionError, match="node 'a': output_schema must be a JSON Schema"):
        wf.node("a", "t", output_schema=["type"])  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="output_schema is not a JSON object"):
        wf.node("a", "t", output_schema={"const": object()})


def test_load_workflow_reads_schemas_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "orders.yaml"
    path.write_text(
        """
name: orders
input_schema:
  type: object
  required: [customer]
  properties:
    customer:
      type: object
      properties:
        email: {format: email}
nodes:
  - id: price
    task_type: price
    outputSchema:
      type: object
      required: [total]
"""
    )
    expected = Workflow("orders", input_schema=ORDER_SCHEMA)
    expected.node("price", "price", output_schema={"type": "object", "required": ["total"]})
    assert load_workflow(path) == expected.to_proto()
