"""Bounds on CEL expressions: nesting at registration, cost before evaluating, result size
and depth after (coordinator/engine/_bounds.py, _cel.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from coordinator.engine import (
    MAX_JSON_DEPTH,
    ExpressionError,
    compile_expression,
    result_limit,
    set_result_limit,
)
from coordinator.engine._bounds import MAX_COMPREHENSION_NESTING, MAX_WORK, shape_of
from coordinator.errors import InvalidArgument

WHERE = "node 'a' input"
VARIABLES = ("execution", "input", "parents")


@pytest.fixture(autouse=True)
def default_limit() -> Iterator[None]:
    before = result_limit()
    set_result_limit(1024 * 1024)
    yield
    set_result_limit(before)


def evaluate(source: str, data: Any, **kw: Any) -> bytes:
    expr = compile_expression(source, where=WHERE)
    return expr.evaluate_json({"input": data, "parents": {}, "execution": {}}, **kw)


def refused(source: str, data: Any, **kw: Any) -> str:
    with pytest.raises(ExpressionError) as info:
        evaluate(source, data, **kw)
    message = str(info.value)
    assert message.startswith(f"{WHERE} ({source!r})"), message  # names node and field
    return message


# -- shape ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "nesting", "macros"),
    [
        ("input.x", 0, 0),
        ("input.items.map(x, x * 2)", 1, 1),
        ("input.items.map(x, x).filter(y, y > 1).map(z, z)", 1, 3),  # chained, not nested
        ("input.o.map(o, o.items.map(i, i.price))", 2, 2),
        ("input.a.all(x, input.b.exists(y, input.c.map(z, z).size() > 0))", 3, 3),
        ("'.map(a, b.map(c, d.map(e, 1)))' + input.s", 0, 0),  # inside a string
        ("r'\\' + input.s.map(x, x).size() // .map(a, .map(b, .map(c,", 1, 1),
        ("input.m.exists_one(k, has(input.x))", 1, 1),
    ],
)
def test_shape_counts_macros_and_their_nesting(source: str, nesting: int, macros: int) -> None:
    shape = shape_of(source, VARIABLES)
    assert shape.nesting == nesting
    assert len(shape.macros) == macros
    assert shape.roots <= {"input"}


def test_shape_reads_how_a_range_is_built() -> None:
    (plain,) = shape_of("input.items.map(x, x + 1)", VARIABLES).macros
    assert (plain.plus, plain.commas) == (0, 0)  # the '+' is in the body, not the range
    (built,) = shape_of("(input.a + input.a + input.b).map(x, x)", VARIABLES).macros
    assert built.plus == 2
    (literal,) = shape_of("[1, 2, 3].exists(x, x == input.v)", VARIABLES).macros
    assert literal.commas == 2
    (called,) = shape_of("dyn(input.a + input.b).map(x, x)", VARIABLES).macros
    assert called.plus == 1 and called.path is None
    # The member path it iterates over, when it is one.
    (member,) = shape_of("input.a.b[2].map(x, x)", VARIABLES).macros
    assert member.path is not None and member.path.root == "input"
    assert (member.path.members, member.path.element) == (("a", "b", 2), None)
    _, inner = shape_of("input.o.map(o, o.items.map(i, i))", VARIABLES).macros
    assert inner.path is not None and (inner.path.root, inner.path.element) == ("o", 0)
    _, then = shape_of("input.a.filter(x, x > 1).map(y, y)", VARIABLES).macros
    assert then.chained == 0 and then.path is None
    # An iteration variable hides a variable of the same name.
    _, hidden = shape_of("input.a.map(input, input.map(y, y))", VARIABLES).macros
    assert hidden.path is not None and hidden.path.element == 0


def test_registration_refuses_comprehensions_nested_too_deep() -> None:
    source = "input.a.map(x, input.a.map(y, input.a.map(z, z)))"
    with pytest.raises(InvalidArgument) as info:
        compile_expression(source, where=WHERE)
    message = str(info.value)
    assert message.startswith(WHERE)
    assert f"3 deep, more than {MAX_COMPREHENSION_NESTING}" in message
    compile_expression("input.a.map(x, input.a.map(y, y))", where=WHERE)  # two is fine


# -- cost before evaluating ----------------------------------------------------------------


def test_a_map_over_a_long_list_is_refused_before_evaluating() -> None:
    message = refused("input.map(x, x)", list(range(9999)))
    assert "may take" in message and f"more than {MAX_WORK:,}" in message
    assert "9,999 elements" in message
    # The root-scope spelling names the same variable.
    assert "may take" in refused(".input.map(x, x)", list(range(9999)))


def test_ordinary_comprehensions_run() -> None:
    assert json.loads(evaluate("input.map(x, x * 2)", list(range(1000))))[-1] == 1998
    prices = [{"price": i} for i in range(1000)]
    assert json.loads(evaluate("input.map(x, x.price + 1)", prices))[0] == 1
    # Non-accumulating macros cost one step per element.
    assert evaluate("input.all(x, x >= 0)", list(range(9000))) == b"true"
    orders = {"o": [{"items": [{"price": p} for p in range(5)]} for _ in range(100)]}
    assert len(json.loads(evaluate("input.o.map(o, o.items.map(i, i.price))", orders))) == 100


def test_concatenating_large_values_in_a_comprehension_is_refused() -> None:
    data = {"items": list(range(200)), "doc": "x" * 1_000_000}
    message = refused("input.items.map(x, input.doc + 'a')", data)
    assert "may build" in message and "with '+'" in message
    assert json.loads(evaluate("input.doc + input.doc", {"doc": "ab"})) == "abab"
    # Copying a whole list on every iteration (seconds and hundreds of MB in the runtime).
    message = refused("input.map(x, input + [x]).size()", list(range(1000)))
    assert "may build" in message
    (plus,) = shape_of("input.map(x, input + [x])", VARIABLES).pluses
    assert plus.whole and plus.enclosing == (0,)
    (plus,) = shape_of("input.map(x, x.price + 1)", VARIABLES).pluses
    assert not plus.whole


def test_comparing_whole_lists_in_a_comprehension_counts_as_work() -> None:
    # ~4.5 s in the runtime over 10,000 elements: each step compares the whole list.
    assert "may take" in refused("input.all(x, input == input)", list(range(5000)))
    assert "may take" in refused("input.all(x, x in input)", list(range(5000)))
    assert evaluate("input.all(x, x == x)", list(range(5000))) == b"true"
    (scan,) = shape_of("input.all(x, x in input)", VARIABLES).scans
    assert scan.enclosing == (0,) and not scan.unknown
    assert not shape_of("input.all(x, x.a == 1)", VARIABLES).scans
    assert not shape_of("input.status == 'paid'", VARIABLES).costly  # no measuring


def test_a_range_is_measured_on_the_path_iterated_not_the_whole_variable() -> None:
    # An unrelated long list elsewhere in the variable does not count.
    data = {"tags": ["a", "b"], "items": list(range(1500))}
    assert json.loads(evaluate("input.tags.map(t, t)", data)) == ["a", "b"]
    groups = {"groups": [list(range(3000)), ["a"]]}
    assert json.loads(evaluate("input.groups[1].filter(t, t == 'a')", groups)) == ["a"]
    assert "3,000 elements" in refused("input.groups[0].map(t, t)", groups)
    assert json.loads(evaluate(".input.tags.map(t, t)", data)) == ["a", "b"]
    # A chained macro iterates over what the one before it gave (at most its range).
    assert json.loads(evaluate("input.tags.filter(t, t == 'b').map(t, t)", data)) == ["b"]
    # A nested range reached through an iteration variable: each element's own list.
    orders = {"o": [{"items": [1, 2]}] * 40, "big": list(range(5000))}
    assert len(json.loads(evaluate("input.o.map(o, o.items.map(i, i))", orders))) == 40
    # ... but the path iterated is still measured: the long list itself is refused.
    assert "5,000 elements" in refused("input.big.map(t, t)", data | {"big": list(range(5000))})
    # Not a plain path: the longest list among the variables named, as before.
    assert "may take" in refused("(input.tags + input.tags).map(t, t)", data | orders)


def test_a_comparison_is_weighted_by_the_operands_it_names() -> None:
    data = {"sku": "s-7", "items": [{"sku": f"s-{i}"} for i in range(1500)]}
    assert evaluate("input.items.exists(x, x.sku == input.sku)", data) == b"true"
    assert evaluate("input.items.exists_one(x, input.sku in [x.sku])", data) == b"true"
    # A whole list on one side still counts (see the test above).
    assert "may take" in refused(
        "input.items.all(x, x in input.items)", data | {"items": list(range(5000))}
    )


def test_map_and_filter_run_over_a_few_thousand_elements() -> None:
    # The bound allows what the binding does in about 0.2 s: 2,000 elements, not 4,000.
    items = [{"sku": f"s-{i}", "qty": i} for i in range(2000)]
    assert len(json.loads(evaluate("input.map(x, x.qty)", items))) == 2000
    assert len(json.loads(evaluate("input.filter(x, x.qty % 2 == 0)", items))) == 1000
    assert "may take" in refused("input.map(x, x)", list(range(4000)))


def test_the_binding_iteration_budget_is_a_clear_error() -> None:
    message = refused("input.map(x, input.map(y, 1))", list(range(101)))
    assert "more than 10,000 comprehension steps" in message


# -- the result ----------------------------------------------------------------------------


def test_results_over_the_limit_are_refused_before_conversion() -> None:
    data = {"items": list(range(90)), "pad": "x" * 1000}
    message = refused("input.items.map(a, input.items.map(b, input.pad))", data)
    assert "more than 1,048,576 bytes" in message
    assert "TRELLIS_MAX_PAYLOAD_BYTES" in message
    message = refused("[input, input, input, input, input, input]", "x" * 200_000)
    assert "more than 1,048,576 bytes" in message


def test_the_limit_follows_the_setting_and_the_caller() -> None:
    set_result_limit(1000)
    assert "more than 1,000 bytes" in refused("input", "x" * 2000)
    assert evaluate("input", "x" * 2000, max_bytes=5000) == b'"' + b"x" * 2000 + b'"'
    assert "more than 100 bytes" in refused("input", "x" * 200, max_bytes=100)


def test_results_nested_too_deep_or_not_json_are_refused() -> None:
    deep: Any = 1
    for _ in range(MAX_JSON_DEPTH):
        deep = [deep]
    assert len(evaluate("input", deep)) == 2 * MAX_JSON_DEPTH + 1
    assert f"nested deeper than {MAX_JSON_DEPTH}" in refused("[input]", deep)
    assert "not JSON" in refused("0.0 / 0.0", None)


def test_boolean_and_key_results_are_bounded_too() -> None:
    cond = compile_expression("input.size() > 1", where="node 'a' skip_if", boolean=True)
    assert cond.evaluate({"input": [1, 2]}) is True
    key = compile_expression("input.k", where="rate_key", variables=("input",))
    with pytest.raises(ExpressionError, match=r"rate_key .* more than 1,024 bytes"):
        key.evaluate({"input": {"k": "x" * 5000}}, max_bytes=1024)


@pytest.mark.parametrize(
    ("source", "paths", "unknown"),
    [
        ("input.a.all(x, x.b == 1)", None, False),
        ("input.a.all(x, x.b == input.c.d)", [("input", ("c", "d"))], False),
        ("input.a.all(x, x.b == size(input.c))", None, False),
        ("input.a.all(x, x.b == input.c.size())", None, False),
        ("input.a.all(x, x.b == dyn(input.c))", [], True),
        ("input.a.all(x, x.b in input.c + [1])", [], True),
        ("input.a.all(x, [1] + input.c == x)", [], True),
        ("input.a.all(x, 1 + input.c.d == x)", [], True),
        ("input.a.all(x, (input.c) == x)", [], True),
        ("input.a.all(x, x.b * 2 == 4)", None, False),
    ],
)
def test_shape_reads_what_a_comparison_scans(
    source: str, paths: list[tuple[str, tuple[str, ...]]] | None, unknown: bool
) -> None:
    scans = shape_of(source, VARIABLES).scans
    if paths is None:
        assert not scans
        return
    (scan,) = scans
    assert [(p.root, p.members) for p in scan.paths] == paths
    assert scan.unknown == unknown
