"""The README's first command: scripts/demo runs the diamond to completion on SQLite."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.procs import ROOT, base_env, free_port

pytestmark = pytest.mark.e2e


def test_scripts_demo_prints_the_succeeded_diamond() -> None:
    result = subprocess.run(
        ["bash", "scripts/demo"],
        cwd=ROOT,
        env=base_env({"TRELLIS_DEMO_PORT": str(free_port())}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status    SUCCEEDED" in result.stdout
    assert 'output    {"sum": 15}' in result.stdout
