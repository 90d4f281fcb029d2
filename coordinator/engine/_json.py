"""The strict JSON decoder for every payload a client hands the coordinator (pure).

Python's ``json.loads`` accepts more than RFC 8259 JSON, and some of what it accepts
breaks the coordinator or other languages further on: ``NaN``, ``Infinity`` and
``-Infinity`` (no JSON parser elsewhere reads them back), lone UTF-16 surrogates such as
``"\\ud800"`` (valid in no UTF-8 string: PostgreSQL, Go and Rust refuse them), numbers
too large for any double (``1e999`` decodes to ``inf``) or with thousands of digits, and
nesting so deep that the recursive decoder (and every recursive consumer after it) runs
out of stack. ``decode_json`` refuses all of these with ``InvalidArgument`` naming the
field, and keeps the common case at the speed of ``json.loads``: each extra check is a
scan in C that only falls back to slower work when the document could need it.

The bounds (docs/protocol.md, "Strict JSON"):

- ``MAX_JSON_DEPTH`` nested arrays/objects (the document itself is level 1);
- ``MAX_NUMBER_DIGITS`` digits in one number literal; every number must be finite;
- UTF-8 only, no lone surrogates (in strings and in keys), no ``NaN``/``Infinity``.
"""

from __future__ import annotations

import array
import itertools
import json
import math
import re
from typing import Any

from coordinator.errors import InvalidArgument

MAX_JSON_DEPTH = 128
MAX_NUMBER_DIGITS = 100

# A number literal may be too long or overflow a double when, with every digit read as 0,
# every E as e and signs dropped, the text holds a run of too many digits or an exponent of
# three digits or more (that run may also sit inside a string: then the slow path, which
# checks each number literal, finds nothing wrong). bytes.translate keeps this in C.
_NUMBERS = bytes.maketrans(b"0123456789E", b"0000000000e")
_LONG_DIGITS = b"0" * (MAX_NUMBER_DIGITS + 1)
_PAIR = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_DEPTH_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes
_OPEN_RUN = re.compile(rb"(?<![\[{])[\[{]{%d}" % (MAX_JSON_DEPTH + 1))  # run starts only


def decode_json(payload: bytes | str, name: str) -> Any:
    """``payload`` decoded, or ``InvalidArgument`` saying what in ``name`` is refused."""
    if isinstance(payload, str):
        try:
            payload = payload.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(
                f"{name} contains a lone UTF-16 surrogate; such a string is not valid Unicode"
            ) from None
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "send JSON encoded as UTF-8"
        ) from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _too_deep(payload):
        raise InvalidArgument(
            f"{name} nests arrays/objects deeper than {MAX_JSON_DEPTH} levels; flatten the document"
        )
    if "\\" in text and _lone_surrogate(text):
        raise InvalidArgument(
            f"{name} contains a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
            "pair); such a string is not valid Unicode, send the character itself or a "
            "complete surrogate pair"
        )
    numbers = payload.translate(_NUMBERS, b"+-")
    checked = _LONG_DIGITS in numbers or b"e000" in numbers
    try:
        return (_CHECKED if checked else _STRICT).decode(text)
    except _Refused as exc:
        raise InvalidArgument(f"{name} {exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{name} is not valid JSON: {exc}") from None
    except RecursionError:  # a malformed document the depth scan could not measure
        raise InvalidArgument(
            f"{name} nests arrays/objects deeper than {MAX_JSON_DEPTH} levels; flatten the document"
        ) from None
    except ValueError as exc:  # e.g. the interpreter's own cap on integer digits
        raise InvalidArgument(f"{name} is not acceptable JSON: {exc}") from None


def _too_deep(payload: bytes) -> bool:
    """Whether the brackets outside strings nest deeper than ``MAX_JSON_DEPTH``.

    Without its escaped backslashes and quotes, the text outside strings is every other
    piece between quotes; of that, only the brackets count. A run of too many opening
    brackets is found by a regex; otherwise the depth is the running sum of +1 per opening
    and -1 per closing bracket. Every step runs in C (UTF-8 multi-byte characters never
    hold these bytes)."""
    plain = payload.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(plain.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
    if _OPEN_RUN.search(brackets):
        return True
    steps = array.array("b", brackets.translate(_DEPTH_STEPS))
    return max(itertools.accumulate(steps), default=0) > MAX_JSON_DEPTH


def _lone_surrogate(text: str) -> bool:
    """Whether a surrogate escape is not part of a high-low pair: without escaped
    backslashes (so ``\\\\ud800`` is no escape) and complete pairs, any surrogate escape
    left is a lone one. Removing whole escapes never makes a new one."""
    rest = _PAIR.sub("", text.replace("\\\\", ""))
    return _SURROGATE.search(rest) is not None


class _Refused(ValueError):
    """A number or constant the decoder's hooks refuse (the caller adds the field name)."""


def _refuse_constant(constant: str) -> Any:
    raise _Refused(
        f"contains {constant}, which is not JSON; send a finite number, a string or null"
    )


def _digits(literal: str) -> int:
    return len(literal.translate(_NOT_DIGITS))


_NOT_DIGITS = {ord(c): None for c in "+-.eE"}


def _checked_int(literal: str) -> int:
    if _digits(literal) > MAX_NUMBER_DIGITS:
        raise _Refused(
            f"contains an integer of {_digits(literal)} digits, more than "
            f"{MAX_NUMBER_DIGITS}; send such a number as a string"
        )
    return int(literal)


def _checked_float(literal: str) -> float:
    if _digits(literal) > MAX_NUMBER_DIGITS:
        raise _Refused(
            f"contains a number of {_digits(literal)} digits, more than "
            f"{MAX_NUMBER_DIGITS}; send such a number as a string"
        )
    value = float(literal)
    if not math.isfinite(value):
        raise _Refused(
            f"contains the number {literal[:40]}, too large for a double; "
            "send such a number as a string"
        )
    return value


# Built once: json.loads with hooks would build a decoder on every call. The checked one
# (a Python call per number) only for documents that may hold a refused number.
_STRICT = json.JSONDecoder(parse_constant=_refuse_constant)
_CHECKED = json.JSONDecoder(
    parse_constant=_refuse_constant, parse_int=_checked_int, parse_float=_checked_float
)
