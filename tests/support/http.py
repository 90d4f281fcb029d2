"""Plain HTTP against the gateway process: JSON GETs, and waiting for an endpoint's status."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.support.procs import Proc


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def until(url: str, status: int, proc: Proc, within: float = 30.0) -> dict[str, object]:
    import time

    deadline = time.monotonic() + within
    last: tuple[int, object] | None = None
    while time.monotonic() < deadline:
        assert proc.popen.poll() is None, proc.output()
        try:
            code, body = get(url)
        except OSError as exc:  # not listening yet
            last = (0, str(exc))
        else:
            if code == status:
                return body
            last = (code, body)
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered {status}; last {last}\n{proc.output()}")
