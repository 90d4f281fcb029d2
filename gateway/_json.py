"""Strict JSON for the bodies the gateway reads itself (events, approval decisions).

Refused with a message saying why (the caller answers 400): text that is not JSON or not
UTF-8, ``NaN`` and ``Infinity``, numbers too large to be a float, integers of more than
``MAX_INTEGER_DIGITS`` digits, and arrays or objects nested more than ``MAX_DEPTH``
levels. Webhook bodies are never parsed here: the coordinator verifies their signature
first, then parses them with the same bounds.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64
MAX_INTEGER_DIGITS = 20


class JsonError(ValueError):
    """The body is not JSON the gateway accepts; the message says why."""


def loads(body: bytes) -> Any:
    try:
        doc = json.loads(
            body, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_short_int
        )
    except RecursionError:
        raise JsonError(f"the body nests JSON deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise JsonError(f"the body is not valid JSON: {exc}") from None
    if _deeper_than(doc, MAX_DEPTH):
        raise JsonError(f"the body nests JSON deeper than {MAX_DEPTH} levels")
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _short_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise ValueError(f"an integer has {digits} digits, over {MAX_INTEGER_DIGITS}")
    return int(text)


def _deeper_than(doc: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` levels (without recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


__all__ = ["MAX_DEPTH", "MAX_INTEGER_DIGITS", "JsonError", "loads"]
