"""The JSON Schemas of a definition (docs/control-flow.md, "Input and output schemas"): vetted
at registration, an execution input checked on every kind of start, a worker's output
checked when its attempt completes.

The asynchronous checks (``check``) run on the event loop when they are sure to be quick
(a document of at most ``INLINE_BYTES`` against a schema without patterns, within
``INLINE_BUDGET``), else, or when that runs out, in a worker thread, so a slow one (up to
its budget, see ``coordinator.schemas``) never holds up the loop; nothing runs at all
for a definition or node without a schema. The synchronous ones (``input_violation``)
serve the pure steps (child starts inside a transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import re

from coordinator import schemas
from coordinator.errors import InvalidArgument
from coordinator.model import COMPENSATION_SUFFIX, NULL_JSON, NodeSpec, WorkflowDef

# The error type of an attempt whose output does not match its node's output_schema, and
# of a sub-workflow node or scheduled execution whose input does not match.
OUTPUT_SCHEMA_VIOLATION = "OutputSchemaViolation"
INPUT_SCHEMA_VIOLATION = "InputSchemaViolation"

_MAP_ITEM = re.compile(r"(.+)\[\d+\]")


def check_definition_schemas(defn: WorkflowDef) -> None:
    """Raise ``InvalidArgument`` naming the workflow (and node) when a schema is not one."""
    if defn.input_schema:
        schemas.check_schema(defn.input_schema, f"workflow '{defn.name}': input_schema")
    for node in defn.nodes:
        if node.output_schema:
            schemas.check_schema(
                node.output_schema, f"workflow '{defn.name}' node '{node.id}': output_schema"
            )


# A check on the event loop itself (a child start, decided inside a transaction) gets less.
IN_LOOP_BUDGET = 0.05


def input_violation(
    defn: WorkflowDef, payload: bytes, budget: float = schemas.CHECK_BUDGET
) -> str | None:
    """Why ``payload`` does not match ``defn``'s input_schema (None: it does, or there is
    none)."""
    if not defn.input_schema:
        return None
    detail = schemas.violation(defn.input_schema, payload or NULL_JSON, budget=budget)
    return None if detail is None else _input_message(defn, detail)


def _input_message(defn: WorkflowDef, detail: str) -> str:
    return (
        f"input does not match the input_schema of workflow '{defn.name}' version "
        f"{defn.version}{detail}"
    )


INLINE_BYTES = 16 * 1024
INLINE_BUDGET = 0.02


async def check(schema: bytes, payload: bytes) -> str | None:
    """``schemas.violation`` of ``payload`` (JSON, empty: null), where it costs least."""
    document = payload or NULL_JSON
    if len(document) <= INLINE_BYTES and not schemas.has_patterns(schema):
        # A thread round trip costs more than most checks: try here first.
        with contextlib.suppress(schemas.SchemaTooSlow):
            return schemas.violation(schema, document, budget=INLINE_BUDGET, slow_raises=True)
    return await asyncio.to_thread(schemas.violation, schema, document)


async def input_refusal(defn: WorkflowDef, payload: bytes) -> str | None:
    """Why ``payload`` does not match ``defn``'s input_schema (None: it does, or there is
    none: then at no cost)."""
    if not defn.input_schema:
        return None
    detail = await check(defn.input_schema, payload)
    if detail is None:
        return None
    return _input_message(defn, detail)


async def check_input(defn: WorkflowDef, payload: bytes) -> None:
    """Raise ``InvalidArgument`` when ``payload`` does not match ``defn``'s input_schema."""
    why = await input_refusal(defn, payload)
    if why is not None:
        raise InvalidArgument(f"{why}; fix the input (GetWorkflow shows the schema)")


def schema_node(defn: WorkflowDef, node_id: str) -> NodeSpec | None:
    """The node whose output_schema a worker's result for node run ``node_id`` must match:
    the node itself, or the map node of an element ("<map>[<index>]"); None for a
    compensation run (it undoes the node, it does not produce its output) or an unknown
    id (a node added at run time carries no schema)."""
    if node_id.endswith(COMPENSATION_SUFFIX):
        return None
    spec = defn.node_map.get(node_id)
    if spec is None:
        item = _MAP_ITEM.fullmatch(node_id)
        spec = defn.node_map.get(item.group(1)) if item else None
    return spec


async def output_refusal(defn: WorkflowDef, node_id: str, payload: bytes) -> str | None:
    """Why ``payload``, a worker's output for node run ``node_id``, does not match its
    node's output_schema (None: it does, or there is none: then at no cost)."""
    spec = schema_node(defn, node_id)
    if spec is None or not spec.output_schema:
        return None
    detail = await check(spec.output_schema, payload)
    if detail is None:
        return None
    return f"output of node '{node_id}' does not match the node's output_schema{detail}"


# One batch of starts checks its inputs within this, all together (each also within its
# own budget): a batch of hostile inputs cannot cost a thousand budgets.
BATCH_BUDGET = 4 * schemas.CHECK_BUDGET


def batch_budget() -> contextlib.AbstractContextManager[None]:
    return schemas.shared_budget(BATCH_BUDGET)
