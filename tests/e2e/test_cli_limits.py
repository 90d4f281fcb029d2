"""`trellis limits` and `trellis breakers` against a real coordinator process.

Needs DispatchService served by the coordinator (coordinator/grpc/server.py wiring);
without it every call here is UNIMPLEMENTED.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import one_line_error, trellis
from tests.support.procs import Proc, spawn_coordinator

pytestmark = pytest.mark.e2e


@pytest.fixture
def address(tmp_path: Path) -> Iterator[str]:
    proc: Proc
    proc, address = spawn_coordinator(f"sqlite:///{tmp_path}/trellis.db", tmp_path)
    yield address
    assert proc.stop() == 0, proc.output()


def ok(address: str, *args: str) -> str:
    result = trellis(address, *args)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


def test_limits_set_merges_and_breakers_list_and_reset(address: str) -> None:
    one_line_error(trellis(address, "limits", "get", "email"), "NOT_FOUND", "trellis limits set")

    ok(address, "limits", "set", "email", "--rate", "20", "--burst", "40")
    doc = json.loads(
        ok(address, "limits", "set", "email", "--max-concurrency", "5", "--output", "json")
    )
    # The second set kept what the first one set.
    assert (doc["rate_per_second"], doc["burst"], doc["max_concurrency"]) == (20, 40, 5)

    shown = ok(address, "limits", "get", "email")
    assert "20/s burst 40" in shown and "max 5" in shown

    one_line_error(
        trellis(address, "limits", "set", "email", "--concurrency-key", "input.("),
        "INVALID_ARGUMENT",
        "concurrency_key",
    )
    one_line_error(
        trellis(address, "limits", "set", "email", "--breaker-reset", "soon"),
        "INVALID_ARGUMENT",
        "--breaker-reset",
    )

    ok(address, "limits", "set", "charge", "--breaker-threshold", "3", "--breaker-reset", "1m")
    listed = json.loads(ok(address, "limits", "list", "--output", "json"))
    assert [x["task_type"] for x in listed] == ["charge", "email"]

    table = ok(address, "breakers").splitlines()
    assert table[0].split() == ["TYPE", "STATE", "FAILURES/THRESHOLD", "OPENED", "SHARED"]
    assert table[1].split()[:3] == ["charge", "closed", "0/3"]
    breakers = json.loads(ok(address, "breakers", "--output", "json"))
    assert [(b["task_type"], b["state"]) for b in breakers] == [("charge", "closed")]
    reset = json.loads(ok(address, "breakers", "reset", "charge", "--output", "json"))
    assert reset["state"] == "closed"
    one_line_error(
        trellis(address, "breakers", "reset", "email"), "NOT_FOUND", "no circuit breaker"
    )

    assert ok(address, "limits", "delete", "email").strip() == "limits of email deleted"
    one_line_error(trellis(address, "limits", "delete", "email"), "NOT_FOUND")
