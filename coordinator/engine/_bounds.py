"""Bounds on what one CEL expression may cost (pure).

The binding (``cel-expr-python``) evaluates with the GIL held, offers no runtime options
beyond a fixed budget of 10,000 comprehension iterations per evaluation, builds the list
of a ``map``/``filter`` by copying (quadratic in its length) and copies strings and lists
on every ``+``. One expression over a large input could therefore stall the coordinator
for seconds or build gigabytes before anything checked its result. So:

- at registration, ``shape_of`` reads the expression's tokens: comprehension macros
  (``map``, ``filter``, ``all``, ``exists``, ``exists_one``) may nest at most
  ``MAX_COMPREHENSION_NESTING`` deep, and it records, for each macro, each ``+`` and
  each ``==``/``!=``/``in`` inside a comprehension, which macros enclose it, and what a
  macro iterates over (a member path such as ``input.items``, ``o.items`` through an
  enclosing macro's iteration variable, or the map/filter it is chained to) and what a
  comparison's operands are;
- before each evaluation that has a macro, a ``+`` or such a comparison, ``check_cost``
  measures those paths on the variables (the length of the list iterated, the elements
  of an operand), falling back to the longest list or map and the longest string among
  the variables named when a range or operand is built otherwise (and for ``+``), and
  refuses when the worst case of the work (``MAX_WORK`` element steps) or of the bytes
  ``+`` may build (``MAX_BUILT_BYTES``) is over its bound;
- after evaluation, ``bounded_plain`` walks the result level by level and refuses it as
  soon as its JSON would pass the caller's byte limit, before converting it.

docs/control-flow.md ("Expression bounds") states the same bounds for users.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_COMPREHENSION_NESTING = 2
# Element steps one evaluation may take in the worst case. Building a map/filter result
# of n elements costs about n*n steps: the binding copies the list on every iteration
# (measured 30-42 ns a step on two busy cores: 0.03 s for 1,000 elements, 0.13-0.18 s
# for 2,000, 0.25 s for 3,000, 1.9-2.6 s for 8,000), holding the GIL throughout. At
# 4,000,000 an evaluation allowed stalls the coordinator for less than ~200 ms. An
# all/exists step counts 10 (measured 250 ns), comparing one element in '=='/'in' 1.
MAX_WORK = 4_000_000
# Bytes the '+' operators of one evaluation may build in the worst case.
MAX_BUILT_BYTES = 32 * 1024 * 1024
MACROS = frozenset({"map", "filter", "all", "exists", "exists_one"})
_ACCUMULATING = frozenset({"map", "filter"})
_KEYWORDS = frozenset({"in", "true", "false", "null"})
_SCANS = frozenset({"==", "!=", "in"})
# Operators that bind tighter than '==', '!=' and 'in': an operand next to one of them is
# more than the chain it starts or ends with.
_TIGHTER = frozenset({"+", "-", "*", "/", "%"})
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
_PLAIN_STRING = re.compile(r"'[^'\\\n]*'|\"[^\"\\\n]*\"")
# Functions and macros whose result is a number or a boolean: cheap to compare.
_SCALAR_CALLS = frozenset(
    {"size", "int", "uint", "double", "bool", "has", "matches", "startsWith", "endsWith"}
    | {"contains", "all", "exists", "exists_one"}
)


@dataclass(frozen=True)
class Path:
    """A member path ``root.a['b'][0]``: ``root`` is a variable or, when ``element`` is
    set, the iteration variable of that enclosing macro."""

    root: str
    members: tuple[str | int, ...]
    element: int | None = None


@dataclass(frozen=True)
class Macro:
    name: str
    enclosing: tuple[int, ...]  # indexes of the macros whose bodies hold this one
    plus: int  # '+' in the expression its range comes from
    commas: int  # ',' there (elements of a list literal)
    # What it iterates over, when that can be read: a member path, or the result of the
    # map/filter it is chained to (the index of that macro).
    path: Path | None = None
    chained: int | None = None

    @property
    def accumulates(self) -> bool:
        return self.name in _ACCUMULATING


@dataclass(frozen=True)
class Plus:
    enclosing: tuple[int, ...]  # indexes of the macros whose bodies hold this '+'
    whole: bool  # an operand is a variable's value itself (input.items + ...)


@dataclass(frozen=True)
class Scan:
    """'==', '!=' or 'in' inside a comprehension with an operand that is a variable's
    value or a part of it: each evaluation may compare all of that operand's elements.
    ``paths``: the operands that are member paths from a variable (measured on them);
    ``unknown``: an operand built otherwise from a variable (measured as the longest list
    or map named)."""

    enclosing: tuple[int, ...]
    paths: tuple[Path, ...]
    unknown: bool


@dataclass(frozen=True)
class Shape:
    """What the cost of an expression depends on."""

    macros: tuple[Macro, ...]
    pluses: tuple[Plus, ...]
    scans: tuple[Scan, ...]
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
    opener, closer = _brackets(tokens)
    stack: list[tuple[int, int | None]] = []  # (token index, macro index or None)
    macros: list[Macro] = []
    bound: list[str] = []  # each macro's iteration variable
    at: dict[int, int] = {}  # the token index of a macro's '(' -> the macro
    pluses: list[Plus] = []
    scans: list[Scan] = []
    roots: set[str] = set()
    nesting = 0

    def enclosing() -> tuple[int, ...]:
        return tuple(m for _, m in stack if m is not None)

    def path(begin: int, end: int) -> Path | None:
        scope = [(m, bound[m]) for m in enclosing()]
        return _path(tokens, begin, end, variables, scope)

    for i, (kind, text) in enumerate(tokens):
        # Also after a '.': '.input' names the variable too (and 'x.input', a member,
        # only makes the measure larger).
        if kind == "ident" and text in variables:
            roots.add(text)
        # Outside comprehensions a comparison is one linear pass: not worth measuring for.
        if text in _SCANS and enclosing():
            scan = _scan(tokens, opener, closer, i, variables, path)
            if scan is not None:
                scans.append(Scan(enclosing(), *scan))
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
                # 'input.items.filter(...).map(...)': the map iterates over what the
                # filter gave, at most the filter's range.
                chained = at.get(opener.get(i - 3, -1))
                if chained is not None and not macros[chained].accumulates:
                    chained = None
                macro = len(macros)
                macros.append(
                    Macro(
                        tokens[i - 1][1],
                        enclosing(),
                        target.count("+"),
                        target.count(","),
                        path(start, i - 2),
                        chained,
                    )
                )
                at[i] = macro
                named = tokens[i + 1] if i + 1 < len(tokens) else ("op", "")
                bound.append(named[1] if named[0] == "ident" else "")
            stack.append((i, macro))
            nesting = max(nesting, len(enclosing()))
        elif text in _OPENERS and stack:
            stack.pop()
        elif text == "+":
            pluses.append(Plus(enclosing(), _whole_operand(tokens, opener, i, variables)))
    return Shape(tuple(macros), tuple(pluses), tuple(scans), frozenset(roots), nesting)


def _brackets(tokens: list[tuple[str, str]]) -> tuple[dict[int, int], dict[int, int]]:
    """Matching brackets: the closing token's index -> the opening one's, and back."""
    opener: dict[int, int] = {}
    stack: list[int] = []
    for i, (kind, text) in enumerate(tokens):
        if kind != "op":
            continue
        if text in "([{":
            stack.append(i)
        elif text in _OPENERS and stack:
            opener[i] = stack.pop()
    return opener, {o: c for c, o in opener.items()}


def _path(
    tokens: list[tuple[str, str]],
    begin: int,
    end: int,
    variables: tuple[str, ...],
    scope: list[tuple[int, str]],
) -> Path | None:
    """``tokens[begin:end]`` as a member path (``input.a['b'][0]``, ``.input.a``, or
    ``x.a`` for the iteration variable ``x`` of a macro in ``scope``), or None."""
    j = begin
    rooted = j < end and tokens[j][1] == "."
    if rooted:
        j += 1
    if j >= end or tokens[j][0] != "ident":
        return None
    root = tokens[j][1]
    element = None
    if not rooted:
        # The innermost comprehension's variable hides an outer one's and a variable.
        for macro, name in reversed(scope):
            if name == root:
                element = macro
                break
    if element is None and root not in variables:
        return None
    members: list[str | int] = []
    j += 1
    while j < end:
        text = tokens[j][1]
        if text == "." and j + 1 < end and tokens[j + 1][0] == "ident":
            members.append(tokens[j + 1][1])
            j += 2
        elif text == "[" and j + 2 < end and tokens[j + 2][1] == "]":
            key_kind, key = tokens[j + 1]
            if key_kind == "string" and _PLAIN_STRING.fullmatch(key):
                members.append(key[1:-1])
            elif key_kind == "number" and key.isdigit():
                members.append(int(key))
            else:
                return None
            j += 3
        else:
            return None
    return Path(root, tuple(members), element)


def _scan(
    tokens: list[tuple[str, str]],
    opener: dict[int, int],
    closer: dict[int, int],
    i: int,
    variables: tuple[str, ...],
    path: Callable[[int, int], Path | None],
) -> tuple[tuple[Path, ...], bool] | None:
    """What the comparison ``tokens[i]`` may scan: the member paths from a variable among
    its operands, and whether an operand is built otherwise from a variable. None when it
    compares only elements and literals (``x.sku == 'a'``)."""
    left = _target_start(tokens, opener, i) if i > 0 else i
    right = _operand_end(tokens, closer, i + 1)
    paths: list[Path] = []
    unknown = False
    for begin, end, side in ((left, i, -1), (i + 1, right, 1)):
        # An arithmetic operand ('x.a + input.b == ...') spans the chains it joins.
        first, last = begin, end
        while side < 0 and first > 0 and tokens[first - 1][1] in _TIGHTER:
            before = _target_start(tokens, opener, first - 1)
            if before >= first - 1:
                break
            first = before
        while side > 0 and last < len(tokens) and tokens[last][1] in _TIGHTER:
            last = _operand_end(tokens, closer, last + 1)
        found = path(begin, end) if begin < end else None
        plain = (first, last) == (begin, end)
        if plain and found is not None:
            if found.element is None:
                paths.append(found)
        elif plain and _scalar_call(tokens, opener, begin, end):
            continue  # size(input.items), input.doc.startsWith('a') ...
        elif any(k == "ident" and t in variables for k, t in tokens[first:last]):
            unknown = True  # a variable in an arithmetic, parenthesized, called on ...
    if not paths and not unknown:
        return None
    return tuple(paths), unknown


def _scalar_call(
    tokens: list[tuple[str, str]], opener: dict[int, int], begin: int, end: int
) -> bool:
    """Whether ``tokens[begin:end]`` is a call that gives a number or a boolean."""
    if tokens[end - 1][1] != ")" or end - 1 not in opener:
        return False
    call = opener[end - 1]
    if call == begin + 1:
        return tokens[begin][1] in _SCALAR_CALLS  # size(input.items)
    return call >= 2 and tokens[call - 1][1] in _SCALAR_CALLS and tokens[call - 2][1] == "."


def _operand_end(tokens: list[tuple[str, str]], closer: dict[int, int], j: int) -> int:
    """Where the chain of names, calls, indexes and member selections that starts at
    ``tokens[j]`` ends (exclusive)."""
    if j < len(tokens) and tokens[j][1] == ".":
        j += 1
    if j >= len(tokens):
        return j
    if tokens[j][0] == "op" and tokens[j][1] in "([{" and j in closer:
        j = closer[j] + 1
    else:
        j += 1
    while j < len(tokens):
        kind, text = tokens[j]
        if text == "." and j + 1 < len(tokens):
            j += 2
        elif kind == "op" and text in "([" and j in closer:
            j = closer[j] + 1
        else:
            break
    return j


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


_MISSING = object()


def _resolve(value: Any, members: tuple[str | int, ...]) -> Any:
    """The value at ``members`` in ``value``, or ``_MISSING`` (evaluation fails there)."""
    for member in members:
        if isinstance(value, Mapping) and type(member) is str:
            value = value.get(member, _MISSING)
        elif isinstance(value, list | tuple) and type(member) is int and member < len(value):
            value = value[member]
        else:
            return _MISSING
    return value


def _length(value: Any) -> int:
    """How many iterations a comprehension over ``value`` takes (0: it fails at once)."""
    return len(value) if isinstance(value, Mapping | list | tuple) else 0


def _elements(value: Any, limit: int) -> int:
    """How many values ``value`` holds, nested ones included (1 for a scalar); counting
    stops past ``limit``."""
    count = 0
    stack = [value]
    while stack and count <= limit:
        current = stack.pop()
        count += 1
        kind = type(current)
        if kind is dict:
            stack.extend(current.values())
        elif kind is list or kind is tuple:
            stack.extend(current)
    return count


def check_cost(shape: Shape, variables: Mapping[str, Any]) -> None:
    """Raise ``CostError`` when the worst case of evaluating on ``variables`` is over a
    bound. A comprehension's range and a comparison's operands are measured on the member
    path they are (``input.items``) when they are one; otherwise, and for '+', by the
    longest list/map and string among the variables named."""
    measured: list[tuple[int, int]] = []

    def longest_widest() -> tuple[int, int]:
        if not measured:
            measured.append(_measure([variables[r] for r in shape.roots if r in variables]))
        return measured[0]

    ranges: list[int] = []  # the most elements each macro iterates over, per run
    values: list[Any] = []  # each macro's range, when it is a path from a variable
    # The work of a macro whose range is read through the iteration variable of the
    # macro enclosing it (o.items in input.o.map(o, o.items.map(...))): per element.
    exact: dict[int, int] = {}
    for index, macro in enumerate(shape.macros):
        value: Any = _MISSING
        path = macro.path
        outer = path.element if path is not None else None
        if macro.chained is not None:
            size = ranges[macro.chained]
        elif path is not None and outer is None:
            value = _resolve(variables.get(path.root, _MISSING), path.members)
            size = _length(value)
        elif (
            path is not None
            and outer is not None
            and macro.enclosing[-1:] == (outer,)
            and values[outer] is not _MISSING
        ):
            # A comprehension over a map binds its keys (strings: nothing to iterate).
            elements = [] if isinstance(values[outer], Mapping) else values[outer]
            lengths = [_length(_resolve(e, path.members)) for e in elements]
            size = max(lengths, default=0)
            runs = _runs(ranges, macro.enclosing[:-1])
            exact[index] = runs * sum(_steps(macro, n) for n in lengths)
        else:
            size = longest_widest()[0] * (1 + macro.plus) + macro.commas + 1
        ranges.append(size)
        values.append(value)

    work = 0
    for index, (macro, size) in enumerate(zip(shape.macros, ranges, strict=True)):
        if index in exact:
            work += exact[index]
        else:
            work += _runs(ranges, macro.enclosing) * _steps(macro, size)
    for scan in shape.scans:
        runs = _runs(ranges, scan.enclosing)
        if not runs:
            continue
        # Counting the operands' elements only as far as would pass the bound.
        limit = MAX_WORK // runs + 1
        weight = max(
            (
                _elements(_resolve(variables.get(p.root, _MISSING), p.members), limit)
                for p in scan.paths
            ),
            default=0,
        )
        if scan.unknown:
            weight = max(weight, longest_widest()[0])
        work += runs * weight
    if work > MAX_WORK:
        raise CostError(
            f"may take {work:,} steps on this input (its comprehensions iterate over up to "
            f"{max(ranges, default=0):,} elements), more than {MAX_WORK:,}; iterate over "
            "fewer elements (filter them in a task) or nest comprehensions less"
        )
    if not shape.pluses:
        return
    # An operand that is a variable's value may be the longest list itself; one reached
    # through an iteration variable is an element of it (estimated at 8 bytes a step).
    longest, widest = longest_widest()
    whole = max(widest, longest * _LIST_ELEMENT_BYTES)
    part = max(widest, longest * _PART_ELEMENT_BYTES)
    terms = len(shape.pluses) + 1
    built = sum(
        _runs(ranges, p.enclosing) * terms * (whole if p.whole else part) for p in shape.pluses
    )
    if built > MAX_BUILT_BYTES:
        raise CostError(
            f"may build {built:,} bytes with '+' on this input (its longest string has "
            f"{widest:,} characters, its longest list {longest:,} elements), more than "
            f"{MAX_BUILT_BYTES:,}; concatenate less, or fewer times inside a comprehension"
        )


def _runs(ranges: list[int], enclosing: tuple[int, ...]) -> int:
    """How many times a body nested in the macros ``enclosing`` runs, at most."""
    count = 1
    for m in enclosing:
        count *= ranges[m]
    return count


def _steps(macro: Macro, size: int) -> int:
    return size * size if macro.accumulates else 10 * size


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
