"""The coordinator's log formats: one line per record whatever a message or an extra holds,
and RFC 3339 millisecond UTC times (tests/e2e/test_log_forging.py drives a real process)."""

from __future__ import annotations

import json
import logging
import re

from coordinator.logs import JsonFormatter, TextFormatter, escape, timestamp

FORGED = "w1\n2026-12-03T18:20:01.123Z ERROR   coordinator: admin logged in\r\x1b[31mred\x85\u2028"
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("coordinator.service", logging.WARNING, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_escape_writes_every_control_character_as_an_escape() -> None:
    assert escape("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert escape("\x00\x1b[31m\x7f\x85\x9f") == "\\x00\\x1b[31m\\x7f\\x85\\x9f"
    assert escape("\u2028\u2029") == "\\u2028\\u2029"
    assert escape("plain ünïcode ✓") == "plain ünïcode ✓"


def test_text_records_are_one_line_with_message_and_extras_escaped() -> None:
    line = TextFormatter().format(
        record("lease lost by %s", FORGED, worker_id=FORGED, attempt=2, note='a "b" c=d')
    )
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "\x85" not in line and "\u2028" not in line
    stamp, level, rest = line.split(" ", 2)
    assert TIME.match(stamp) and level == "WARNING"
    assert rest.startswith("coordinator.service: lease lost by w1\\n2026-12-03T18:20:01.123Z")
    # An extra with spaces or '=' is quoted, so it cannot pass for further key=value pairs.
    assert ' worker_id="w1\\n2026-12-03T18:20:01.123Z ERROR   coordinator: admin' in line
    assert " attempt=2 " in line
    assert line.endswith(' note="a \\"b\\" c=d"')


def test_text_tracebacks_stay_on_the_line() -> None:
    try:
        raise ValueError(FORGED)
    except ValueError:
        import sys

        rec = record("boom")
        rec.exc_info = sys.exc_info()
    line = TextFormatter().format(rec)
    assert "\n" not in line
    assert 'exception="Traceback (most recent call last):\\n' in line
    assert "ValueError: w1\\n2026-12-03T18:20:01.123Z ERROR" in line


def test_json_records_have_millisecond_utc_times_and_one_line() -> None:
    line = JsonFormatter().format(record("lease lost by %s", FORGED, worker_id=FORGED))
    assert "\n" not in line
    doc = json.loads(line)
    assert TIME.match(doc["time"]), doc["time"]
    assert doc["message"] == f"lease lost by {FORGED}" and doc["worker_id"] == FORGED
    assert timestamp(0.5) == "1970-01-01T00:00:00.500Z"
    assert timestamp(1796323801.1239) == "2026-12-03T18:50:01.123Z"
