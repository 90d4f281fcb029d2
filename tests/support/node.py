"""The Node.js example worker (examples/node-worker) as a real process.

``node_with_dependencies()`` finds ``node`` and runs ``npm ci`` in examples/node-worker when
its node_modules is missing or older than package-lock.json; without Node.js and npm the
calling test skips, unless CI=true, which makes it fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.procs import ROOT, Proc, base_env, spawn

NODE_DIR = ROOT / "examples/node-worker"


def node_with_dependencies() -> str:
    """The ``node`` executable, with examples/node-worker's dependencies installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        message = (
            "the Node worker tests need Node.js 18+ and npm on PATH (examples/node-worker); "
            "CI=true makes them mandatory"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    installed = NODE_DIR / "node_modules/.package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"npm ci in {NODE_DIR} failed:\n{result.stdout}\n{result.stderr}")
    return node


def spawn_node_worker(node: str, address: str, log_dir: Path, name: str, **env: str) -> Proc:
    """``node examples/node-worker/main.js`` with ``WORKER_ID=name`` and ``env``."""
    return spawn(
        name,
        [node, str(NODE_DIR / "main.js")],
        base_env({"TRELLIS_ADDRESS": address, "WORKER_ID": name, **env}),
        log_dir,
    )
