"""Log set-up for the coordinator's entry points (library modules only call getLogger).

Every record is one line, whatever it carries: log messages and extras quote what clients
sent (worker ids, workflow names, paths), and a newline in one of them must not be able to
forge a record of its own. The text format escapes control characters (``\\n``, ``\\r``,
``\\t``, other C0 and C1 characters as ``\\xNN``, ANSI escape sequences with their ESC,
and the Unicode line and paragraph separators) in the message, the extras and a traceback;
the JSON format is one JSON object per line (JSON escapes them itself). Times are RFC 3339
in UTC with milliseconds: ``2026-12-03T18:20:01.123Z``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

# C0 controls, DEL, C1 controls, and the Unicode line/paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Extras' values are quoted when they hold these (or nothing), so that a value cannot pass
# for another key=value pair.
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every control character written as an escape: one printable line."""
    return _CONTROL.sub(_escape_char, text)


def _value(value: object) -> str:
    raw = str(value)
    if raw and not _NEEDS_QUOTES.search(raw):
        return escape(raw)
    return '"' + escape(raw.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def timestamp(created: float) -> str:
    """RFC 3339, UTC, milliseconds: ``2026-12-03T18:20:01.123Z``."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """One human-readable line per record: time, level, logger, message, then the extras as
    key=value (quoted when needed) and the traceback, if any, all escaped."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{timestamp(record.created)} {record.levelname:<7} {record.name}: "
            f"{escape(record.getMessage())}"
        )
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{escape(str(k))}={_value(v)}" for k, v in extras.items())
        if record.exc_info:
            line += " exception=" + _value(self.formatException(record.exc_info))
        elif record.exc_text:
            line += " exception=" + _value(record.exc_text)
        if record.stack_info:
            line += " stack=" + _value(record.stack_info)
        return line


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level.upper() != "DEBUG":
        # Alembic announces every plugin and migration step at INFO; httpx every request
        # with its URL (an SMS provider's may carry a credential) and the status line the
        # endpoint sent (its text is the endpoint's, not ours).
        for noisy in ("alembic", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
