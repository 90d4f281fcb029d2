"""The `trellis` command line, run as a real process against a coordinator's address.

- ``trellis(address, *args, api_key=...)``: the finished process (exit code, stdout,
  stderr), sending the admin key unless ``api_key`` names another credential;
- ``cli(address, *args)``: the same when it must succeed: its stdout;
- ``one_line_error(result, *fragments)``: a failure reported on one line of stderr;
- ``trellis_cli(address, *args)``: ``trellis`` without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass

from tests.support.procs import ROOT, base_env


def trellis(
    address: str, *args: str, api_key: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``api_key``: the credential to send (default: the test coordinators' admin key)."""
    return subprocess.run(
        [sys.executable, "-m", "trellis.cli", "--address", address, *args],
        env=base_env({"TRELLIS_API_KEY": api_key} if api_key is not None else None),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def cli(address: str, *args: str, api_key: str | None = None) -> str:
    done = trellis(address, *args, api_key=api_key)
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


async def trellis_cli(address: str, *args: str) -> CliResult:
    """Runs ``python -m trellis.cli --address ADDRESS ARGS...`` without blocking the loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trellis.cli",
        "--address",
        address,
        *args,
        env=base_env(),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())
