"""CEL expressions: compiled and type-checked once, evaluated over JSON-like values.

Uses ``cel-expr-python``, the binding of the reference C++ implementation. Every variable
is declared ``dyn`` (payloads are schemaless JSON), so registration catches syntax errors,
unknown names and ill-typed operations on literals (``1 + 'a'``); an expression that must
give a boolean and can be seen not to (``input.x + 1``) is refused too.

Evaluation errors (a missing key, division by zero, a non-boolean condition) raise
``ExpressionError`` with the expression and the reason; callers decide what that means
(a node fails, a webhook answers 400 ...).

Every evaluation is bounded (``_bounds``): comprehensions nest at most two deep, the
worst-case work and the bytes ``+`` may build are checked against the input before
evaluating, and the result is refused as soon as its JSON would pass the result limit
(the payload limit, ``set_result_limit``) before it is converted.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any

from cel_expr_python import cel

from coordinator.engine._bounds import (
    MAX_COMPREHENSION_NESTING,
    CostError,
    Shape,
    bounded_plain,
    check_cost,
    shape_of,
)
from coordinator.engine._json import MAX_JSON_DEPTH
from coordinator.errors import InvalidArgument, TrellisError

# The variables node expressions see (DESIGN §3, docs/control-flow.md).
NODE_VARIABLES: tuple[str, ...] = ("input", "parents", "execution")
# output_expr also sees the node's result.
OUTPUT_VARIABLES: tuple[str, ...] = (*NODE_VARIABLES, "output")
# Dispatch-limit keys (rate_key, concurrency_key) see the node input only.
LIMIT_VARIABLES: tuple[str, ...] = ("input",)
MAX_EXPRESSION_LENGTH = 4096
# The binding stops an evaluation after this many comprehension iterations (not settable).
ITERATION_BUDGET = 10_000
_DEFAULT_RESULT_LIMIT = 1024 * 1024
_result_limit = [_DEFAULT_RESULT_LIMIT]


def set_result_limit(max_bytes: int) -> None:
    """The largest expression result (as JSON) the coordinator accepts: its payload limit.
    The service sets it once from its settings; results are refused past it."""
    _result_limit[0] = max_bytes


def result_limit() -> int:
    return _result_limit[0]


class ExpressionError(TrellisError):
    """A compiled expression could not be evaluated on the given values."""


@cache
def _env(variables: tuple[str, ...]) -> cel.Env:
    return cel.NewEnv(variables=dict.fromkeys(variables, cel.Type.DYN))


@dataclass(frozen=True)
class Expression:
    """A compiled CEL expression. ``where`` names it in error messages."""

    source: str
    where: str
    boolean: bool
    _compiled: Any = field(repr=False, compare=False)
    shape: Shape | None = field(default=None, repr=False, compare=False)

    def evaluate(self, variables: Mapping[str, Any], *, max_bytes: int | None = None) -> Any:
        """Evaluate with ``variables`` (JSON-like values); returns plain Python values.

        Refused (``ExpressionError``) when the evaluation may cost more than its bounds on
        these values, or when the result's JSON is longer than ``max_bytes`` (default: the
        result limit)."""
        limit = result_limit() if max_bytes is None else max_bytes
        if self.shape is not None and self.shape.costly:
            try:
                check_cost(self.shape, variables)
            except CostError as exc:
                raise ExpressionError(f"{self.where} ({self.source!r}) {exc}") from None
        try:
            value = self._compiled.eval(data=dict(variables))
        except Exception as exc:  # the binding raises RuntimeError with CEL's status text
            if "Iteration budget exceeded" in str(exc):
                raise ExpressionError(
                    f"{self.where} ({self.source!r}) took more than {ITERATION_BUDGET:,} "
                    "comprehension steps; iterate over fewer elements"
                ) from None
            raise ExpressionError(f"{self.where} ({self.source!r}) failed: {exc}") from exc
        if value.type() == cel.Type.ERROR:
            raise ExpressionError(f"{self.where} ({self.source!r}) failed: {value.value()}")
        try:
            plain = bounded_plain(value, limit, MAX_JSON_DEPTH)
        except CostError as exc:
            raise ExpressionError(
                f"{self.where} ({self.source!r}) {exc}: results must fit the payload limit "
                "(TRELLIS_MAX_PAYLOAD_BYTES) and the JSON bounds; select less data"
            ) from None
        result = _plain(plain)
        if self.boolean and not isinstance(result, bool):
            raise ExpressionError(
                f"{self.where} ({self.source!r}) gave {type(result).__name__} "
                f"{_short(result)}, not a boolean"
            )
        return result

    def evaluate_json(self, variables: Mapping[str, Any], *, max_bytes: int | None = None) -> bytes:
        """Evaluate and serialize the result as JSON bytes (for inputs and outputs), at
        most ``max_bytes`` long (default: the result limit)."""
        limit = result_limit() if max_bytes is None else max_bytes
        result = self.evaluate(variables, max_bytes=limit)
        try:
            payload = json.dumps(result, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise ExpressionError(
                f"{self.where} ({self.source!r}) gave a value that is not JSON: {exc}"
            ) from exc
        if len(payload) > limit:
            raise ExpressionError(
                f"{self.where} ({self.source!r}) gave a result of {len(payload):,} bytes, more "
                f"than {limit:,}, the limit (TRELLIS_MAX_PAYLOAD_BYTES); select less data"
            )
        return payload


def compile_expression(
    source: str,
    *,
    where: str,
    variables: Sequence[str] = NODE_VARIABLES,
    boolean: bool = False,
) -> Expression:
    """Compile and type-check ``source``; raise ``InvalidArgument`` naming ``where``.

    ``boolean`` requires a result that can be a boolean (``bool`` or ``dyn``).
    """
    if not source.strip():
        raise InvalidArgument(f"{where} is empty; write a CEL expression or leave it unset")
    if len(source) > MAX_EXPRESSION_LENGTH:
        raise InvalidArgument(
            f"{where} is {len(source)} characters, more than {MAX_EXPRESSION_LENGTH}"
        )
    compiled, shape, problem = _compile(source, tuple(sorted(variables)), boolean)
    if problem:
        raise InvalidArgument(f"{where} {problem}")
    return Expression(source=source, where=where, boolean=boolean, _compiled=compiled, shape=shape)


@lru_cache(maxsize=4096)
def _compile(
    source: str, variables: tuple[str, ...], boolean: bool
) -> tuple[Any, Shape | None, str]:
    """Compile and type-check once per (source, variables, boolean): the engine re-gets its
    expressions at run time from here instead of keeping them around.

    Returns ``(compiled, shape, "")`` or ``(None, None, why it is refused)``, so that
    failures are cached too; the caller names the expression (``where``) in its message.
    """
    try:
        compiled = _env(variables).compile(source)
    except Exception as exc:  # the binding raises plain exceptions with CEL's status text
        names = ", ".join(variables)
        why = f"is not a valid CEL expression: {_first_line(exc)}"
        return None, None, f"{why} (the expression may use: {names})"
    if boolean:
        result_type = compiled.return_type()
        if result_type != cel.Type.BOOL and result_type != cel.Type.DYN:
            return (
                None,
                None,
                (
                    f"({source!r}) gives {result_type}, not a boolean; "
                    "write a condition such as input.amount > 100"
                ),
            )
    shape = shape_of(source, variables)
    if shape.nesting > MAX_COMPREHENSION_NESTING:
        return (
            None,
            None,
            (
                f"({source!r}) nests comprehensions (map, filter, all, exists, exists_one) "
                f"{shape.nesting} deep, more than {MAX_COMPREHENSION_NESTING}: each level "
                "multiplies the work by the size of the data; restructure the data or the "
                "expression (docs/control-flow.md, Expression bounds)"
            ),
        )
    return compiled, shape, ""


def _plain(value: Any) -> Any:
    """CEL results as JSON-like values (bytes, durations and timestamps as strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return f"{value.total_seconds():g}s"
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).removeprefix("INVALID_ARGUMENT: ")
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
