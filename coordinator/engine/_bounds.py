"""Bounds on what one CEL expression may cost (pure).

The binding (``cel-expr-python``) evaluates with the GIL held, offers no runtime options
beyond a fixed budget of 10,000 comprehension iterations per evaluation, builds the list
of a ``map``/``filter`` by copying (quadratic in its length) and copies strings and lists
on every ``+``. One expression over a large input could therefore stall the coordinator
for seconds or build gigabytes before anything checked its result. So:

- at registration, ``shape_of`` reads the expression's tokens: comprehension macros
  (``map``, ``filter``, ``all``, ``exists``, ``exists_one``) may nest at most
  ``MAX_COMPREHENSION_NESTING`` deep, and it records, for each macro and each ``+``,
  which macros enclose it and how its range is built;
- before each evaluation that has a macro or a ``+``, ``check_cost`` measures the
  variables the expression names (the longest list or map, the longest string) and
  refuses when the worst case of the work (``MAX_WORK`` element steps) or of the bytes
  ``+`` may build (``MAX_BUILT_BYTES``) is over its bound;
- after evaluation, ``bounded_plain`` walks the result level by level and refuses it as
  soon as its JSON would pass the caller's byte limit, before converting it.

docs/control-flow.md ("Expression bounds") states the same bounds for users.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_COMPREHENSION_NESTING = 2
# Element steps one evaluation may take in the worst case: building a map/filter result
# of n elements costs about n*n/2 copies (measured: ~50 ns each, so ~100 ms at the bound),
# an all/exists step about 10 of those units.
MAX_WORK = 2_000_000
# Bytes the '+' operators of one evaluation may build in the worst case.
MAX_BUILT_BYTES = 32 * 1024 * 1024
MACROS = frozenset({"map", "filter", "all", "exists", "exists_one"})
_ACCUMULATING = frozenset({"map", "filter"})
_KEYWORDS = frozenset({"in", "true", "false", "null"})
_SCANS = frozenset({"==", "!=", "in"})
_LIST_ELEMENT_BYTES = 32  # what '+' copying one list element costs (measured)
_PART_ELEMENT_BYTES = 8

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|//[^\n]*)
    |(?P<raw>[bB]?[rR][bB]?(?:'''.*?'''|\"\"\".*?\"\"\"|'[^'\n]*'|"[^"\n]*"))
    |(?P<string>[bB]?(?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"
        |'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"))
    |(?P<number>\.?[0-9][0-9a-zA-Z_.]*)
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<op>[&|=!<>]=?|.)
    """,
    re.VERBOSE | re.DOTALL,
)
_OPENERS = {")": "(", "]": "[", "}": "{"}


@dataclass(frozen=True)
class Macro:
    name: str
    enclosing: tuple[int, ...]  # indexes of the macros whose bodies hold this one
    plus: int  # '+' in the expression its range comes from
    commas: int  # ',' there (elements of a list literal)

    @property
    def accumulates(self) -> bool:
        return self.name in _ACCUMULATING


@dataclass(frozen=True)
class Plus:
    enclosing: tuple[int, ...]  # indexes of the macros whose bodies hold this '+'
    whole: bool  # an operand is a variable's value itself (input.items + ...)


@dataclass(frozen=True)
class Shape:
    """What the cost of an expression depends on."""

    macros: tuple[Macro, ...]
    pluses: tuple[Plus, ...]
    # '==', '!=' and 'in' with an operand that may be a whole variable: each compares up
    # to the longest list element by element.
    scans: tuple[tuple[int, ...], ...]
    roots: frozenset[str]  # the variables it names
    nesting: int

    @property
    def costly(self) -> bool:
        return bool(self.macros or self.pluses or self.scans)


class CostError(ValueError):
    """The expression may cost more than its bound on these values."""


def shape_of(source: str, variables: tuple[str, ...]) -> Shape:
    """The shape of an expression that compiled (so its tokens are well formed)."""
    tokens: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(source):
        kind = match.lastgroup or "op"
        if kind != "space":
            tokens.append((kind, match.group()))
    opener: dict[int, int] = {}
    stack: list[tuple[int, int | None]] = []  # (token index, macro index or None)
    macros: list[Macro] = []
    pluses: list[Plus] = []
    scans: list[tuple[int, ...]] = []
    roots: set[str] = set()
    nesting = 0

    def enclosing() -> tuple[int, ...]:
        return tuple(m for _, m in stack if m is not None)

    for i, (kind, text) in enumerate(tokens):
        # Also after a '.': '.input' names the variable too (and 'x.input', a member,
        # only makes the measure larger).
        if kind == "ident" and text in variables:
            roots.add(text)
        # Outside comprehensions a comparison is one linear pass: not worth measuring for.
        if text in _SCANS and enclosing() and _whole_operand(tokens, opener, i, variables):
            scans.append(enclosing())
        if kind != "op":
            continue
        if text in "([{":
            macro: int | None = None
            if (
                text == "("
                and i >= 2
                and tokens[i - 1][0] == "ident"
                and tokens[i - 1][1] in MACROS
                and tokens[i - 2][1] == "."
            ):
                start = _target_start(tokens, opener, i - 2)
                target = [t for _, t in tokens[start : i - 2]]
                macro = len(macros)
                macros.append(
                    Macro(tokens[i - 1][1], enclosing(), target.count("+"), target.count(","))
                )
            stack.append((i, macro))
            nesting = max(nesting, len(enclosing()))
        elif text in _OPENERS and stack:
            opener[i] = stack.pop()[0]
        elif text == "+":
            pluses.append(Plus(enclosing(), _whole_operand(tokens, opener, i, variables)))
    return Shape(tuple(macros), tuple(pluses), tuple(scans), frozenset(roots), nesting)


