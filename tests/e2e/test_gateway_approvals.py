"""Approvals through the gateway's HTTP API, as people do them: real coordinator and gateway
processes; the caller's own key decides (a viewer is refused, an operator approves and the
execution continues, a rejection fails the node with the comment as its reason)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import cli
from tests.support.http import post, until
from tests.support.procs import Proc, spawn_coordinator, spawn_gateway
from tests.support.wait import wait_for_sync

pytestmark = pytest.mark.e2e

REVIEW_YAML = """\
name: payout
nodes:
  - {id: review, kind: approval, required_role: operator, prompt: "Pay this out?"}
  - {id: second_look, kind: approval, required_role: operator}
edges:
  - {source: review, target: second_look}
"""


@dataclass
class Stack:
    address: str
    base: str

    def run(self) -> str:
        return cli(self.address, "run", "payout", "--input", '{"amount": 120}').strip()

    def nodes(self, execution_id: str) -> tuple[str, dict[str, dict[str, object]]]:
        doc = json.loads(cli(self.address, "status", execution_id, "--output", "json"))
        return doc["status"], {n["id"]: n for n in doc["nodes"]}

    def decide(
        self, execution_id: str, node: str, decision: str, key: str | None, comment: str = ""
    ) -> tuple[int, dict[str, object]]:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return post(
            f"{self.base}/api/executions/{execution_id}/nodes/{node}/{decision}",
            json.dumps({"comment": comment}).encode(),
            headers,
        )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    coordinator: Proc
    coordinator, address = spawn_coordinator(f"sqlite:///{tmp_path}/trellis.db", tmp_path)
    gateway, base = spawn_gateway(address, tmp_path)
    try:
        until(f"{base}/readyz", 200, gateway)
        path = tmp_path / "payout.yaml"
        path.write_text(REVIEW_YAML)
        cli(address, "workflow", "apply", str(path))
        yield Stack(address, base)
    finally:
        gateway.stop()
        coordinator.stop()


def key(stack: Stack, name: str, role: str) -> str:
    return cli(stack.address, "keys", "create", "--name", name, "--role", role).strip()


def test_a_viewer_is_refused_and_an_operator_approves(stack: Stack) -> None:
    execution_id = stack.run()
    viewer, operator = key(stack, "vera", "viewer"), key(stack, "olga", "operator")

    code, body = stack.decide(execution_id, "review", "approve", None)
    assert code == 401, body
    code, body = stack.decide(execution_id, "review", "approve", "tk_0000000000000000.forged")
    assert code == 401, body
    code, body = stack.decide(execution_id, "review", "approve", viewer, "looks fine")
    assert code == 403 and "executions.approve" in str(body["error"]), body
    assert stack.nodes(execution_id)[1]["review"]["status"] == "WAITING"

    code, body = stack.decide(execution_id, "review", "approve", operator, "checked the invoice")
    assert (code, body["node_status"]) == (200, "NODE_STATUS_SUCCEEDED"), body
    _, nodes = stack.nodes(execution_id)
    assert nodes["second_look"]["status"] == "WAITING"  # the execution went on
    decision = nodes["review"]["output"]
    assert isinstance(decision, dict)
    assert (decision["approved"], decision["by"], decision["comment"]) == (
        True,
        "olga",
        "checked the invoice",
    )

    code, body = stack.decide(execution_id, "second_look", "approve", operator)
    assert code == 200, body
    wait_for_sync(lambda: stack.nodes(execution_id)[0] == "SUCCEEDED", timeout=15)
    # Who decided is in the audit trail, with the refusal.
    records = json.loads(cli(stack.address, "audit", "list", "--output", "json"))
    decided = [(r["actor"], r["action"], r["outcome"]) for r in records if "Node" in r["action"]]
    assert decided == [
        ("vera", "ApproveNode", "denied"),
        ("olga", "ApproveNode", "ok"),
        ("olga", "ApproveNode", "ok"),
    ]


def test_a_rejection_fails_the_node_with_the_comment_as_reason(stack: Stack) -> None:
    execution_id = stack.run()
    operator = key(stack, "olga", "operator")
    code, body = stack.decide(execution_id, "review", "reject", operator, "amount is wrong")
    assert (code, body["node_status"]) == (200, "NODE_STATUS_FAILED"), body
    status, nodes = stack.nodes(execution_id)
    assert status == "FAILED"
    assert nodes["review"]["error"] == "amount is wrong"
    doc = json.loads(cli(stack.address, "status", execution_id, "--output", "json"))
    assert (doc["error"]["type"], doc["error"]["node_id"]) == ("ApprovalRejected", "review")
    assert nodes["second_look"]["status"] != "WAITING"
