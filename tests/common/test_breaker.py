from __future__ import annotations

import itertools
from typing import Any

import pytest
from prometheus_client import REGISTRY

from services.common.breaker import (
    HALF_OPEN_BUSY_RETRY_AFTER,
    BreakerState,
    CircuitBreaker,
    Permit,
    TransitionHook,
)

_names = itertools.count()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def unique_name() -> str:
    """Each breaker its own metric labels, so tests never read each other's samples."""
    return f"test-{next(_names)}"


def make(
    clock: FakeClock,
    *,
    threshold: int = 5,
    attempts: int = 3,
    max_open: float = 600.0,
    hook: TransitionHook | None = None,
) -> CircuitBreaker:
    return CircuitBreaker(
        unique_name(),
        failure_threshold=threshold,
        reset_timeout=60,
        half_open_attempts=attempts,
        max_open_seconds=max_open,
        clock=clock,
        on_transition=hook,
    )


def state(breaker: CircuitBreaker) -> BreakerState:
    """The state read afresh (mypy would otherwise narrow `breaker.state` across calls)."""
    return breaker.state


def admit(breaker: CircuitBreaker) -> Permit:
    permit = breaker.try_acquire()
    assert permit is not None, f"refused in state {breaker.state}"
    return permit


def fail(breaker: CircuitBreaker, times: int = 1, retry_after: float | None = None) -> None:
    for _ in range(times):
        admit(breaker).failure(retry_after)


def open_then_wait(clock: FakeClock, breaker: CircuitBreaker) -> None:
    """Open the breaker and let its time run out: it reads half-open from then on."""
    fail(breaker, breaker.failure_threshold)
    assert state(breaker) is BreakerState.OPEN
    clock.now += breaker.reset_timeout


def transitions(name: str, to_state: str) -> float:
    value = REGISTRY.get_sample_value(
        "genmesh_circuit_breaker_transitions_total", {"breaker": name, "to_state": to_state}
    )
    return value or 0.0


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("genmesh_circuit_breaker_state", {"breaker": name})


# -- closed -> open ------------------------------------------------------------------------------


def test_opens_at_exactly_the_threshold_of_consecutive_failures() -> None:
    breaker = make(FakeClock())
    fail(breaker, 4)
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    last = admit(breaker)
    assert last.failure() is True  # this one opened it
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.try_acquire() is None
    assert breaker.retry_after() == 60
    snap = breaker.snapshot()
    assert (snap.failures, snap.consecutive_failures, snap.opened_total) == (5, 5, 1)
    assert snap.last_failure_time is not None


def test_a_success_resets_the_streak() -> None:
    breaker = make(FakeClock())
    fail(breaker, 4)
    assert breaker.snapshot().consecutive_failures == 4
    assert admit(breaker).success() is False  # closing nothing: it was closed
    assert breaker.snapshot().consecutive_failures == 0
    fail(breaker, 4)
    assert state(breaker) is BreakerState.CLOSED
    fail(breaker)
    assert state(breaker) is BreakerState.OPEN


def test_retry_after_counts_down_with_the_clock() -> None:
    clock = FakeClock()
    breaker = make(clock)
    fail(breaker, 5)
    clock.now += 15
    assert breaker.retry_after() == 45
    clock.now += 44.5
    assert breaker.retry_after() == 0.5
    assert state(breaker) is BreakerState.OPEN
    clock.now += 0.5
    assert breaker.retry_after() == 0
    assert state(breaker) is BreakerState.HALF_OPEN


# -- Retry-After ---------------------------------------------------------------------------------


def test_a_longer_retry_after_keeps_it_open_that_long() -> None:
    clock = FakeClock()
    breaker = make(clock)
    fail(breaker, 2, retry_after=120)  # the longest of the streak counts ...
    fail(breaker, 3, retry_after=90)
    assert breaker.retry_after() == 120
    clock.now += 119
    assert breaker.try_acquire() is None
    clock.now += 1
    assert breaker.try_acquire() is not None


def test_a_retry_after_from_before_a_success_does_not_count() -> None:
    breaker = make(FakeClock())
    fail(breaker, 4, retry_after=300)
    admit(breaker).success()
    fail(breaker, 5)
    assert breaker.retry_after() == 60


def test_retry_after_is_capped_at_max_open_seconds() -> None:
    breaker = make(FakeClock(), max_open=300)
    fail(breaker, 5, retry_after=10_000)
    assert breaker.retry_after() == 300
    other = make(FakeClock(), max_open=300)
    fail(other, 5, retry_after=float("inf"))
    assert other.retry_after() == 300


def test_a_shorter_retry_after_does_not_shorten_the_open_time() -> None:
    breaker = make(FakeClock())
    fail(breaker, 5, retry_after=5)
    assert breaker.retry_after() == 60


