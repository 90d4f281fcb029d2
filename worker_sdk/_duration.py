"""Durations as users write them: "30s", "5m", "1h30m", "250ms", 2.5 (seconds) or a timedelta."""

from __future__ import annotations

import math
import re
from datetime import timedelta

Duration = str | float | int | timedelta
"""What the SDK accepts wherever it asks for a duration."""

_UNITS = {
    "us": timedelta(microseconds=1),
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
}
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(us|ms|s|m|h|d)")
_WHOLE = re.compile(r"(?:(?:\d+(?:\.\d+)?|\.\d+)(?:us|ms|s|m|h|d))+")


def parse_duration(value: Duration, *, what: str = "duration") -> timedelta:
    """Returns ``value`` as a timedelta; raises ValueError naming ``what`` when it is not one.

    Strings are one or more ``<number><unit>`` parts with units us, ms, s, m, h, d
    ("30s", "1h30m", "1.5s", "250ms"); numbers are seconds. Negative durations are
    refused.
    """
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, bool):
        raise ValueError(f"invalid {what} {value!r}: expected e.g. '30s', '5m', 2.5 or a timedelta")
    elif isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"invalid {what} {value!r}: must be a finite number of seconds")
        result = timedelta(seconds=value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if not _WHOLE.fullmatch(text):
            raise ValueError(
                f"invalid {what} {value!r}: expected a number with a unit "
                "(us, ms, s, m, h, d), e.g. '30s', '5m', '1h30m' or '250ms'"
            )
        result = timedelta()
        for number, unit in _PART.findall(text):
            result += float(number) * _UNITS[unit]
    else:
        raise ValueError(
            f"invalid {what} {value!r}: expected a string like '30s', a number of seconds "
            "or a timedelta"
        )
    if result < timedelta():
        raise ValueError(f"invalid {what} {value!r}: must not be negative")
    return result


def parse_positive_duration(value: Duration, *, what: str = "duration") -> timedelta:
    """Like ``parse_duration`` but also refuses zero (for timeouts)."""
    result = parse_duration(value, what=what)
    if result <= timedelta():
        raise ValueError(f"invalid {what} {value!r}: must be greater than zero")
    return result
