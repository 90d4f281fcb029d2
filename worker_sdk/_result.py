"""``Result``: what a handler returns to steer its execution (which children run, new nodes)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

from trellis.v1 import common_pb2, worker_service_pb2
from worker_sdk._convert import encode_json
from worker_sdk._errors import DefinitionError
from worker_sdk._nodes import NODE_TYPES, Node


@dataclass(frozen=True)
class Result:
    """A handler's output plus instructions for the flow::

        @task("triage")
        async def triage(ctx, data):
            if data["amount"] > 1000:
                return Result({"route": "manual"}, next=["manual_review"])
            return Result({"route": "auto"}, next=["auto_approve"])

    ``output`` is the node's output (any JSON value), as a plain return value would be.
    ``next`` names the children of this node that run; the other children are SKIPPED
    (None: all run; it cannot be empty: to run none, give the children a ``skip_if``).
    ``add_nodes`` (``TaskNode``,
    ``SwitchNode``, ``WorkflowNode``, ``MapNode``, ``ApprovalNode``) and ``add_edges`` (``(source,
    target)`` pairs, which may start at this node or at any node not yet started) grow
    this execution; the coordinator checks them like a definition (unique ids, no
    cycle, limits, CEL) and, when it refuses them, the node fails (not retried) with
    its message. Raises DefinitionError on an obviously malformed argument.
    """

    output: Any = None
    _: KW_ONLY
    next: Sequence[str] | None = None
    add_nodes: Sequence[Node] = ()
    add_edges: Sequence[tuple[str, str]] = ()

    def __post_init__(self) -> None:
        nxt: Any = self.next
        if nxt is not None:
            names = (nxt,) if isinstance(nxt, str) else tuple(nxt)
            if not names:
                raise DefinitionError(
                    "Result.next is empty; name at least one child (None runs them all)"
                )
            for name in names:
                if not isinstance(name, str) or not name:
                    raise DefinitionError(f"Result.next must list node ids, got {name!r}")
            object.__setattr__(self, "next", names)
        nodes = tuple(self.add_nodes)
        for node in nodes:
            if not isinstance(node, NODE_TYPES):
                raise DefinitionError(
                    "Result.add_nodes takes TaskNode, SwitchNode, WorkflowNode, MapNode or "
                    f"ApprovalNode objects, got {node!r}"
                )
        object.__setattr__(self, "add_nodes", nodes)
        object.__setattr__(self, "add_edges", _edges(self.add_edges))

    def expansion(self) -> worker_service_pb2.DagExpansion | None:
        """The ``DagExpansion`` sent with CompleteTask (None when nothing is added)."""
        if not self.add_nodes and not self.add_edges:
            return None
        return worker_service_pb2.DagExpansion(
            nodes=[node.to_proto() for node in self.add_nodes],
            edges=[common_pb2.Edge(source=s, target=t) for s, t in self.add_edges],
        )


def _edges(value: Iterable[Any]) -> tuple[tuple[str, str], ...]:
    edges: list[tuple[str, str]] = []
    for edge in value:
        pair = tuple(edge) if isinstance(edge, list | tuple) else ()
        if len(pair) != 2 or not all(isinstance(end, str) and end for end in pair):
            raise DefinitionError(
                f"Result.add_edges takes (source, target) pairs of node ids, got {edge!r}"
            )
        edges.append((pair[0], pair[1]))
    return tuple(edges)


def fill_completion(request: worker_service_pb2.CompleteTaskRequest, value: Any) -> None:
    """Puts a handler's return value (a plain value or a ``Result``) into ``request``.

    Raises TypeError or ValueError when the output is not JSON.
    """
    if isinstance(value, Result):
        request.output = encode_json(value.output)
        if value.next is not None:
            request.next.extend(value.next)
        expansion = value.expansion()
        if expansion is not None:
            request.expansion.CopyFrom(expansion)
    else:
        request.output = encode_json(value)
