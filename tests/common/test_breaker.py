from __future__ import annotations

from services.common.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(
        "t", failure_threshold=5, reset_timeout=60, half_open_successes=3, clock=clock
    )


def test_opens_after_the_threshold_of_consecutive_failures() -> None:
    clock = FakeClock()
    breaker = make(clock)
    for _ in range(4):
        breaker.record_failure()
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_after() == 60


def test_a_success_resets_the_consecutive_count() -> None:
    breaker = make(FakeClock())
    for _ in range(4):
        breaker.record_failure()
    breaker.record_success()
    for _ in range(4):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_half_open_after_the_timeout_then_closes_after_three_successes() -> None:
    clock = FakeClock()
    breaker = make(clock)
    for _ in range(5):
        breaker.record_failure()
    clock.now += 30
    assert breaker.retry_after() == 30
    clock.now += 30
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    breaker.record_success()
    breaker.record_success()
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record_success()
    assert breaker.snapshot().state is BreakerState.CLOSED


def test_a_half_open_failure_reopens() -> None:
    clock = FakeClock()
    breaker = make(clock)
    for _ in range(5):
        breaker.record_failure()
    clock.now += 61
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    snap = breaker.snapshot()
    assert (snap.failures, snap.successes) == (6, 1)
    assert snap.last_failure_time is not None
