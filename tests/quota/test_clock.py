"""The quota day: midnight in the configured zone, with 23 h and 25 h DST days."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pydantic
import pytest

from services.quota.clock import QuotaClock
from services.quota.settings import QuotaSettings


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def test_utc_day_runs_from_midnight_to_midnight() -> None:
    window = QuotaClock("UTC").window(utc(2025, 6, 15, 13, 30))
    assert window.day == date(2025, 6, 15)
    assert window.starts_at == utc(2025, 6, 15)
    assert window.resets_at == utc(2025, 6, 16)
    assert window.seconds_until_reset == 10.5 * 3600


def test_the_day_boundary_belongs_to_the_new_day() -> None:
    clock = QuotaClock("UTC")
    last_moment = clock.window(utc(2025, 6, 15, 23, 59, 59, 999_999))
    first_moment = clock.window(utc(2025, 6, 16))
    assert last_moment.day == date(2025, 6, 15)
    assert last_moment.resets_at == utc(2025, 6, 16)
    assert first_moment.day == date(2025, 6, 16)
    assert first_moment.starts_at == utc(2025, 6, 16)
    assert first_moment.resets_at == utc(2025, 6, 17)


def test_injected_clock_is_used_and_naive_times_are_utc() -> None:
    now = datetime(2025, 1, 1, 12)  # naive
    clock = QuotaClock("UTC", now=lambda: now)
    assert clock.now() == utc(2025, 1, 1, 12)
    assert clock.window().day == date(2025, 1, 1)


def test_non_utc_zone_resets_at_local_midnight() -> None:
    clock = QuotaClock("America/New_York")
    # 03:00 UTC on June 15 is 23:00 EDT on June 14.
    window = clock.window(utc(2025, 6, 15, 3))
    assert window.day == date(2025, 6, 14)
    assert window.starts_at == utc(2025, 6, 14, 4)
    assert window.resets_at == utc(2025, 6, 15, 4)
    assert window.seconds_until_reset == 3600
    # An hour later it is the next local day.
    assert clock.window(utc(2025, 6, 15, 4)).day == date(2025, 6, 15)


def test_spring_forward_day_is_23_hours() -> None:
    window = QuotaClock("America/New_York").window(utc(2025, 3, 9, 17))
    assert window.day == date(2025, 3, 9)
    assert window.starts_at == utc(2025, 3, 9, 5)  # midnight EST
    assert window.resets_at == utc(2025, 3, 10, 4)  # midnight EDT
    assert window.resets_at - window.starts_at == timedelta(hours=23)


def test_fall_back_day_is_25_hours() -> None:
    window = QuotaClock("America/New_York").window(utc(2025, 11, 2, 17))
    assert window.day == date(2025, 11, 2)
    assert window.starts_at == utc(2025, 11, 2, 4)  # midnight EDT
    assert window.resets_at == utc(2025, 11, 3, 5)  # midnight EST
    assert window.resets_at - window.starts_at == timedelta(hours=25)


def test_a_skipped_midnight_starts_the_day_at_the_transition() -> None:
    # Cuba moved its clocks from 00:00 to 01:00 on 2025-03-09: that day had no midnight.
    clock = QuotaClock("America/Havana")
    assert clock.midnight(date(2025, 3, 9)) == utc(2025, 3, 9, 5)
    before = clock.window(utc(2025, 3, 9, 4, 59, 59))
    after = clock.window(utc(2025, 3, 9, 5))
    assert before.day == date(2025, 3, 8)
    assert before.resets_at == after.starts_at == utc(2025, 3, 9, 5)
    assert after.day == date(2025, 3, 9)


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "America/Havana", "Asia/Kolkata"])
def test_every_instant_lies_in_its_window(zone: str) -> None:
    clock = QuotaClock(zone)
    instant = utc(2025, 3, 1)
    previous = clock.window(instant)
    while instant < utc(2025, 11, 15):
        window = clock.window(instant)
        assert window.starts_at <= instant < window.resets_at
        assert window.day == instant.astimezone(clock.zone).date()
        # Consecutive days tile time without gaps or overlaps.
        if window.day != previous.day:
            assert window.starts_at == previous.resets_at
        previous = window
        instant += timedelta(minutes=30)


def test_settings_reject_an_unknown_zone() -> None:
    with pytest.raises(pydantic.ValidationError, match="unknown IANA time zone"):
        QuotaSettings(QUOTA_TIMEZONE="Mars/Olympus_Mons")
    assert QuotaSettings(QUOTA_TIMEZONE="Europe/Paris").quota_timezone == "Europe/Paris"


def test_settings_defaults() -> None:
    settings = QuotaSettings()
    assert settings.grpc_port == 50052
    assert settings.quota_timezone == "UTC"
    assert (settings.guest_daily_limit, settings.free_daily_limit) == (3, 10)
    assert settings.pro_daily_limit == 100
    assert settings.profile_cache_ttl_seconds == 60
