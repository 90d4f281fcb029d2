"""Cron expressions in an IANA time zone (croniter), validated once, evaluated with ``now``
passed in. The one place that imports croniter (the service layer imports only stdlib and
``coordinator``).

Accepted forms: 5 fields ``minute hour day-of-month month day-of-week``; 6 fields with a
leading seconds field ``second minute hour day-of-month month day-of-week``; and the
macros ``@yearly @annually @monthly @weekly @daily @midnight @hourly``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterError, croniter

from coordinator.errors import InvalidArgument

_ONE_SECOND = timedelta(seconds=1)
_MACROS = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)


@dataclass(frozen=True)
class Cron:
    expression: str
    timezone: str  # IANA name; "UTC" by default

    @classmethod
    def parse(cls, expression: str, timezone: str = "") -> Cron:
        """Validate ``expression`` and ``timezone``; raise ``InvalidArgument`` naming them."""
        expression = " ".join(expression.split())
        timezone = timezone.strip() or "UTC"
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidArgument(
                f"timezone {timezone!r} is not a known IANA time zone; use a name such as "
                "UTC, Europe/Paris or America/New_York"
            ) from None
        fields = expression.split(" ")
        if not expression or (len(fields) not in (5, 6) and expression.lower() not in _MACROS):
            raise InvalidArgument(
                f"cron {expression!r} must have 5 fields (minute hour day-of-month month "
                "day-of-week) or 6 with a leading seconds field, e.g. '*/15 * * * *' or "
                "'*/10 * * * * *'"
            )
        cron = cls(expression, timezone)
        try:
            cron.next_after(datetime.now(UTC))
        except InvalidArgument:
            raise
        except (CroniterError, ValueError, KeyError) as exc:
            raise InvalidArgument(f"cron {expression!r} is not valid: {exc}") from exc
        return cron

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def _iter(self, start: datetime, *, backwards: bool = False) -> croniter:
        return croniter(
            self.expression,
            start.astimezone(self.zone),
            second_at_beginning=True,
            is_prev=backwards,
        )

    def next_after(self, moment: datetime) -> datetime:
        """The first fire time strictly after ``moment`` (UTC)."""
        try:
            value = self._iter(moment).get_next(datetime)
        except CroniterBadCronError as exc:
            raise InvalidArgument(f"cron {self.expression!r} is not valid: {exc}") from exc
        except CroniterError as exc:
            raise InvalidArgument(
                f"cron {self.expression!r} never fires (after {moment.isoformat()}): {exc}"
            ) from exc
        return _utc(value)

    def times_back(self, until: datetime, since: datetime, limit: int) -> list[datetime]:
        """Fire times ``t`` with ``since <= t <= until``, newest first, at most ``limit``."""
        found: list[datetime] = []
        if until < since or limit <= 0:
            return found
        # Start just after ``until`` so a fire time equal to it is included.
        it = self._iter(until.replace(microsecond=0) + _ONE_SECOND, backwards=True)
        while len(found) < limit:
            try:
                t = _utc(it.get_prev(datetime))
            except CroniterError:
                break
            if t > until:
                continue
            if t < since:
                break
            found.append(t)
        return found


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)
