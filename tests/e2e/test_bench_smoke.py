"""The benchmark harnesses still run (tiny sizes, SQLite): a smoke test, not a benchmark;
nothing here asserts a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import ROOT

pytestmark = pytest.mark.e2e  # runs the harnesses as processes (some 20 s)


def test_bench_run_measures_throughput_on_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [
            *(sys.executable, "-m", "bench.run", "--db", "sqlite", "--only", "a"),
            *("--throughput-n", "40", "--quick", "--json", str(out)),
        ],
        cwd=ROOT,
        check=True,
        timeout=300,
        capture_output=True,
    )
    results = json.loads(out.read_text())
    throughput = [r for r in results["results"] if r["scenario"].startswith("a ")]
    assert len(throughput) == 2, results
    for r in throughput:
        assert "error" not in r, r
        assert r["n"] == 40 and r["value"] > 0


def test_bench_growth_runs_on_a_tiny_size() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.growth",
            "--db",
            "sqlite",
            "--backlogs",
            "60",
            "--widths",
            "4",
        ],
        cwd=ROOT,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    lines = done.stdout.splitlines()
    assert any(line.startswith("sqlite   backlog      60:") for line in lines), lines
    assert any(line.startswith("sqlite   width     4: 1->4->1") for line in lines), lines
