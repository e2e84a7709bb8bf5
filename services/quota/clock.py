"""When a quota day starts and ends: quotas reset at midnight in one configured IANA zone.

The clock is injectable (`now`) so tests can stand on either side of a midnight. Days are not
always 24 h long (DST makes 23 h and 25 h days), so a day's bounds are computed from local
midnights, never by adding 24 h. Where a zone skips midnight (a DST gap at 00:00), zoneinfo
maps the missing 00:00 to the transition instant, which is exactly when that day begins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo


def system_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class QuotaWindow:
    """The quota day containing `now`: [starts_at, resets_at), all instants in UTC."""

    day: date
    starts_at: datetime
    resets_at: datetime
    now: datetime

    @property
    def seconds_until_reset(self) -> float:
        return max(0.0, (self.resets_at - self.now).total_seconds())


class QuotaClock:
    def __init__(self, zone: str | ZoneInfo = "UTC", now: Callable[[], datetime] = system_now):
        self.zone = zone if isinstance(zone, ZoneInfo) else ZoneInfo(zone)
        self._now = now

    def now(self) -> datetime:
        """The current instant, timezone-aware in UTC (a naive clock is taken as UTC)."""
        current = self._now()
        if current.tzinfo is None:
            return current.replace(tzinfo=UTC)
        return current.astimezone(UTC)

    def day_of(self, instant: datetime) -> date:
        """The quota day an instant belongs to."""
        return instant.astimezone(self.zone).date()

    def midnight(self, day: date) -> datetime:
        """The instant (UTC) when `day` begins in the zone."""
        return datetime.combine(day, time.min, tzinfo=self.zone).astimezone(UTC)

    def window(self, at: datetime | None = None) -> QuotaWindow:
        now = self.now() if at is None else at.astimezone(UTC)
        day = self.day_of(now)
        return QuotaWindow(
            day=day,
            starts_at=self.midnight(day),
            resets_at=self.midnight(day + timedelta(days=1)),
            now=now,
        )
