"""A circuit breaker for asyncio callers, with permits.

After `failure_threshold` consecutive failures the breaker opens and refuses calls at once.
It stays open for `reset_timeout` seconds, or for the longest Retry-After the upstream sent
during the failures that opened it when that is longer (capped at `max_open_seconds`). Then
it is half-open: at most `half_open_attempts` probes may be in flight at once, the others are
refused as if it were open; `half_open_attempts` probe successes close it, and any probe
failure opens it again for the full duration.

Callers ask for a `Permit` before each call (`try_acquire()`, None means fail fast) and settle
it exactly once: `success()`, `failure(retry_after)`, or `release()` when the call ended with
no verdict on the upstream (cancelled, or an error the request itself caused). A permit
remembers the breaker's generation (as in gobreaker): every state change starts a new one,
and a permit from an older generation that settles late only counts in the totals, so a slow
call started while closed cannot close, open or re-open the breaker after the fact.

Reading the breaker (`state`, `allow()`, `retry_after()`, `snapshot()`, the Prometheus state
gauge) never changes it: an open breaker whose time is up reads as half-open, and the
transition itself happens on the next `try_acquire()`.

Single-threaded asyncio only: there are no locks and no awaits in here, so every method runs
to completion without interleaving.

Hand-written rather than taken from a library: pybreaker is synchronous (its only async
support goes through Tornado) and aiobreaker, its asyncio fork, has had no commit since
2021; both wrap calls as decorators, let any number of calls through half-open, and keep a
fixed reset timeout. We need a limit on concurrent half-open probes, an open time that honours
the upstream's Retry-After, generations so late results cannot flip the state, and pure reads
for health checks and metrics.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType

from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# What retry_after() answers while the breaker is half-open and every probe slot is taken:
# no call is admitted now, but one may be as soon as any probe finishes, which is usually soon.
HALF_OPEN_BUSY_RETRY_AFTER = 1.0

_STATE_VALUE = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}

TRANSITIONS = Counter(
    "genmesh_circuit_breaker_transitions",
    "Circuit breaker state changes, by breaker and the state it changed to.",
    ["breaker", "to_state"],
)
STATE = Gauge(
    "genmesh_circuit_breaker_state",
    "Circuit breaker state as read at scrape time: 0 closed, 1 half-open, 2 open.",
    ["breaker"],
)

TransitionHook = Callable[[str, BreakerState, BreakerState], None]


@dataclass(frozen=True)
class BreakerSnapshot:
    name: str
    state: BreakerState
    failures: int  # all failures ever reported, late ones included
    successes: int  # all successes ever reported, late ones included
    last_failure_time: float | None  # wall clock (time.time()) of the last failure
    retry_after_seconds: float
    consecutive_failures: int  # failures since the last success (late results not counted)
    probes_in_flight: int  # half-open probes admitted and not yet settled
    opened_total: int  # how many times the breaker has opened


class Permit:
    """Permission to make one call through a breaker. Settle it exactly once: `success()`,
    `failure(retry_after)` or `release()`; only the first of these counts, the rest do
    nothing. Use it as a context manager (`with permit:`) so that a call that ends without a
    verdict, e.g. by cancellation, releases it; a half-open probe slot is otherwise held until
    the permit is settled (or, as a last resort, garbage-collected)."""

    __slots__ = ("_breaker", "_generation", "_probe", "_settled")

    def __init__(self, breaker: CircuitBreaker, generation: int, probe: bool) -> None:
        self._breaker = breaker
        self._generation = generation
        self._probe = probe
        self._settled = False

    @property
    def probe(self) -> bool:
        """True when this permit holds one of the half-open probe slots."""
        return self._probe

    @property
    def settled(self) -> bool:
        return self._settled

    def success(self) -> bool:
        """The call succeeded. Returns True when this success closed the breaker."""
        if self._settled:
            return False
        self._settled = True
        return self._breaker._settle_success(self)

    def failure(self, retry_after: float | None = None) -> bool:
        """The call failed in a way that counts against the upstream; `retry_after` is the
        upstream's Retry-After in seconds, if it sent one. Returns True when this failure
        opened (or re-opened) the breaker."""
        if self._settled:
            return False
        self._settled = True
        return self._breaker._settle_failure(self, retry_after)

    def release(self) -> None:
        """The call ended without a verdict on the upstream (cancelled, or the request's own
        fault): frees the probe slot, if it held one, and changes nothing else."""
        if self._settled:
            return
        self._settled = True
        self._breaker._settle_release(self)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # The backstop for a caller that forgot to settle: never hold a probe slot forever.
        if not self._settled:
            with contextlib.suppress(Exception):
                self.release()
                log.warning(
                    "circuit breaker %s: a permit was dropped unsettled", self._breaker.name
                )

    def __repr__(self) -> str:
        return (
            f"Permit(breaker={self._breaker.name!r}, generation={self._generation}, "
            f"probe={self._probe}, settled={self._settled})"
        )


class CircuitBreaker:
    """See the module docstring. `max_open_seconds` caps how long a Retry-After can hold the
    breaker open (it never shortens `reset_timeout`). `clock` is monotonic seconds (tests pass
    a fake one). `on_transition(name, from_state, to_state)` is called after every real state
    change (an exception from it is logged and otherwise ignored)."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        reset_timeout: float = 60.0,
        half_open_attempts: int = 3,
        max_open_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        on_transition: TransitionHook | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if half_open_attempts < 1:
            raise ValueError("half_open_attempts must be at least 1")
        if not reset_timeout >= 0:
            raise ValueError("reset_timeout must not be negative")
        if not max_open_seconds > 0:
            raise ValueError("max_open_seconds must be positive")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.half_open_attempts = half_open_attempts
        self.max_open_seconds = max_open_seconds
        self._clock = clock
        self._on_transition = on_transition

        self._state = BreakerState.CLOSED
        self._generation = 0
        # Closed: the current streak of failures and the longest Retry-After among them.
        self._consecutive_failures = 0
        self._streak_retry_after = 0.0
        # Open: until when (on `clock`).
        self._open_until = 0.0
        # Half-open: probes admitted and not settled, and probe successes so far.
        self._probes_in_flight = 0
        self._probe_successes = 0
        # Totals, across generations.
        self._total_failures = 0
        self._total_successes = 0
        self._opened_total = 0
        self._last_failure_wall: float | None = None

        # Replaces the function of an earlier breaker of the same name: the newest one wins.
        STATE.labels(name).set_function(self._state_value)

    # -- pure reads ------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The state as a caller sees it now; an open breaker whose time is up reads as
        half-open (the transition itself waits for the next `try_acquire()`)."""
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            return BreakerState.HALF_OPEN
        return self._state

    def _probes_now(self) -> int:
        # An open breaker has no probes in flight, whether or not its time is up.
        return self._probes_in_flight if self._state is BreakerState.HALF_OPEN else 0

    def allow(self) -> bool:
        """True when `try_acquire()` would admit a call now. Changes nothing."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN:
            return self._probes_now() < self.half_open_attempts
        return False

    def retry_after(self) -> float:
        """Seconds until a call would be admitted: the rest of the open time while open,
        HALF_OPEN_BUSY_RETRY_AFTER while half-open with every probe slot taken, else 0."""
        if self._state is BreakerState.OPEN:
            remaining = self._open_until - self._clock()
            if remaining > 0:
                return remaining
        if self.allow():
            return 0.0
        return HALF_OPEN_BUSY_RETRY_AFTER

    def snapshot(self) -> BreakerSnapshot:
        return BreakerSnapshot(
            name=self.name,
            state=self.state,
            failures=self._total_failures,
            successes=self._total_successes,
            last_failure_time=self._last_failure_wall,
            retry_after_seconds=self.retry_after(),
            consecutive_failures=self._consecutive_failures,
            probes_in_flight=self._probes_now(),
            opened_total=self._opened_total,
        )

    def _state_value(self) -> float:
        return _STATE_VALUE[self.state]

    # -- admission -------------------------------------------------------------------------

    def try_acquire(self) -> Permit | None:
        """A permit for one call, or None: the breaker is open, or half-open with every probe
        slot taken, and the caller should fail fast (see `retry_after()`)."""
        if self._state is BreakerState.OPEN:
            if self._clock() < self._open_until:
                return None
            self._transition(BreakerState.HALF_OPEN)
        if self._state is BreakerState.CLOSED:
            return Permit(self, self._generation, probe=False)
        if self._probes_in_flight >= self.half_open_attempts:
            return None
        self._probes_in_flight += 1
        return Permit(self, self._generation, probe=True)

    # -- settlement (called by Permit, once per permit) -------------------------------------

    def _settle_success(self, permit: Permit) -> bool:
        self._total_successes += 1
        if permit._generation != self._generation:
            return False  # late: the state it was admitted under is gone
        self._consecutive_failures = 0
        self._streak_retry_after = 0.0
        if not permit.probe:
            return False
        self._probes_in_flight -= 1
        self._probe_successes += 1
        if self._probe_successes >= self.half_open_attempts:
            self._transition(BreakerState.CLOSED)
            return True
        return False

    def _settle_failure(self, permit: Permit, retry_after: float | None) -> bool:
        self._total_failures += 1
        self._last_failure_wall = time.time()
        if permit._generation != self._generation:
            return False
        self._consecutive_failures += 1
        wait = _sane_retry_after(retry_after)
        if permit.probe:
            self._probes_in_flight -= 1
            self._open(wait)
            return True
        self._streak_retry_after = max(self._streak_retry_after, wait)
        if self._consecutive_failures >= self.failure_threshold:
            self._open(self._streak_retry_after)
            return True
        return False

    def _settle_release(self, permit: Permit) -> None:
        if permit.probe and permit._generation == self._generation:
            self._probes_in_flight -= 1

    # -- transitions -----------------------------------------------------------------------

    def _open(self, retry_after: float) -> None:
        """Open for reset_timeout, or for the upstream's Retry-After when longer; the cap
        bounds how far a Retry-After can stretch it, never the configured reset_timeout."""
        duration = max(self.reset_timeout, min(retry_after, self.max_open_seconds))
        self._open_until = self._clock() + duration
        self._opened_total += 1
        self._transition(BreakerState.OPEN)

    def _transition(self, to: BreakerState) -> None:
        from_state = self._state
        self._state = to
        self._generation += 1
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._streak_retry_after = 0.0
        if to is BreakerState.CLOSED:
            self._consecutive_failures = 0
        TRANSITIONS.labels(self.name, to.value).inc()
        log.info("circuit breaker %s: %s -> %s", self.name, from_state.value, to.value)
        if self._on_transition is not None:
            try:
                self._on_transition(self.name, from_state, to)
            except Exception:
                log.exception("circuit breaker %s: the transition hook failed", self.name)


def _sane_retry_after(value: float | None) -> float:
    """A Retry-After in seconds, or 0 for none, a negative one or NaN (infinity is capped
    later by max_open_seconds)."""
    if value is None or math.isnan(value) or value <= 0:
        return 0.0
    return value
