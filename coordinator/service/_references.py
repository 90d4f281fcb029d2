"""Registration-time checks of sub-workflow references: every workflow node names a
registered definition, references form no cycle, and they nest within the depth limit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from coordinator.errors import InvalidArgument, NotFound
from coordinator.model import NodeKind, WorkflowDef

# (name, version or None for the latest) -> the definition; raises NotFound.
Resolve = Callable[[str, int | None], Awaitable[WorkflowDef]]


async def check_references(defn: WorkflowDef, resolve: Resolve, max_depth: int) -> None:
    """Follow workflow references (pinned versions, else the latest) from ``defn``.

    ``defn`` runs at depth 0, a child it starts at 1, and so on; any chain deeper than
    ``max_depth`` is refused, naming the chain, as is a chain that comes back to a workflow
    already on it (recursion)."""
    heights: dict[tuple[str, int], int] = {}

    async def height(d: WorkflowDef, chain: tuple[str, ...]) -> int:
        """How many levels of children ``d`` (at the end of ``chain``) starts below it."""
        best = 0
        for node in d.nodes:
            if node.kind != NodeKind.WORKFLOW or not node.workflow_name:
                continue
            name = node.workflow_name
            path = (*chain, name)
            if name in chain:
                raise InvalidArgument(
                    f"workflow reference cycle {' -> '.join(path)}: a workflow cannot run "
                    "itself, directly or through other workflows"
                )
            try:
                child = await resolve(name, node.workflow_version or None)
            except NotFound:
                if len(chain) == 1:
                    which = f"workflow '{name}'"
                    if node.workflow_version:
                        which += f" version {node.workflow_version}"
                    raise InvalidArgument(
                        f"node '{node.id}' runs {which}, which is not registered; register it first"
                    ) from None
                continue  # a deeper definition names one since removed: nothing below
            if len(path) - 1 > max_depth:
                raise InvalidArgument(
                    f"sub-workflows nest too deep: {' -> '.join(path)} runs '{name}' at "
                    f"depth {len(path) - 1}, over the limit of {max_depth} "
                    "(TRELLIS_MAX_WORKFLOW_DEPTH)"
                )
            key = (child.name, child.version)
            below = heights.get(key)
            if below is None or len(path) - 1 + below > max_depth:
                # Not seen yet, or seen but too deep from here: walk it on this chain so a
                # refusal names the actual chain.
                below = await height(child, path)
                heights[key] = below
            best = max(best, below + 1)
        return best

    await height(defn, (defn.name,))
