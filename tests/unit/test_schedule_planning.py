"""Cron parsing and the scheduler's pure decisions: catch-up and overlap, time passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from coordinator.cron import Cron
from coordinator.errors import InvalidArgument
from coordinator.model import CatchupPolicy, FireOutcome, OverlapPolicy
from coordinator.service._schedules import apply_overlap, fire_key, plan_fires

T0 = datetime(2030, 1, 1, tzinfo=UTC)
HOURLY = Cron.parse("0 * * * *")


def at(hours: float = 0, seconds: float = 0) -> datetime:
    return T0 + timedelta(hours=hours, seconds=seconds)


def test_five_and_six_field_crons_and_time_zones() -> None:
    assert Cron.parse("*/15 * * * *").next_after(T0) == at(seconds=15 * 60)
    assert Cron.parse("*/10 * * * * *").next_after(T0) == at(seconds=10)  # leading seconds
    assert Cron.parse("@hourly").next_after(T0) == at(1)
    # 02:00 in Paris is 01:00 UTC in winter.
    assert Cron.parse("0 2 * * *", "Europe/Paris").next_after(T0) == at(1)
    # Spring forward: 2030-03-31 has no 02:30 in Paris; the next fire is a real instant.
    spring = Cron.parse("30 2 * * *", "Europe/Paris")
    nxt = spring.next_after(datetime(2030, 3, 30, 12, tzinfo=UTC))
    assert nxt.tzinfo is not None and nxt > datetime(2030, 3, 30, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "timezone", "fragment"),
    [
        ("61 * * * *", "", "not valid"),
        ("* * *", "", "5 fields"),
        ("* * * * * * *", "", "5 fields"),
        ("0 0 31 2 *", "", "never fires"),
        ("0 * * * *", "Not/AZone", "IANA"),
    ],
)
def test_bad_cron_or_zone_is_invalid_argument(
    expression: str, timezone: str, fragment: str
) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        Cron.parse(expression, timezone)


def test_nothing_due_before_the_next_fire_time() -> None:
    plan = plan_fires(HOURLY, at(1), at(0.5), CatchupPolicy.RUN_ALL, 100)
    assert plan.due == () and plan.next_fire_at == at(1)


def test_an_on_time_fire_runs_whatever_the_catch_up_policy() -> None:
    for policy in CatchupPolicy:
        plan = plan_fires(HOURLY, at(1), at(1, seconds=2), policy, 100)
        assert plan.due == (at(1),) and plan.missed == 0 and plan.next_fire_at == at(2)


@pytest.mark.parametrize(
    ("policy", "limit", "due", "missed"),
    [
        (CatchupPolicy.SKIP_MISSED, 100, [], 3),
        (CatchupPolicy.RUN_ONCE, 100, [3], 2),
        (CatchupPolicy.RUN_ALL, 100, [1, 2, 3], 0),
        (CatchupPolicy.RUN_ALL, 2, [2, 3], 1),
    ],
)
def test_catch_up_after_downtime(
    policy: CatchupPolicy, limit: int, due: list[int], missed: int
) -> None:
    plan = plan_fires(HOURLY, at(1), at(3.5), policy, limit)
    assert plan.due == tuple(at(h) for h in due)
    assert plan.missed == missed
    assert plan.next_fire_at == at(4)


def test_missed_and_on_time_fires_together() -> None:
    every_second = Cron.parse("* * * * * *")
    plan = plan_fires(every_second, at(seconds=1), at(seconds=60), CatchupPolicy.SKIP_MISSED, 5)
    # 1..44 s are more than 15 s late (missed); 45..60 are on time.
    assert plan.due == tuple(at(seconds=s) for s in range(45, 61))
    assert plan.missed == 44


def test_overlap_policies() -> None:
    times = [at(1), at(2), at(3)]
    assert apply_overlap(OverlapPolicy.ALLOW, True, False, times) == [
        (t, FireOutcome.STARTED) for t in times
    ]
    assert apply_overlap(OverlapPolicy.SKIP, True, False, times) == [
        (t, FireOutcome.SKIPPED) for t in times
    ]
    assert [o for _, o in apply_overlap(OverlapPolicy.SKIP, False, False, times)] == [
        FireOutcome.STARTED,
        FireOutcome.SKIPPED,
        FireOutcome.SKIPPED,
    ]
    assert [o for _, o in apply_overlap(OverlapPolicy.BUFFER_ONE, False, False, times)] == [
        FireOutcome.STARTED,
        FireOutcome.BUFFERED,
        FireOutcome.SKIPPED,
    ]
    # One fire is buffered already: the next ones are skipped.
    assert [o for _, o in apply_overlap(OverlapPolicy.BUFFER_ONE, True, True, times[:1])] == [
        FireOutcome.SKIPPED
    ]


def test_fire_key_names_the_schedule_and_the_utc_time() -> None:
    assert fire_key("s", at(1)) == "schedule:s:2030-01-01T01:00:00+00:00"