def _whole_operand(
    tokens: list[tuple[str, str]], opener: dict[int, int], i: int, variables: tuple[str, ...]
) -> bool:
    """Whether an operand of the binary operator ``tokens[i]`` may be a variable's whole
    value: it is a variable or a chain from one, or parenthesized; one reached through an
    iteration variable (``x.price``) is an element."""
    left = tokens[_target_start(tokens, opener, i)][1] if i > 0 else ""
    right = tokens[i + 1][1] if i + 1 < len(tokens) else ""
    return bool({left, right} & {*variables, "("})


def _target_start(tokens: list[tuple[str, str]], opener: dict[int, int], dot: int) -> int:
    """Where the operand before ``tokens[dot]`` (a '.') starts: a chain of names, calls,
    indexes and member selections back to its first primary."""
    j = dot - 1
    while j >= 0:
        kind, text = tokens[j]
        if text in _OPENERS and j in opener:
            j = opener[j]
            previous = tokens[j - 1] if j > 0 else ("op", "")
            chained = previous[0] == "ident" and previous[1] not in _KEYWORDS
            if text in ")]" and (chained or previous[1] in _OPENERS):
                j -= 1  # a call or an index: the chain goes on before it
                continue
        elif kind == "op":
            return j + 1
        if j > 0 and tokens[j - 1][1] == ".":
            j -= 2
            continue
        return j
    return 0


def check_cost(shape: Shape, variables: Mapping[str, Any]) -> None:
    """Raise ``CostError`` when the worst case of evaluating on ``variables`` is over a
    bound (the longest list/map and string among the variables named)."""
    longest, widest = _measure([variables[r] for r in shape.roots if r in variables])
    ranges = [longest * (1 + m.plus) + m.commas + 1 for m in shape.macros]

    def runs(enclosing: tuple[int, ...]) -> int:
        count = 1
        for m in enclosing:
            count *= ranges[m]
        return count

    work = 0
    for macro, size in zip(shape.macros, ranges, strict=True):
        work += runs(macro.enclosing) * (size * size if macro.accumulates else 10 * size)
    work += sum(runs(enclosing) for enclosing in shape.scans) * longest
    if work > MAX_WORK:
        raise CostError(
            f"may take {work:,} steps on this input (its longest list or map has {longest:,} "
            f"elements), more than {MAX_WORK:,}; iterate over fewer elements (filter them in "
            "a task) or nest comprehensions less"
        )
    # An operand that is a variable's value may be the longest list itself; one reached
    # through an iteration variable is an element of it (estimated at 8 bytes a step).
    whole = max(widest, longest * _LIST_ELEMENT_BYTES)
    part = max(widest, longest * _PART_ELEMENT_BYTES)
    terms = len(shape.pluses) + 1
    built = sum(runs(p.enclosing) * terms * (whole if p.whole else part) for p in shape.pluses)
    if built > MAX_BUILT_BYTES:
        raise CostError(
            f"may build {built:,} bytes with '+' on this input (its longest string has "
            f"{widest:,} characters, its longest list {longest:,} elements), more than "
            f"{MAX_BUILT_BYTES:,}; concatenate less, or fewer times inside a comprehension"
        )


def _measure(values: list[Any]) -> tuple[int, int]:
    """The length of the longest list/map and of the longest string/bytes in ``values``
    (JSON-like: dicts with string keys, lists, scalars). One pass, no recursion."""
    longest = widest = 0
    stack = list(values)
    while stack:
        value = stack.pop()
        kind = type(value)
        members: Any
        if kind is dict:
            if len(value) > longest:
                longest = len(value)
            try:
                keys = max(map(len, value), default=0)  # JSON keys are strings
            except TypeError:
                keys = max(len(k) if isinstance(k, str) else 0 for k in value)
            if keys > widest:
                widest = keys
            members = value.values()
        elif kind is list or kind is tuple:
            if len(value) > longest:
                longest = len(value)
            members = value
        elif kind is str or kind is bytes:
            widest = max(widest, len(value))
            continue
        else:
            continue
        for member in members:
            member_kind = type(member)
            if member_kind is str:
                if len(member) > widest:
                    widest = len(member)
            elif member_kind is dict or member_kind is list:
                stack.append(member)
    return longest, widest


def bounded_plain(value: Any, limit: int, max_depth: int) -> Any:
    """``value`` (a CEL value) as plain Python values, or ``CostError`` as soon as its JSON
    would be longer than ``limit`` bytes (estimated from below, level by level) or nest
    deeper than ``max_depth``."""
    budget = limit
    stack = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        item = current.value()
        if isinstance(item, list | dict):
            if depth > max_depth:
                raise CostError(f"gave a result nested deeper than {max_depth} levels")
            budget -= 1 + len(item)
            members = item.values() if isinstance(item, dict) else item
            stack.extend((member, depth + 1) for member in members)
            if isinstance(item, dict):
                budget -= sum(3 + (len(k) if isinstance(k, str | bytes) else 1) for k in item)
        elif isinstance(item, str | bytes):
            budget -= 2 + len(item)
        else:
            budget -= 1
        if budget < 0:
            raise CostError(f"gave a result of more than {limit:,} bytes")
    return value.plain_value()
