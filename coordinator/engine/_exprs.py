"""Evaluating a node's CEL expressions at run time (pure).

Expressions were compiled and type-checked when the definition was registered; here they
are fetched again from the compile cache and evaluated. Payloads are parsed only when an
expression needs them, each at most once per step, so nodes without expressions stay on
the parse-free path of ``model.compose_object``.

Variables (docs/control-flow.md): ``input`` (the node's input: the default data passing
for ``input_expr``, the result of ``input_expr`` for the other expressions when it is
set), ``parents`` (parent id -> parsed output), ``execution`` (``id``, ``workflow_name``,
``workflow_version``, ``input``, ``start_time`` in ISO 8601, ``depth``) and, for
``output_expr``, ``output`` (the node's result).
"""

from __future__ import annotations

import json
from typing import Any

from coordinator.engine._cel import (
    NODE_VARIABLES,
    OUTPUT_VARIABLES,
    Expression,
    ExpressionError,
    compile_expression,
)
from coordinator.engine._common import Step, compose
from coordinator.errors import InvalidArgument
from coordinator.model import NULL_JSON, NodeSpec

_UNSET: Any = object()


def expression(
    source: str, where: str, *, boolean: bool = False, output: bool = False
) -> Expression:
    """The compiled expression (cached since registration compiled it)."""
    try:
        return compile_expression(
            source,
            where=where,
            variables=OUTPUT_VARIABLES if output else NODE_VARIABLES,
            boolean=boolean,
        )
    except InvalidArgument as exc:  # only if a definition bypassed validation
        raise ExpressionError(str(exc)) from exc


def parse(step: Step, key: str, payload: bytes | None) -> Any:
    """``payload`` parsed (``None`` for no payload), cached in the step under ``key``."""
    if payload is None:
        return None
    hit = step.parsed.get(key)
    if hit is not None and hit[0] is payload:
        return hit[1]
    try:
        value = json.loads(payload)
    except ValueError as exc:
        raise ExpressionError(f"payload of {key} is not valid JSON: {exc}") from exc
    step.parsed[key] = (payload, value)
    return value


class NodeVars:
    """The variables of one node's expressions, built on first use."""

    def __init__(self, step: Step, spec: NodeSpec) -> None:
        self.step = step
        self.spec = spec
        self.where = f"node '{spec.id}'"
        self._input: Any = _UNSET
        self._parents: dict[str, Any] | None = None

    # -- the variables ------------------------------------------------------------------

    def parents(self) -> dict[str, Any]:
        if self._parents is None:
            step = self.step
            self._parents = {
                p: parse(step, p, step.get(p).output or NULL_JSON)
                for p in step.defn.parents.get(self.spec.id, ())
            }
        return self._parents

    def execution(self) -> dict[str, Any]:
        e = self.step.execution
        start = e.start_at or e.created_at
        return {
            "id": e.id,
            "workflow_name": e.workflow_name,
            "workflow_version": e.workflow_version,
            "input": parse(self.step, "<execution input>", e.input or NULL_JSON),
            "start_time": start.isoformat(),
            "depth": e.depth,
        }

    def default_input(self) -> bytes:
        """The input of default data passing: the execution's input for an entry node, a
        single parent's output, or ``{parent: output, ...}`` in edge order."""
        parents = self.step.defn.parents.get(self.spec.id, ())
        if not parents:
            return self.step.execution.input or NULL_JSON
        return compose(parents, self.step)

    def _default_input_value(self) -> Any:
        parents = self.step.defn.parents.get(self.spec.id, ())
        if not parents:
            return self.execution()["input"]
        values = self.parents()
        return values[parents[0]] if len(parents) == 1 else values

    def set_input(self, payload: bytes) -> None:
        """Use ``payload`` (the node's actual input) as ``input`` from now on, parsed lazily."""
        self._input = payload

    def input(self) -> Any:
        if self._input is _UNSET:
            self._input = self._default_input_value()
        elif isinstance(self._input, bytes):
            self._input = parse(self.step, f"input of {self.spec.id}", self._input)
        return self._input

    def variables(self, **extra: Any) -> dict[str, Any]:
        return {
            "input": self.input(),
            "parents": self.parents(),
            "execution": self.execution(),
            **extra,
        }

    # -- the node's expressions -----------------------------------------------------------

    def node_input(self) -> bytes:
        """The node's input: ``input_expr``'s result as JSON, else the default input."""
        default = self.default_input()
        if not self.spec.input_expr:
            self._input = default
            return default
        expr = expression(self.spec.input_expr, f"{self.where} input_expr")
        payload = expr.evaluate_json(self.variables())
        self._input = payload
        return payload

    def skip(self) -> bool:
        if not self.spec.skip_if:
            return False
        expr = expression(self.spec.skip_if, f"{self.where} skip_if", boolean=True)
        return bool(expr.evaluate(self.variables()))

    def output(self, result: bytes) -> bytes:
        """The node's output: ``output_expr`` over ``result``, or ``result`` itself."""
        if not self.spec.output_expr:
            return result
        expr = expression(self.spec.output_expr, f"{self.where} output_expr", output=True)
        value = parse(self.step, f"result of {self.spec.id}", result)
        return expr.evaluate_json(self.variables(output=value))

    def items(self) -> list[Any]:
        expr = expression(self.spec.items_expr, f"{self.where} items_expr")
        value = expr.evaluate(self.variables())
        if not isinstance(value, list):
            raise ExpressionError(
                f"{self.where} items_expr ({self.spec.items_expr!r}) gave "
                f"{type(value).__name__}, not a list; a map node fans out over a list"
            )
        return value

    def switch_targets(self) -> list[str]:
        """The targets of the first matching case (every matching case with
        ``match_all``), else the default targets; each target once, in order."""
        taken: list[str] = []
        variables: dict[str, Any] | None = None
        for number, case in enumerate(self.spec.cases, 1):
            where = f"{self.where} case {number} condition"
            expr = expression(case.condition, where, boolean=True)
            if variables is None:
                variables = self.variables()
            if expr.evaluate(variables):
                taken.extend(t for t in case.targets if t not in taken)
                if not self.spec.match_all:
                    break
        if not taken:
            taken = list(dict.fromkeys(self.spec.default_targets))
        return taken
