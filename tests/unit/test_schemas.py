"""coordinator/schemas.py: vetting schemas, reporting the failing place, and the bounds on
hostile schemas and documents (no network, no database)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from coordinator import schemas
from coordinator.errors import InvalidArgument
from coordinator.model import (
    NodeSpec,
    WorkflowDef,
    definition_from_document,
    definition_to_document,
)
from coordinator.service._schemas import schema_node


def text(doc: dict[str, Any]) -> bytes:
    return schemas.canonical(doc)


def check(schema: dict[str, Any], document: object, budget: float = 5.0) -> str | None:
    """A check with a budget generous enough for a loaded machine."""
    return schemas.violation(text(schema), json.dumps(document).encode(), budget=budget)


def test_the_failing_place_is_a_json_pointer() -> None:
    schema = {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "object", "required": ["sku"]}},
            "a/b~c": {"type": "integer"},
        },
    }
    assert check(schema, {"items": [{"sku": 1}, {}]}) == (
        " at /items/1: 'sku' is a required property"
    )
    assert check(schema, {"a/b~c": "x"}) == " at /a~1b~0c: 'x' is not of type 'integer'"
    assert check(schema, []) == " at / (the whole document): [] is not of type 'object'"
    assert check(schema, {"items": []}) is None


def test_formats_are_asserted() -> None:
    assert check({"format": "email"}, "x") == " at / (the whole document): 'x' is not a 'email'"
    assert check({"format": "email"}, "a@b.example") is None
    assert check({"format": "ipv4"}, "300.1.1.1") is not None


def test_the_dialect_follows_schema_among_the_supported_drafts() -> None:
    # Draft 4: exclusiveMaximum is a boolean next to maximum.
    draft4 = {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "maximum": 3,
        "exclusiveMaximum": True,
    }
    schemas.check_schema(text(draft4), "w")
    assert check(draft4, 3) is not None
    assert check(draft4, 2) is None
    with pytest.raises(InvalidArgument, match=r"w: \$schema 'http://example.com/s' is not a"):
        schemas.check_schema(text({"$schema": "http://example.com/s"}), "w")
    # 2020-12 by default: exclusiveMaximum is a number, a boolean is not a schema.
    with pytest.raises(InvalidArgument, match="w is not a valid JSON Schema at /exclusiveMaximum"):
        schemas.check_schema(text({"exclusiveMaximum": True}), "w")


def test_references_resolve_inside_the_schema_only() -> None:
    local = {"$defs": {"id": {"type": "string"}}, "properties": {"a": {"$ref": "#/$defs/id"}}}
    schemas.check_schema(text(local), "w")
    assert check(local, {"a": 1}) == " at /a: 1 is not of type 'string'"
    for ref in (
        "https://example.com/schema.json",
        "http://169.254.169.254/latest/meta-data",
        "file:///etc/passwd",
        "other.json",
        "#/$defs/missing",
    ):
        with pytest.raises(InvalidArgument, match="does not resolve inside the schema"):
            schemas.check_schema(text({"properties": {"a": {"$ref": ref}}}), "w")


def test_a_schema_must_be_an_object_within_the_size_limit() -> None:
    with pytest.raises(InvalidArgument, match="w must be a JSON object"):
        schemas.check_schema(b"true", "w")
    with pytest.raises(InvalidArgument, match="w is not valid JSON"):
        schemas.check_schema(b"{", "w")
    big = text({"enum": ["x" * 100] * 700})
    assert len(big) > schemas.MAX_SCHEMA_BYTES
    with pytest.raises(InvalidArgument, match="over the 65536-byte limit"):
        schemas.check_schema(big, "w")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "pattern", [r"^(a+)+$", r"^(a|a)*$", r"^(a|aa)+$", r"^(\w+\s?)*$", r"(x+x+)+y"]
)
def test_a_catastrophic_pattern_is_cut_short(pattern: str) -> None:
    # Python's re takes longer than the test timeout on these; regex gives up within budget.
    value = ("x" if "x" in pattern else "a") * 5000 + "!"
    for schema in (
        {"pattern": pattern},
        {"patternProperties": {pattern: {}}},
    ):
        document = value if "pattern" in schema else {value: 1}
        why = schemas.violation(text(schema), json.dumps(document).encode(), budget=0.02)
        assert why is not None and "checking it took over 20 ms" in why


def test_patterns_still_match_ordinarily() -> None:
    assert check({"pattern": "^[A-Z]{3}-[0-9]+$"}, "ABC-12") is None
    assert check({"pattern": "^[A-Z]{3}-[0-9]+$"}, "abc") == (
        " at / (the whole document): 'abc' does not match '^[A-Z]{3}-[0-9]+$'"
    )
    schema = {"patternProperties": {"^n_": {"type": "number"}}}
    assert check(schema, {"n_a": "x"}) == " at /n_a: 'x' is not of type 'number'"


@pytest.mark.timeout(30)
def test_unique_items_is_linear_and_json_equal() -> None:
    schema = {"uniqueItems": True}
    # The library compares 10,000 distinct objects pairwise: some fifty million comparisons.
    distinct = [{"a": i} for i in range(10_000)]
    assert check(schema, distinct) is None
    assert check(schema, [*distinct, {"a": 7}]) is not None
    assert check(schema, [1, 1.0]) is not None  # equal numbers
    assert check(schema, [1, True]) is None  # true is not 1
    assert check(schema, [{"a": [1, {"b": 2}]}, {"a": [1, {"b": 2.0}]}]) is not None


def test_a_shared_budget_bounds_many_checks_together() -> None:
    slow = text({"pattern": r"^(a+)+$"})
    document = json.dumps("a" * 5000 + "!").encode()
    started = time.monotonic()
    with schemas.shared_budget(0.05):
        answers = [schemas.violation(slow, document) for _ in range(20)]
    assert all(a is not None and "took over" in a for a in answers)
    # Twenty checks of a 50 ms budget each would take a second; they shared 50 ms.
    assert time.monotonic() - started < 20 * schemas.CHECK_BUDGET


def test_messages_quoting_a_huge_value_are_clipped() -> None:
    why = check({"type": "integer"}, "y" * 100_000)
    assert why is not None and why.endswith("…(clipped)")
    assert len(why) < 2 * schemas.MAX_MESSAGE


def test_schemas_are_part_of_the_stored_document_only_when_set() -> None:
    plain = WorkflowDef(name="w", nodes=(NodeSpec(id="a", task_type="t"),))
    doc = definition_to_document(plain)
    assert "input_schema" not in doc and "output_schema" not in doc["nodes"][0]
    with_schemas = WorkflowDef(
        name="w",
        nodes=(NodeSpec(id="a", task_type="t", output_schema=b'{"type":"object"}'),),
        input_schema=b'{"type":"object"}',
    )
    back = definition_from_document(json.loads(json.dumps(definition_to_document(with_schemas))))
    assert back.input_schema == with_schemas.input_schema
    assert back.nodes[0].output_schema == b'{"type":"object"}'
    assert with_schemas.content_hash != plain.content_hash


def test_the_schema_of_a_node_run_is_its_nodes() -> None:
    defn = WorkflowDef(
        name="w",
        nodes=(
            NodeSpec(id="m", task_type="t", kind="map", output_schema=b"{}"),
            NodeSpec(id="a.b", task_type="t", output_schema=b"{}"),
        ),
    )
    assert schema_node(defn, "m[12]") is defn.nodes[0]
    assert schema_node(defn, "a.b") is defn.nodes[1]
    assert schema_node(defn, "a.b~compensate") is None
    assert schema_node(defn, "added-at-run-time") is None
