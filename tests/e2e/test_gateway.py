"""The gateway process answers Kubernetes probes: /readyz follows the coordinator."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.http import get, until
from tests.support.procs import (
    spawn_coordinator,
    spawn_gateway,
    wait_serving,
)

pytestmark = pytest.mark.e2e


def test_readyz_follows_the_coordinator(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/trellis.db"
    coordinator, address = spawn_coordinator(db, tmp_path)
    gateway, base = spawn_gateway(address, tmp_path, ready_timeout="500ms")
    try:
        assert until(f"{base}/healthz", 200, gateway) == {"status": "ok"}
        ready = until(f"{base}/readyz", 200, gateway)
        assert ready["dependencies"] == {
            "coordinator": "SERVING",
            "coordinator.triggers": "SERVING",
        }
        assert ready["degraded"] == []

        assert coordinator.stop() == 0
        unready = until(f"{base}/readyz", 503, gateway)
        assert unready["status"] == "unready"
        assert unready["degraded"] == ["coordinator"]
        assert get(f"{base}/healthz")[0] == 200, "the gateway itself stays alive"

        restarted, _ = spawn_coordinator(db, tmp_path, port=int(address.rsplit(":", 1)[1]))
        wait_serving(address, restarted)
        until(f"{base}/readyz", 200, gateway)
        assert restarted.stop() == 0
    finally:
        coordinator.stop()
        assert gateway.stop() == 0, gateway.output()
