"""Expires signed-in users' reservations that nobody settled, and prunes settled ones.

A caller (the generation service) reserves a unit before a generation and settles it after.
If it crashes or loses its connection between the two, the settlement never comes and the
`quota_reservations` row would keep its unit used forever. So every replica periodically
expires the reservations still pending after a TTL (longer than any generation): each one is
settled with `Settlement.EXPIRE`, which gives its unit back like a refund (only while the
profile is still on the reservation's quota day) and leaves the row in state 'expired'. A
settlement arriving after that is answered applied=False and changes nothing.

A unit consumed at once (ReserveQuota with `consume`, for a cache hit) is a row born
'committed' with its settled_at: never pending, so never expired, and pruned with the rest.

Expiry is exactly-once even with several replicas sweeping at once: the settle UPDATE is
conditional on state 'reserved', so only one of them (or a late commit/refund racing them)
changes the row and gives the unit back; the others see "already settled".

Settled rows are kept for a retention period, so a late duplicate settlement is still answered
"already settled" rather than "unknown", then deleted in batches, so the table does not grow
without bound. Ages are measured on the database clock (see ProfileStore).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from prometheus_client import Counter

from services.common.periodic import PeriodicJob
from services.quota.profile_cache import ProfileCache
from services.quota.profile_store import ProfileStore
from services.quota.reservations import RESERVATIONS_EXPIRED, Settlement

log = logging.getLogger(__name__)

RESERVATIONS_PRUNED = Counter(
    "genmesh_quota_reservations_pruned_total",
    "Settled reservations deleted after the retention period.",
)


@dataclass(frozen=True)
class SweepResult:
    # Reservations this sweep expired (not those another replica or a settlement got first).
    expired: int
    # Settled reservations this sweep deleted.
    pruned: int


class ReservationSweeper:
    """Runs `sweep_once` every `interval_seconds` in a task between `start` and `stop`.

    `cache`, when given, is invalidated for each user whose reservation expired, so GetQuota
    shows the unit given back at once rather than after the cache's TTL."""

    def __init__(
        self,
        profiles: ProfileStore,
        ttl_seconds: float,
        retention_seconds: float,
        interval_seconds: float,
        batch_size: int = 500,
        *,
        cache: ProfileCache | None = None,
    ) -> None:
        if ttl_seconds <= 0 or retention_seconds < 0 or interval_seconds <= 0 or batch_size < 1:
            raise ValueError(
                "need ttl_seconds > 0, retention_seconds >= 0, interval_seconds > 0, "
                "batch_size >= 1"
            )
        self.profiles = profiles
        self.ttl_seconds = ttl_seconds
        self.retention_seconds = retention_seconds
        self.interval_seconds = interval_seconds
        self.batch_size = batch_size
        self.cache = cache
        self._schedule = PeriodicJob(
            "reservation-sweeper", self._scheduled_sweep, self.interval_seconds
        )

    async def sweep_once(self) -> SweepResult:
        """Expire every reservation pending for longer than the TTL, then delete the rows
        settled longer ago than the retention period. Raises when the database fails (the
        work done before the failure stays done)."""
        expired = await self._expire_stale()
        pruned = await self._prune_settled()
        return SweepResult(expired, pruned)

    async def _expire_stale(self) -> int:
        expired = 0
        seen: set[uuid.UUID] = set()
        while True:
            batch = await self.profiles.stale_reservations(self.ttl_seconds, self.batch_size)
            fresh = [reservation for reservation in batch if reservation not in seen]
            if not fresh:
                # Nothing pending is stale, or only rows this sweep already settled (which a
                # concurrent writer cannot put back to 'reserved'): never loop on them.
                return expired
            for reservation in fresh:
                seen.add(reservation)
                settled = await self.profiles.settle(reservation, Settlement.EXPIRE)
                if settled is None or not settled.applied:
                    continue  # settled (or deleted) meanwhile, by a caller or another replica
                expired += 1
                RESERVATIONS_EXPIRED.labels(store="postgres").inc()
                if self.cache is not None:
                    await self.cache.invalidate(settled.profile.user_id)
            if len(batch) < self.batch_size:
                return expired

    async def _prune_settled(self) -> int:
        pruned = 0
        while True:
            deleted = await self.profiles.prune_settled(self.retention_seconds, self.batch_size)
            pruned += deleted
            RESERVATIONS_PRUNED.inc(deleted)
            if deleted < self.batch_size:
                return pruned

    @property
    def running(self) -> bool:
        """True between `start` and `stop` while the loop is alive."""
        return self._schedule.running

    async def start(self) -> None:
        """Sweep now, then every interval, until `stop`. Does not wait for the first sweep."""
        await self._schedule.start()

    async def stop(self) -> None:
        await self._schedule.stop()

    async def _scheduled_sweep(self) -> None:
        result = await self.sweep_once()
        if result.expired or result.pruned:
            log.info(
                "reservation sweep: %d expired, %d pruned",
                result.expired,
                result.pruned,
                extra={"expired": result.expired, "pruned": result.pruned},
            )
