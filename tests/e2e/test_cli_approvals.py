"""`trellis approve` and `trellis reject` against a real coordinator process (the CLI sends
the tests' admin key: decisions are recorded as made by bootstrap-admin)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import cli, one_line_error, trellis
from tests.support.procs import Proc, spawn_coordinator

pytestmark = pytest.mark.e2e

# Two approvals in a row and nothing else: no worker needed.
RELEASE_YAML = """\
name: release
nodes:
  - id: sign_off
    kind: approval
    required_role: operator
    prompt: Is the release notes page ready?
  - {id: go_live, kind: approval, required_role: release-manager, approval_timeout: 3600s}
edges:
  - {source: sign_off, target: go_live}
"""


@pytest.fixture
def address(tmp_path: Path) -> Iterator[str]:
    proc: Proc
    proc, address = spawn_coordinator(f"sqlite:///{tmp_path}/trellis.db", tmp_path)
    yield address
    assert proc.stop() == 0, proc.output()


def nodes(doc: dict[str, object]) -> dict[str, dict[str, object]]:
    return {n["id"]: n for n in doc["nodes"]}  # type: ignore[attr-defined,index]


def status(address: str, execution_id: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(cli(address, "status", execution_id, "--output", "json"))
    return doc


def test_approve_and_reject_from_the_command_line(address: str, tmp_path: Path) -> None:
    path = tmp_path / "release.yaml"
    path.write_text(RELEASE_YAML)
    assert cli(address, "workflow", "apply", str(path)).strip() == "release version 1 registered"
    execution_id = cli(address, "run", "release", "--input", '{"version": "1.2"}').strip()

    waiting = nodes(status(address, execution_id))
    assert (waiting["sign_off"]["status"], waiting["go_live"]["status"]) == ("WAITING", "BLOCKED")

    approved = cli(address, "approve", execution_id, "sign_off", "--comment", "notes are up")
    rows = [line.split()[:2] for line in approved.splitlines()]
    assert ["sign_off", "SUCCEEDED"] in rows and ["go_live", "WAITING"] in rows, approved
    decision = nodes(status(address, execution_id))["sign_off"]["output"]
    assert isinstance(decision, dict) and decision.pop("at")
    assert decision == {"approved": True, "by": "bootstrap-admin", "comment": "notes are up"}

    rejected = trellis(
        address,
        "reject",
        execution_id,
        "go_live",
        "--comment",
        "not on a Friday",
        "--output",
        "json",
    )
    assert rejected.returncode == 0, rejected.stderr
    doc = json.loads(rejected.stdout)
    assert doc["status"] == "FAILED"
    assert doc["error"]["type"] == "ApprovalRejected"
    assert doc["error"]["message"] == (
        "node 'go_live' was rejected by bootstrap-admin: not on a Friday"
    )
    go_live = nodes(doc)["go_live"]
    assert (go_live["status"], go_live["error"]) == ("FAILED", "not on a Friday")

    one_line_error(
        trellis(address, "approve", execution_id, "go_live"), "FAILED_PRECONDITION", "FAILED"
    )
    one_line_error(
        trellis(address, "reject", "no-such-execution", "go_live", "--comment", "x"),
        "NOT_FOUND",
        "no-such-execution",
    )


def test_deciding_a_node_that_is_not_waiting_prints_why(address: str, tmp_path: Path) -> None:
    path = tmp_path / "release.yaml"
    path.write_text(RELEASE_YAML)
    cli(address, "workflow", "apply", str(path))
    execution_id = cli(address, "run", "release").strip()
    one_line_error(
        trellis(address, "approve", execution_id, "go_live"),
        "FAILED_PRECONDITION",
        "node is BLOCKED, not WAITING",
    )
    one_line_error(
        trellis(address, "approve", execution_id, "nope"), "NOT_FOUND", "has no node 'nope'"
    )
    assert nodes(status(address, execution_id))["sign_off"]["status"] == "WAITING"