@pytest.mark.parametrize("nonsense", [-5.0, float("nan"), 0.0])
def test_nonsense_retry_after_counts_as_none(nonsense: float) -> None:
    breaker = make(FakeClock())
    fail(breaker, 5, retry_after=nonsense)
    assert breaker.retry_after() == 60


# -- pure reads ----------------------------------------------------------------------------------


def test_reading_never_transitions() -> None:
    clock = FakeClock()
    seen: list[tuple[BreakerState, BreakerState]] = []
    breaker = make(clock, hook=lambda _name, a, b: seen.append((a, b)))
    fail(breaker, 5)
    clock.now += 61
    opened = transitions(breaker.name, "half_open")

    for _ in range(3):
        assert state(breaker) is BreakerState.HALF_OPEN
        assert breaker.allow()
        assert breaker.retry_after() == 0
    first, second = breaker.snapshot(), breaker.snapshot()
    assert first == second
    assert first.state is BreakerState.HALF_OPEN
    assert first.probes_in_flight == 0
    assert gauge(breaker.name) == 1.0

    # Nothing moved: no hook call, no counted transition, and still no probe in flight.
    assert seen == [(BreakerState.CLOSED, BreakerState.OPEN)]
    assert transitions(breaker.name, "half_open") == opened
    assert breaker.snapshot().probes_in_flight == 0
    # The transition happens on acquire.
    probe = admit(breaker)
    assert seen[-1] == (BreakerState.OPEN, BreakerState.HALF_OPEN)
    assert breaker.snapshot().probes_in_flight == 1
    probe.release()


# -- half-open -----------------------------------------------------------------------------------


def test_half_open_admits_exactly_n_concurrent_probes() -> None:
    clock = FakeClock()
    breaker = make(clock, attempts=3)
    open_then_wait(clock, breaker)
    probes = [admit(breaker) for _ in range(3)]
    assert all(p.probe for p in probes)
    assert breaker.try_acquire() is None
    assert not breaker.allow()
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.retry_after() == HALF_OPEN_BUSY_RETRY_AFTER
    assert breaker.snapshot().probes_in_flight == 3


def test_a_released_probe_frees_its_slot_and_changes_nothing_else() -> None:
    clock = FakeClock()
    breaker = make(clock, attempts=2)
    open_then_wait(clock, breaker)
    first, _second = admit(breaker), admit(breaker)
    assert breaker.try_acquire() is None
    before = breaker.snapshot()
    first.release()
    after = breaker.snapshot()
    assert after.probes_in_flight == 1
    assert (after.state, after.failures, after.successes) == (
        before.state,
        before.failures,
        before.successes,
    )
    first.release()  # idempotent: frees nothing more
    assert breaker.snapshot().probes_in_flight == 1
    assert breaker.try_acquire() is not None


def test_a_permit_as_a_context_manager_releases_when_left_unsettled() -> None:
    clock = FakeClock()
    breaker = make(clock, attempts=1)
    open_then_wait(clock, breaker)
    with pytest.raises(RuntimeError), admit(breaker):
        assert breaker.snapshot().probes_in_flight == 1
        raise RuntimeError("the request's own fault")
    assert breaker.snapshot().probes_in_flight == 0
    assert state(breaker) is BreakerState.HALF_OPEN

    # A settled permit is not released again on the way out.
    with admit(breaker) as permit:
        assert permit.success() is True
    assert state(breaker) is BreakerState.CLOSED


def test_a_dropped_permit_does_not_hold_its_probe_slot() -> None:
    clock = FakeClock()
    breaker = make(clock, attempts=1)
    open_then_wait(clock, breaker)
    admit(breaker)  # dropped at once, never settled
    assert breaker.snapshot().probes_in_flight == 0
    assert breaker.try_acquire() is not None


def test_n_successes_close_it() -> None:
    clock = FakeClock()
    breaker = make(clock, attempts=3)
    open_then_wait(clock, breaker)
    probes = [admit(breaker) for _ in range(3)]
    assert probes[0].success() is False
    assert probes[1].success() is False
    assert state(breaker) is BreakerState.HALF_OPEN
    assert probes[2].success() is True
    snap = breaker.snapshot()
    assert (snap.state, snap.consecutive_failures, snap.probes_in_flight) == (
        BreakerState.CLOSED,
        0,
        0,
    )
    assert snap.retry_after_seconds == 0


def test_successes_count_across_freed_slots() -> None:
    clock = FakeClock()
    breaker = make(clock, attempts=2)
    open_then_wait(clock, breaker)
    admit(breaker).success()
    assert state(breaker) is BreakerState.HALF_OPEN
    admit(breaker).success()
    assert state(breaker) is BreakerState.CLOSED


