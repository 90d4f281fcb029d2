"""Webhooks end to end: gateway + coordinator + an SDK worker, all real processes."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.cli import cli
from tests.support.http import until
from tests.support.procs import (
    ROOT,
    spawn_coordinator,
    spawn_gateway,
    spawn_worker,
    wait_serving,
)
from worker_sdk import Client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SECRET = "e2e-webhook-secret-0123456789"
MAX_BODY = 4096


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, object], str]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=15) as reply:
            return reply.status, json.loads(reply.read()), reply.headers.get("Retry-After", "")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers.get("Retry-After", "")


def signature(body: bytes, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Trellis-Signature": f"t={t},v1={mac}"}


async def test_signed_webhook_runs_a_workflow_once_and_errors_start_nothing(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path}/trellis.db"
    coordinator, address = spawn_coordinator(db, tmp_path)
    worker = spawn_worker(ROOT / "examples/diamond_worker.py", address, tmp_path, "worker")
    gateway, base = spawn_gateway(address, tmp_path, max_body_bytes=str(MAX_BODY), rpc_timeout="2s")
    url = f"{base}/api/webhooks/shop/orders"
    restarted = None
    try:
        async with Client(address) as client:
            await client.register_workflow(ROOT / "examples/diamond.yaml")
        cli(
            address,
            "triggers",
            "webhook",
            "create",
            "shop/orders",
            "--workflow",
            "diamond",
            "--hmac-secret",
            SECRET,
            "--idempotency-key",
            "body.order_id",
            "--input",
            '{"n": body.quantity}',
        )
        ready = until(f"{base}/readyz", 200, gateway)
        assert ready["degraded"] == []

        body = json.dumps({"order_id": "A-17", "quantity": 3}).encode()
        status, reply, _ = post(url, body, signature(body))
        assert status == 202, reply
        assert reply["created"] is True
        execution_id = str(reply["execution_id"])
        async with Client(address) as client:
            done = await client.wait_for_execution(execution_id, timeout=60)
        assert done.status == "SUCCEEDED"
        assert done.output == {"sum": 3 * 2 + 3 * 3}

        # Delivered again, signed afresh (timestamps after the first one's, inside the
        # tolerance): the idempotency key finds the same execution.
        later = int(time.time()) + 1
        status, reply, _ = post(url, body, signature(body, at=later))
        assert (status, reply) == (202, {"execution_id": execution_id, "created": False})
        # The very same signed request again: a replay, refused.
        first_headers = signature(body, at=later + 1)
        assert post(url, body, first_headers)[0] == 202
        status, reply, _ = post(url, body, first_headers)
        assert status == 409, reply
        assert "replay" in str(reply["error"])

        other = json.dumps({"order_id": "B-1", "quantity": 1}).encode()
        refused = [
            (post(url, other, signature(other, "not-the-secret-at-all")), 401),
            (post(url, other, {"Content-Type": "application/json"}), 401),
            (post(f"{base}/api/webhooks/nope", other, signature(other)), 404),
            (post(url, b"{" + b" " * (2 * MAX_BODY) + b"}", signature(b"{}")), 413),
            (post(url, b"{not json", signature(b"{not json")), 400),
        ]
        for (code, error, _), expected in refused:
            assert code == expected, error
            assert isinstance(error["error"], str) and error["error"]

        assert coordinator.stop() == 0
        status, reply, retry_after = post(url, other, signature(other))
        assert status == 503, reply
        assert retry_after.isdigit()

        restarted, _ = spawn_coordinator(db, tmp_path, port=int(address.rsplit(":", 1)[1]))
        wait_serving(address, restarted)
        async with Client(address) as client:
            runs = await client.list_executions(workflow_name="diamond")
        assert [e.id for e in runs] == [execution_id], "exactly one execution was started"
    finally:
        gateway_exit = gateway.stop()
        worker.stop()
        coordinator.stop()
        if restarted is not None:
            restarted.stop()
    assert gateway_exit == 0, gateway.output()
