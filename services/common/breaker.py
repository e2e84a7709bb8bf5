"""A circuit breaker for asyncio callers: after `failure_threshold` consecutive failures it
opens and fails fast for `reset_timeout` seconds, then lets calls through half-open; after
`half_open_successes` successes it closes again, and any half-open failure re-opens it.

Written here rather than taken from pybreaker/aiobreaker: those are synchronous or
unmaintained, and we need the spec's half-open success count and a state snapshot for health.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerSnapshot:
    name: str
    state: BreakerState
    failures: int
    successes: int
    last_failure_time: float | None
    retry_after_seconds: float


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        reset_timeout: float = 60.0,
        half_open_successes: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.half_open_successes = half_open_successes
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._half_open_ok = 0
        self._opened_at = 0.0
        self._total_failures = 0
        self._total_successes = 0
        self._last_failure_wall: float | None = None

    @property
    def state(self) -> BreakerState:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.reset_timeout
        ):
            self._state = BreakerState.HALF_OPEN
            self._half_open_ok = 0
        return self._state

    def allow(self) -> bool:
        """True when a call may go ahead; False means fail fast."""
        return self.state is not BreakerState.OPEN

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a call through again."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.reset_timeout - (self._clock() - self._opened_at))

    def record_success(self) -> None:
        self._total_successes += 1
        self._consecutive_failures = 0
        if self.state is BreakerState.HALF_OPEN:
            self._half_open_ok += 1
            if self._half_open_ok >= self.half_open_successes:
                self._state = BreakerState.CLOSED

    def record_failure(self) -> None:
        self._total_failures += 1
        self._consecutive_failures += 1
        self._last_failure_wall = time.time()
        state = self.state
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self._consecutive_failures >= self.failure_threshold
        ):
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()

    def snapshot(self) -> BreakerSnapshot:
        return BreakerSnapshot(
            name=self.name,
            state=self.state,
            failures=self._total_failures,
            successes=self._total_successes,
            last_failure_time=self._last_failure_wall,
            retry_after_seconds=self.retry_after(),
        )