def test_one_half_open_failure_reopens_for_the_full_duration() -> None:
    clock = FakeClock()
    breaker = make(clock, attempts=3)
    open_then_wait(clock, breaker)
    good, bad = admit(breaker), admit(breaker)
    good.success()
    clock.now += 10
    assert bad.failure() is True
    assert state(breaker) is BreakerState.OPEN
    assert breaker.retry_after() == 60
    snap = breaker.snapshot()
    assert (snap.failures, snap.successes, snap.opened_total, snap.probes_in_flight) == (
        6,
        1,
        2,
        0,
    )


def test_a_half_open_failure_with_a_longer_retry_after_reopens_that_long() -> None:
    clock = FakeClock()
    breaker = make(clock)
    open_then_wait(clock, breaker)
    admit(breaker).failure(retry_after=200)
    assert breaker.retry_after() == 200


# -- generations ---------------------------------------------------------------------------------


def test_a_stale_closed_permit_settling_late_changes_nothing() -> None:
    clock = FakeClock()
    breaker = make(clock, attempts=1)
    slow_ok, slow_bad = admit(breaker), admit(breaker)  # admitted while closed
    fail(breaker, 5)
    assert state(breaker) is BreakerState.OPEN

    assert slow_ok.success() is False  # a late success does not close it ...
    assert state(breaker) is BreakerState.OPEN
    assert breaker.retry_after() == 60
    clock.now += 60
    probe = admit(breaker)
    assert slow_bad.failure(retry_after=500) is False  # ... nor a late failure re-open it
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.snapshot().probes_in_flight == 1
    # Both still count in the totals.
    snap = breaker.snapshot()
    assert (snap.failures, snap.successes, snap.consecutive_failures) == (6, 1, 5)
    probe.success()
    assert state(breaker) is BreakerState.CLOSED


def test_a_stale_probe_settling_late_changes_nothing() -> None:
    clock = FakeClock()
    breaker = make(clock, attempts=2)
    open_then_wait(clock, breaker)
    first, second = admit(breaker), admit(breaker)
    first.failure()  # re-opens: `second` is now from an older generation
    assert second.failure() is False
    assert second.success() is False  # settled already
    assert breaker.snapshot().opened_total == 2
    clock.now += 60
    a, b = admit(breaker), admit(breaker)
    assert breaker.try_acquire() is None
    a.success()
    b.success()
    assert state(breaker) is BreakerState.CLOSED


def test_only_the_first_settlement_counts() -> None:
    breaker = make(FakeClock(), threshold=2)
    permit = admit(breaker)
    assert permit.success() is False
    assert permit.failure() is False
    permit.release()
    assert permit.settled
    snap = breaker.snapshot()
    assert (snap.successes, snap.failures) == (1, 0)


# -- hook and metrics ----------------------------------------------------------------------------


def test_transitions_call_the_hook_with_from_and_to() -> None:
    clock = FakeClock()
    seen: list[tuple[str, BreakerState, BreakerState]] = []
    breaker = make(clock, attempts=1, hook=lambda *args: seen.append(args))
    open_then_wait(clock, breaker)
    admit(breaker).failure()
    clock.now += 60
    admit(breaker).success()
    c, o, h = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
    assert seen == [(breaker.name, a, b) for a, b in [(c, o), (o, h), (h, o), (o, h), (h, c)]]
    assert transitions(breaker.name, "open") == 2
    assert transitions(breaker.name, "half_open") == 2
    assert transitions(breaker.name, "closed") == 1


def test_a_failing_hook_does_not_break_the_breaker() -> None:
    def hook(_name: str, _from: BreakerState, _to: BreakerState) -> None:
        raise RuntimeError("boom")

    breaker = make(FakeClock(), threshold=1, hook=hook)
    assert admit(breaker).failure() is True
    assert state(breaker) is BreakerState.OPEN


def test_the_state_gauge_reads_the_state_at_scrape_time() -> None:
    clock = FakeClock()
    breaker = make(clock, attempts=1)
    assert gauge(breaker.name) == 0.0
    fail(breaker, 5)
    assert gauge(breaker.name) == 2.0
    clock.now += 60
    assert gauge(breaker.name) == 1.0
    assert breaker.snapshot().probes_in_flight == 0  # scraping changed nothing
    admit(breaker).success()
    assert gauge(breaker.name) == 0.0


def test_a_newer_breaker_of_the_same_name_takes_over_the_gauge() -> None:
    name = unique_name()
    old = CircuitBreaker(name, failure_threshold=1, clock=FakeClock())
    admit(old).failure()
    assert gauge(name) == 2.0
    CircuitBreaker(name, clock=FakeClock())
    assert gauge(name) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 0},
        {"half_open_attempts": 0},
        {"reset_timeout": -1.0},
        {"max_open_seconds": 0.0},
    ],
)
def test_nonsense_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(unique_name(), **kwargs)
