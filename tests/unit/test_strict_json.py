"""The strict JSON decoder of client payloads (engine.decode_json)."""

from __future__ import annotations

import json

import pytest

from coordinator.engine import MAX_JSON_DEPTH, MAX_NUMBER_DIGITS, decode_json
from coordinator.errors import InvalidArgument
from worker_sdk._convert import encode_input


def refused(payload: bytes) -> str:
    with pytest.raises(InvalidArgument) as info:
        decode_json(payload, "output")
    message = str(info.value)
    assert message.startswith("output ")  # names the field
    return message


@pytest.mark.parametrize(
    "payload",
    [b"NaN", b"[1, Infinity]", b'{"a": -Infinity}', b'{"a": [NaN]}'],
)
def test_non_finite_constants_are_refused(payload: bytes) -> None:
    assert "not JSON" in refused(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b'"\\ud800"',
        b'"\\udc00"',
        b'{"\\udbff": 1}',  # in a key
        b'"\\ud800\\u0041"',  # a high one not followed by a low one
        b'"\\ud800x\\udc00"',
        b'"\\udc00\\ud800"',  # in the wrong order
        b'"\\ud800\\\\"',
        b'"\\ud800\\ud83d\\ude00"',  # a lone one next to a pair
        b'"\\\\\\ud800"',  # an escaped backslash, then a lone escape
        b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8 bytes
        b'"\xff"',
    ],
)
def test_lone_surrogates_and_bad_utf8_are_refused(payload: bytes) -> None:
    message = refused(payload)
    assert "surrogate" in message or "UTF-8" in message


def test_surrogate_pairs_and_escaped_backslashes_are_kept() -> None:
    assert decode_json(b'"\\ud83d\\ude00"', "x") == "\U0001f600"
    assert decode_json(b'{"\\uD83D\\uDE00": "\\\\ud800"}', "x") == {"\U0001f600": "\\ud800"}
    assert decode_json(json.dumps({"k": "é \U0001f600"}).encode(), "x") == {"k": "é \U0001f600"}


def test_nesting_is_bounded_without_recursion_errors() -> None:
    deepest = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert decode_json(deepest, "x") is not None
    mixed = b'{"a":' * (MAX_JSON_DEPTH - 1) + b"[]" + b"}" * (MAX_JSON_DEPTH - 1)
    assert decode_json(mixed, "x") is not None
    for payload in (
        b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
        b"[" * 100_000 + b"]" * 100_000,
        b"[" * 100_000,  # unbalanced as well
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    ):
        assert f"deeper than {MAX_JSON_DEPTH} levels" in refused(payload)


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"s": "[" * 1000 + "{" * 1000, "t": ['"]]]'] * 200})
    assert decode_json(text.encode(), "x")["s"].startswith("[[[")


def test_wide_but_shallow_documents_decode() -> None:
    wide = json.dumps([[i, {"k": [i]}] for i in range(5000)]).encode()
    assert len(decode_json(wide, "x")) == 5000


def test_absurd_numbers_are_refused() -> None:
    assert "5000 digits" in refused(b"1" * 5000)
    assert "digits" in refused(b"[-" + b"9" * (MAX_NUMBER_DIGITS + 1) + b"]")
    assert "digits" in refused(b"0." + b"1" * 200)
    assert "too large for a double" in refused(b"1e999")
    assert "too large for a double" in refused(b'{"a": -1.5E+400}')


def test_ordinary_numbers_and_numeric_strings_decode() -> None:
    assert decode_json(b"[1.5e300, -1e-999, 123]", "x") == [1.5e300, -0.0, 123]
    assert decode_json(b"9" * MAX_NUMBER_DIGITS, "x") == int("9" * MAX_NUMBER_DIGITS)
    long_digits = '"' + "1" * 5000 + '"'
    assert decode_json(long_digits.encode(), "x") == "1" * 5000
    assert decode_json(b'{"v": "e1000"}', "x") == {"v": "e1000"}


def test_syntax_errors_name_the_field() -> None:
    assert "not valid JSON" in refused(b"{")
    assert "not valid JSON" in refused(b"[1,]")


def test_the_sdk_refuses_to_send_nan() -> None:
    with pytest.raises(TypeError, match="not JSON-serializable"):
        encode_input({"x": float("nan")})
    with pytest.raises(TypeError, match="not JSON-serializable"):
        encode_input([float("inf")])
