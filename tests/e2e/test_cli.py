"""The `trellis` command against a real coordinator process and the example worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import one_line_error, trellis
from tests.support.procs import ROOT, Proc, base_env, spawn_coordinator, spawn_worker
from worker_sdk import Client

pytestmark = pytest.mark.e2e


@pytest.fixture
def coordinator(tmp_path: Path) -> tuple[Proc, str]:
    proc, address = spawn_coordinator(
        f"sqlite:///{tmp_path}/trellis.db", tmp_path, max_payload_bytes="1024"
    )
    yield proc, address
    assert proc.stop() == 0, proc.output()


def test_apply_run_wait_and_status(coordinator: tuple[Proc, str], tmp_path: Path) -> None:
    _, address = coordinator
    worker = spawn_worker(ROOT / "examples/diamond_worker.py", address, tmp_path, "worker")
    try:
        applied = trellis(address, "workflow", "apply", "examples/diamond.yaml")
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.strip() == "diamond version 1 registered"
        again = trellis(address, "workflow", "apply", "examples/diamond.yaml")
        assert again.stdout.strip() == "diamond version 1 unchanged"

        run = trellis(
            address, "run", "diamond", "--input", '{"n": 3}', "--wait", "--output", "json"
        )
        assert run.returncode == 0, run.stderr
        doc = json.loads(run.stdout)
        assert doc["status"] == "SUCCEEDED"
        assert doc["output"] == {"sum": 15}

        status = trellis(address, "status", doc["id"])
        assert status.returncode == 0, status.stderr
        for node in ("prepare", "double", "square", "combine"):
            assert any(
                line.split()[:2] == [node, "SUCCEEDED"] for line in status.stdout.splitlines()
            ), status.stdout
        as_json = json.loads(trellis(address, "status", doc["id"], "--output", "json").stdout)
        assert {n["id"]: n["output"] for n in as_json["nodes"]}["square"] == {"squared": 9}

        bad_input = trellis(address, "run", "diamond", "--input", '{"n": 3', "--wait")
        one_line_error(bad_input, "INVALID_ARGUMENT", "input is not valid JSON")
        too_big = trellis(address, "run", "diamond", "--input", json.dumps({"s": "x" * 2000}))
        one_line_error(too_big, "INVALID_ARGUMENT", "1024-byte limit")
        failing = trellis(address, "run", "diamond", "--input", '{"n": "three"}', "--wait")
        assert failing.returncode == 1
        assert "FAILED" in failing.stdout and "prepare" in failing.stdout
    finally:
        assert worker.stop() == 0, worker.output()


def test_errors_print_one_line(coordinator: tuple[Proc, str], tmp_path: Path) -> None:
    _, address = coordinator
    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text(
        "name: loop\nnodes: [{id: a, task_type: t}, {id: b, task_type: t}]\n"
        "edges: [{source: a, target: b}, {source: b, target: a}]\n"
    )
    one_line_error(trellis(address, "workflow", "apply", str(cyclic)), "INVALID_ARGUMENT", "cycle")
    unknown_edge = tmp_path / "edge.json"
    unknown_edge.write_text(
        json.dumps(
            {
                "name": "e",
                "nodes": [{"id": "a", "taskType": "t"}],
                "edges": [{"source": "a", "target": "zz"}],
            }
        )
    )
    one_line_error(trellis(address, "workflow", "apply", str(unknown_edge)), "zz")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    one_line_error(trellis(address, "workflow", "apply", str(broken)), "broken.yaml")
    one_line_error(trellis(address, "run", "nope"), "NOT_FOUND", "nope")
    one_line_error(
        trellis(address, "status", "no-such-execution"), "NOT_FOUND", "no-such-execution"
    )
    listed = trellis(address, "workflow", "list", "--output", "json")
    assert json.loads(listed.stdout) == [], "a rejected definition must not be stored"


def test_second_coordinator_on_the_same_sqlite_file_is_refused(
    coordinator: tuple[Proc, str], tmp_path: Path
) -> None:
    env = base_env(
        {"TRELLIS_DATABASE_URL": f"sqlite:///{tmp_path}/trellis.db", "TRELLIS_PLAINTEXT": "true"}
    )
    second = subprocess.run(
        [sys.executable, "-m", "trellis.cli", "coordinator", "serve", "--listen", "127.0.0.1:0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    one_line_error(second, "another coordinator process", "PostgreSQL")


def test_migrate_is_idempotent(db_url: str) -> None:
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "trellis.cli", "migrate", "--database-url", db_url],
            env=base_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "up to date" in result.stdout


async def test_saga_example_rolls_back_in_reverse_order(
    coordinator: tuple[Proc, str], tmp_path: Path
) -> None:
    _, address = coordinator
    worker = spawn_worker(ROOT / "examples/saga_worker.py", address, tmp_path, "saga-worker")
    try:
        assert trellis(address, "workflow", "apply", "examples/saga.yaml").returncode == 0
        ok = trellis(
            address, "run", "saga", "--input", '{"order": 7}', "--wait", "--output", "json"
        )
        assert json.loads(ok.stdout)["output"] == {"tracking": "T-7"}, ok.stderr

        bad = trellis(
            address,
            "run",
            "saga",
            "--input",
            '{"order": 8, "ship_fails": true}',
            "--wait",
            "--output",
            "json",
        )
        assert bad.returncode == 1
        doc = json.loads(bad.stdout)
        assert doc["status"] == "FAILED"
        assert "carrier down (attempt 3)" in doc["error"]["message"]
        nodes = {n["id"]: n for n in doc["nodes"]}
        assert nodes["ship"]["status"] == "FAILED" and nodes["ship"]["attempt"] == 3
        assert nodes["alert"]["output"] == {"alerted": "ship"}
        assert nodes["charge~compensate"]["output"] == {"refunded": "P-8"}
        assert nodes["reserve~compensate"]["output"] == {"released": "R-8"}
        async with Client(address) as client:
            events = [e async for e in client.watch_execution(doc["id"])]
        done = [e.node_id for e in events if e.type == "NODE_SUCCEEDED"]
        assert done.index("charge~compensate") < done.index("reserve~compensate")

        letters = json.loads(trellis(address, "dlq", "list", "--output", "json").stdout)
        assert [(d["node_id"], len(d["attempts"])) for d in letters] == [("ship", 3)]
        assert {a["error"]["type"] for a in letters[0]["attempts"]} == {"ShippingUnavailable"}
    finally:
        assert worker.stop() == 0, worker.output()
