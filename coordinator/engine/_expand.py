"""Dynamic expansion: nodes and edges a task adds to its own execution (pure).

A completing task may return an ``Expansion``. It is checked like a registered definition
(the merged definition must pass ``validate_definition``), plus: new ids are new, edge
sources exist or are new, edge targets are new or existing nodes that have not started
(BLOCKED). The execution keeps the additions as a JSON document (``Execution.expansion``,
``{"nodes": [node documents], "edges": [[source, target], ...]}``, merged with earlier
ones); ``effective_definition`` gives the definition with them merged in.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from coordinator.engine._validate import Limits, validate_definition
from coordinator.errors import InvalidArgument
from coordinator.model import (
    Execution,
    NodeRun,
    NodeSpec,
    NodeStatus,
    WorkflowDef,
    node_from_document,
    node_to_document,
)


@dataclass(frozen=True)
class Expansion:
    """Nodes and edges to add to the running execution (``complete_node(expansion=...)``).

    Edges are ``(source, target)``; typically from the completing node to new nodes.
    """

    nodes: tuple[NodeSpec, ...] = ()
    edges: tuple[tuple[str, str], ...] = ()


_CACHE_SIZE = 256
_merged: OrderedDict[tuple[object, ...], WorkflowDef] = OrderedDict()


def effective_definition(defn: WorkflowDef, execution: Execution) -> WorkflowDef:
    """``defn`` with ``execution``'s expansion merged in (``defn`` itself without one).

    Cached by (definition content, expansion). Idempotent: a definition that already holds
    the expansion's nodes is returned as it is.
    """
    if not execution.expansion:
        return defn
    key = (
        defn.content_hash,
        defn.name,
        defn.version,
        defn.tenant_id,
        defn.created_at,
        execution.expansion,
    )
    hit = _merged.get(key)
    if hit is not None:
        _merged.move_to_end(key)
        return hit
    doc = json.loads(execution.expansion)
    nodes = tuple(node_from_document(n) for n in doc["nodes"])
    if nodes and nodes[0].id in defn.node_map:
        merged = defn  # already effective
    else:
        edges = tuple((s, t) for s, t in doc["edges"])
        merged = replace(defn, nodes=defn.nodes + nodes, edges=defn.edges + edges)
    _merged[key] = merged
    if len(_merged) > _CACHE_SIZE:
        _merged.popitem(last=False)
    return merged


def expand(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    expansion: Expansion,
    limits: Limits,
) -> tuple[WorkflowDef, bytes]:
    """Check ``expansion`` against the effective ``defn`` and the node runs; return the
    merged definition and the execution's new expansion document. Raises
    ``InvalidArgument`` naming the problem; nothing changes then."""
    where = f"expansion by node '{node_id}'"
    new_ids: set[str] = set()
    for spec in expansion.nodes:
        if spec.id in defn.node_map or spec.id in nodes:
            raise InvalidArgument(
                f"{where} adds node '{spec.id}', which the execution already has; "
                "choose a new node id"
            )
        if spec.id in new_ids:
            raise InvalidArgument(f"{where} adds node '{spec.id}' twice; node ids must be unique")
        new_ids.add(spec.id)
        if spec.secret_refs:
            # Secrets go only to nodes of a registered definition: a worker may not add a
            # node that would have any secret of the tenant handed to it.
            raise InvalidArgument(
                f"{where} adds node '{spec.id}' whose config references a secret "
                f"(${{secret:{spec.secret_refs[0]}}}); nodes added at run time cannot use "
                "secrets: declare the node in the registered definition"
            )
    for source, target in expansion.edges:
        edge = f"{where} edge {source} -> {target}"
        if source not in new_ids and source not in defn.node_map:
            raise InvalidArgument(
                f"{edge} starts at unknown node '{source}'; add the node or fix the edge"
            )
        if target in new_ids:
            continue
        if target not in defn.node_map:
            raise InvalidArgument(
                f"{edge} ends at unknown node '{target}'; add the node or fix the edge"
            )
        run = nodes.get(target)
        if run is None or run.status is not NodeStatus.BLOCKED:
            status = "unknown" if run is None else run.status
            raise InvalidArgument(
                f"{edge} ends at node '{target}', which has already started ({status}); "
                "an expansion can only add edges into nodes that have not started"
            )
    merged = replace(defn, nodes=defn.nodes + expansion.nodes, edges=defn.edges + expansion.edges)
    try:
        validate_definition(merged, limits)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where} is invalid: {exc}") from exc

    doc: dict[str, Any] = (
        json.loads(execution.expansion) if execution.expansion else {"nodes": [], "edges": []}
    )
    doc["nodes"].extend(node_to_document(n) for n in expansion.nodes)
    doc["edges"].extend([s, t] for s, t in expansion.edges)
    return merged, json.dumps(doc, separators=(",", ":")).encode()
