"""A per-second schedule on two coordinator replicas sharing PostgreSQL: every fire time
starts exactly one execution, also across a kill -9 and restart of one replica."""

from __future__ import annotations

import itertools
import signal
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from tests.support.cli import cli
from tests.support.procs import ROOT, spawn_coordinator
from tests.support.wait import wait_for_sync
from worker_sdk import Client

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(120)]

PREFIX = "schedule:tick:"


def fire_times(url: str) -> list[datetime]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT idempotency_key FROM executions WHERE idempotency_key LIKE %s",
            (PREFIX + "%",),
        ).fetchall()
    return sorted(datetime.fromisoformat(key.removeprefix(PREFIX)) for (key,) in rows)


def wait_for_fires(url: str, count: int, within: float = 30.0) -> list[datetime]:
    def enough() -> list[datetime] | None:
        times = fire_times(url)
        return times if len(times) >= count else None

    return wait_for_sync(
        enough,
        timeout=within,
        interval=0.2,
        message=lambda: f"fewer than {count} fires within {within}s: {fire_times(url)}",
    )


async def test_each_fire_time_starts_once_across_replicas_and_a_kill(
    fresh_postgres_url: str, tmp_path: Path
) -> None:
    url = fresh_postgres_url
    a, address_a = spawn_coordinator(url, tmp_path)
    b, address_b = spawn_coordinator(url, tmp_path)
    restarted = None
    try:
        async with Client(address_b) as client:
            await client.register_workflow(ROOT / "examples/diamond.yaml")
        cli(
            address_a,
            "schedules",
            "create",
            "tick",
            "--cron",
            "* * * * * *",
            "--workflow",
            "diamond",
            "--overlap",
            "allow",
        )
        before_kill = len(wait_for_fires(url, 4))
        assert a.stop(signal.SIGKILL) == -signal.SIGKILL
        after_kill = len(wait_for_fires(url, before_kill + 3))
        restarted, _ = spawn_coordinator(url, tmp_path, port=int(address_a.rsplit(":", 1)[1]))
        wait_for_fires(url, after_kill + 4)
        paused = cli(address_b, "schedules", "pause", "tick")
        assert '"paused": true' in paused
    finally:
        exits = [p.stop() for p in (a, b, restarted) if p is not None]
    assert exits[1:] == [0] * (len(exits) - 1), [b.output()]

    times = fire_times(url)
    assert len(times) == len(set(times)), "a fire time started twice"
    gaps = [t for t, u in itertools.pairwise(times) if u - t != timedelta(seconds=1)]
    assert gaps == [], f"fire times missing after {gaps}"
    with psycopg.connect(url) as conn:
        fires = conn.execute("SELECT outcome, count(*) FROM schedule_fires GROUP BY outcome")
        assert dict(fires.fetchall()) == {"STARTED": len(times)}
