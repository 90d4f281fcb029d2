"""Plain HTTP against the gateway process: JSON GETs, and waiting for an endpoint's status."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.support.procs import Proc
from tests.support.wait import WaitTimeout, wait_for_sync


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def post(
    url: str, body: bytes = b"{}", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def until(url: str, status: int, proc: Proc, within: float = 30.0) -> dict[str, object]:
    """The body of ``url`` once it answers ``status``; fails at once if ``proc`` exits."""
    last: list[tuple[int, object]] = [(0, "no answer yet")]

    def answered() -> dict[str, object] | None:
        assert proc.popen.poll() is None, proc.output()
        try:
            code, body = get(url)
        except OSError as exc:  # not listening yet
            last[0] = (0, str(exc))
            return None
        last[0] = (code, body)
        return body if code == status else None

    try:
        return wait_for_sync(answered, timeout=within, interval=0.1)
    except WaitTimeout as exc:
        raise AssertionError(
            f"{url} never answered {status}; last {last[0]}\n{proc.output()}"
        ) from exc
