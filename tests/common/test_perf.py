"""PerformanceMonitor: running totals and windowed figures (1 and 5 minutes) on an injected
clock, bounded memory, and the trace id on the slow-operation log line."""

from __future__ import annotations

import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.common.perf import (
    BUCKET_SECONDS,
    RING_SIZE,
    WINDOWS,
    PerformanceMonitor,
    WindowedOperation,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def by_name(ops: list[WindowedOperation]) -> dict[str, WindowedOperation]:
    return {op.name: op for op in ops}


def record_mix(perf: PerformanceMonitor) -> None:
    """10 calls of "db.query": 2 failed, 1 slow; 1 call of "cache.get"."""
    for i in range(10):
        perf.record("db.query", 2000.0 if i == 0 else 10.0, failed=i in (3, 7))
    perf.record("cache.get", 1.0)


def test_windows_are_one_and_five_minutes() -> None:
    assert WINDOWS == (60, 300)
    assert max(WINDOWS) == RING_SIZE * BUCKET_SECONDS


def test_counts_errors_and_slow_land_in_both_windows() -> None:
    perf = PerformanceMonitor(1000.0, clock=FakeClock())
    record_mix(perf)
    for window in WINDOWS:
        ops = perf.windowed(window)
        assert [op.name for op in ops] == ["cache.get", "db.query"]
        db = by_name(ops)["db.query"]
        assert (db.window_seconds, db.count, db.errors, db.slow) == (window, 10, 2, 1)
        assert db.error_rate == pytest.approx(0.2)
        assert db.avg_ms == pytest.approx((2000.0 + 9 * 10.0) / 10)
        assert db.max_ms == 2000.0
        assert db.rate_per_second == pytest.approx(10 / window)


def test_the_one_minute_window_empties_after_61_seconds_the_five_minute_one_keeps_them() -> None:
    clock = FakeClock()
    perf = PerformanceMonitor(1000.0, clock=clock)
    record_mix(perf)
    clock.now += 61
    minute = by_name(perf.windowed(60))
    assert minute["db.query"] == WindowedOperation("db.query", 60, 0, 0, 0, 0.0, 0.0, 0.0)
    assert minute["db.query"].error_rate == 0.0
    assert minute["db.query"].rate_per_second == 0.0
    assert minute["cache.get"].count == 0  # still listed, so a report shows it recovered
    five = by_name(perf.windowed(300))["db.query"]
    assert (five.count, five.errors, five.slow) == (10, 2, 1)


def test_both_windows_are_empty_after_301_seconds_but_totals_remain() -> None:
    clock = FakeClock()
    perf = PerformanceMonitor(1000.0, clock=clock)
    record_mix(perf)
    clock.now += 301
    for window in WINDOWS:
        ops = perf.windowed(window)
        assert [op.name for op in ops] == ["cache.get", "db.query"]
        assert all(op.count == op.errors == op.slow == 0 for op in ops)
        assert all(op.error_rate == 0.0 and op.p95_ms == 0.0 for op in ops)
    totals = {t.name: t for t in perf.snapshot()}
    assert (totals["db.query"].count, totals["db.query"].errors, totals["db.query"].slow) == (
        10,
        2,
        1,
    )


def test_only_recent_calls_count_in_the_one_minute_window() -> None:
    clock = FakeClock()
    perf = PerformanceMonitor(1000.0, clock=clock)
    perf.record("op", 5.0, failed=True)
    clock.now += 120
    perf.record("op", 5.0)
    perf.record("op", 5.0)
    minute = perf.windowed(60)[0]
    assert (minute.count, minute.errors) == (2, 0)
    five = perf.windowed(300)[0]
    assert (five.count, five.errors) == (3, 1)
    assert five.error_rate == pytest.approx(1 / 3)


def test_a_bucket_slot_reused_after_a_lap_of_the_ring_forgets_its_old_calls() -> None:
    clock = FakeClock(0.0)
    perf = PerformanceMonitor(1000.0, clock=clock)
    perf.record("op", 5.0)
    clock.now += RING_SIZE * BUCKET_SECONDS  # same slot, next lap
    perf.record("op", 7.0)
    five = perf.windowed(300)[0]
    assert (five.count, five.avg_ms, five.max_ms) == (1, 7.0, 7.0)


def test_avg_and_p95_of_a_known_distribution() -> None:
    clock = FakeClock()
    perf = PerformanceMonitor(10_000.0, clock=clock)
    for ms in range(1, 101):
        perf.record("op", float(ms))
        clock.now += 0.5  # spread over several buckets
    for window in WINDOWS:
        op = perf.windowed(window)[0]
        assert op.count == 100
        assert op.avg_ms == pytest.approx(50.5)
        assert op.max_ms == 100.0
        assert op.p95_ms == pytest.approx(95.0, rel=0.2)
        assert op.p95_ms >= 95.0  # an upper bound of the bucket holding the 95th call


def test_p95_is_clipped_to_the_window_max() -> None:
    perf = PerformanceMonitor(clock=FakeClock())
    for _ in range(20):
        perf.record("op", 3.0)
    op = perf.windowed(60)[0]
    assert op.p95_ms == 3.0
    perf.record("huge", 10_000_000.0)  # beyond the last histogram bound
    assert by_name(perf.windowed(60))["huge"].p95_ms == 10_000_000.0


def test_windows_out_of_range_are_refused() -> None:
    perf = PerformanceMonitor(clock=FakeClock())
    for window in (0, -1, 301):
        with pytest.raises(ValueError, match="window_seconds"):
            perf.windowed(window)


def test_memory_is_bounded_whatever_the_traffic() -> None:
    clock = FakeClock(0.0)
    perf = PerformanceMonitor(10_000.0, clock=clock)
    perf.record("op", 1.0)
    ring = perf._rings["op"]
    assert len(ring) == RING_SIZE
    histogram_sizes = {len(bucket.histogram) for bucket in ring}
    for i in range(1, 100_000):  # 100 calls a second for 1000 s
        clock.now = i / 100
        perf.record("op", float(i % 50))
    assert perf._rings["op"] is ring
    assert len(ring) == RING_SIZE
    assert {len(bucket.histogram) for bucket in ring} == histogram_sizes
    assert perf.windowed(300)[0].count == 30_000  # 30 full buckets of 1000 calls
    assert perf.windowed(60)[0].count == 6_000
    assert perf.windowed(60)[0].rate_per_second == pytest.approx(100.0)
    assert perf.snapshot()[0].count == 100_000


async def test_track_lands_in_the_windows() -> None:
    perf = PerformanceMonitor(clock=FakeClock())
    async with perf.track("ok"):
        pass
    with pytest.raises(RuntimeError):
        async with perf.track("boom"):
            raise RuntimeError("boom")
    ops = by_name(perf.windowed(60))
    assert (ops["ok"].count, ops["ok"].errors) == (1, 0)
    assert (ops["boom"].count, ops["boom"].errors) == (1, 1)


def test_the_slow_log_line_carries_the_current_trace_id(caplog: pytest.LogCaptureFixture) -> None:
    tracer = TracerProvider().get_tracer(__name__)  # local: the global provider stays as it is
    span = tracer.start_span("request")
    perf = PerformanceMonitor(100.0, clock=FakeClock())
    with (
        caplog.at_level(logging.WARNING, logger="services.common.perf"),
        trace.use_span(span, end_on_exit=True),
    ):
        perf.record("db.query", 50.0)  # not slow: no line
        perf.record("db.query", 250.04)
    [line] = caplog.records
    assert line.getMessage() == "slow operation"
    assert line.__dict__["operation"] == "db.query"
    assert line.__dict__["elapsed_ms"] == 250.0
    trace_id = line.__dict__["trace_id"]
    assert trace_id == format(span.get_span_context().trace_id, "032x")
    assert len(trace_id) == 32
    assert int(trace_id, 16) != 0


def test_the_slow_log_line_outside_a_span_has_an_empty_trace_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    perf = PerformanceMonitor(100.0, clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger="services.common.perf"):
        perf.record("db.query", 250.0)
    [line] = caplog.records
    assert line.getMessage() == "slow operation"
    assert line.__dict__["trace_id"] == ""
    assert by_name(perf.windowed(60))["db.query"].slow == 1
