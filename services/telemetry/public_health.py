"""The public view of the system health behind /api/health: the overall status and when it was
checked, nothing else (no dependency names, addresses or error text), from a result at most
about HEALTH_CACHE_SECONDS old.

Anyone can call /api/health, so it must not be a way to load the stores: callers arriving while
a check runs await that same check, and callers within the freshness window of the last check
get its result without a new one. A check therefore starts at most once per window (or, when
a check takes longer than the window, once at a time). A check that fails or outlives its
deadline answers "unhealthy", which is cached like any other result, so neither wedges nor
floods later callers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.telemetry.health import HealthReport, Status

log = logging.getLogger(__name__)

# The only statuses the public answer may carry; anything else reads as unhealthy.
PUBLIC_STATUSES = frozenset({Status.HEALTHY, Status.DEGRADED, Status.UNHEALTHY})


@dataclass(frozen=True)
class PublicHealth:
    status: Status
    # Unix seconds: when the check this answer comes from started.
    checked_at: float


class CachedHealth:
    def __init__(
        self,
        check: Callable[[], Awaitable[HealthReport]],
        *,
        max_age_seconds: float = 1.0,
        deadline_seconds: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`check` is the full report (SystemHealth.report: the same computation as the admin
        report, whose status this answers); `deadline_seconds` bounds it, behind the report's
        own hard deadline (HEALTH_REPORT_DEADLINE_SECONDS); `clock` is monotonic (tests move
        it)."""
        self._check = check
        self.max_age_seconds = max_age_seconds
        self.deadline_seconds = deadline_seconds
        self._clock = clock
        self._last: PublicHealth | None = None
        self._fresh_until = 0.0
        self._running: asyncio.Task[PublicHealth] | None = None

    async def current(self) -> PublicHealth:
        if self._last is not None and self._clock() < self._fresh_until:
            return self._last
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._refresh(), name="public-health")
        # Shielded: one caller going away must not cancel the check the others wait for.
        return await asyncio.shield(self._running)

    async def _refresh(self) -> PublicHealth:
        # The result's age counts from the start of its check.
        started = self._clock()
        checked_at = time.time()
        try:
            async with asyncio.timeout(self.deadline_seconds):
                report = await self._check()
        except TimeoutError:
            log.warning("the health check took longer than %gs", self.deadline_seconds)
            result = PublicHealth(Status.UNHEALTHY, checked_at)
        except Exception:  # whatever went wrong, the caller only learns "unhealthy"
            log.exception("the health check failed")
            result = PublicHealth(Status.UNHEALTHY, checked_at)
        else:
            status = report.status if report.status in PUBLIC_STATUSES else Status.UNHEALTHY
            result = PublicHealth(status, report.checked_at)
        self._last = result
        self._fresh_until = started + self.max_age_seconds
        return result
