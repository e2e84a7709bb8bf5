"""Signed-in users' profiles and quota in PostgreSQL (`profiles`, `quota_reservations`).

Every write is one transaction that locks the profile row (`SELECT ... FOR UPDATE`), so
concurrent requests from one user, on any number of replicas, queue on that row and the count
stays exact. Lock order is always reservation row, then profile row (a reserve inserts a new
reservation row only while already holding the profile), so settlements and reserves cannot
deadlock each other.

A profile's quota day is the zone-local date of its `last_reset_time`: the first time a user is
seen on a new day, `daily_used` goes back to 0 and `last_reset_time` to now (the spec's
`quota.resetProfileIfNeeded`).

A unit taken with `consume=True` (an answer already in hand) is recorded as a row already
`committed`, settled now, in the same transaction as the increment: nothing is pending, so the
sweeper never expires it, and it is pruned after the retention like any settled row.

A reservation nobody settles (the caller crashed or lost its connection) is expired by the
reservation sweeper (`stale_reservations`, then `settle(..., Settlement.EXPIRE)`), and settled
rows are deleted after a retention period (`prune_settled`). Their ages are measured on the
database clock (`now()`), so replicas with skewed clocks agree on what is stale.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.common.db import Database
from services.common.perf import PerformanceMonitor
from services.quota.clock import QuotaClock, QuotaWindow
from services.quota.plans import QuotaLimits, user_plan
from services.quota.reservations import Settlement

_SELECT = "SELECT * FROM profiles WHERE user_id = $1"
_SELECT_FOR_UPDATE = "SELECT * FROM profiles WHERE user_id = $1 FOR UPDATE"
_INSERT = """
INSERT INTO profiles (user_id, email, last_reset_time) VALUES ($1, NULLIF($2, ''), $3)
ON CONFLICT (user_id) DO NOTHING"""
_UPDATE_EMAIL = """
UPDATE profiles SET email = $2, updated_at = now() WHERE user_id = $1 RETURNING *"""
_RESET = """
UPDATE profiles SET daily_used = 0, last_reset_time = $2, updated_at = now()
WHERE user_id = $1 RETURNING *"""
_INCREMENT = """
UPDATE profiles SET daily_used = daily_used + 1, updated_at = now()
WHERE user_id = $1 RETURNING *"""
_DECREMENT = """
UPDATE profiles SET daily_used = daily_used - 1, updated_at = now()
WHERE user_id = $1 AND daily_used > 0 RETURNING *"""
_RESERVATION_EXISTS = "SELECT 1 FROM quota_reservations WHERE reservation_id = $1"
_INSERT_RESERVATION = """
INSERT INTO quota_reservations (reservation_id, user_id, quota_day) VALUES ($1, $2, $3)"""
# Consumed: settled at birth, so neither the stale scan (state 'reserved') nor a settlement
# (conditional on 'reserved') ever touches it; pruned like any settled row.
_INSERT_CONSUMED = """
INSERT INTO quota_reservations (reservation_id, user_id, quota_day, state, settled_at)
VALUES ($1, $2, $3, 'committed', now())"""
_SETTLE_RESERVATION = """
UPDATE quota_reservations SET state = $2, settled_at = now()
WHERE reservation_id = $1 AND state = 'reserved' RETURNING user_id, quota_day"""
_RESERVATION_OWNER = "SELECT user_id FROM quota_reservations WHERE reservation_id = $1"
# Both use the partial indexes of migrations/0002_reservation_expiry.sql.
_STALE_RESERVATIONS = """
SELECT reservation_id FROM quota_reservations
WHERE state = 'reserved' AND created_at < now() - make_interval(secs => $1)
ORDER BY created_at LIMIT $2"""
# SKIP LOCKED: replicas pruning at once take different rows instead of queueing on the same.
_PRUNE_SETTLED = """
WITH doomed AS (
    SELECT reservation_id FROM quota_reservations
    WHERE state <> 'reserved' AND settled_at < now() - make_interval(secs => $1)
    ORDER BY settled_at LIMIT $2
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM quota_reservations r USING doomed
    WHERE r.reservation_id = doomed.reservation_id
    RETURNING 1
)
SELECT count(*) FROM deleted"""

# Settlements that give the unit back (an expiry is a refund nobody asked for).
_GIVES_UNIT_BACK = frozenset({Settlement.REFUND, Settlement.EXPIRE})


@dataclass(frozen=True)
class ProfileRecord:
    user_id: str
    email: str
    is_pro: bool
    daily_used: int
    last_reset_time: datetime
    created_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record | None) -> ProfileRecord:
        if row is None:
            # Every caller reads a row its own transaction created or locked.
            raise LookupError("profile row missing")
        return cls(
            user_id=row["user_id"],
            email=row["email"] or "",
            is_pro=row["is_pro"],
            daily_used=row["daily_used"],
            last_reset_time=row["last_reset_time"],
            created_at=row["created_at"],
        )

    def needs_reset(self, window: QuotaWindow) -> bool:
        return self.last_reset_time < window.starts_at

    def used_in(self, window: QuotaWindow) -> int:
        """Units used in `window`'s day: 0 when the count is from an earlier day."""
        return 0 if self.needs_reset(window) else self.daily_used


@dataclass(frozen=True)
class UserReserveResult:
    reserved: bool
    profile: ProfileRecord


@dataclass(frozen=True)
class UserSettleResult:
    # False when the reservation was already settled; nothing changed then.
    applied: bool
    profile: ProfileRecord


class ProfileStore:
    def __init__(
        self, db: Database, clock: QuotaClock, limits: QuotaLimits, perf: PerformanceMonitor
    ) -> None:
        self.db = db
        self.clock = clock
        self.limits = limits
        self.perf = perf

    async def load(self, user_id: str, email: str, window: QuotaWindow) -> ProfileRecord:
        """The profile for today: created on first sight, reset on a new day, its email
        updated when the caller's changed. A plain read when none of that is needed."""
        async with self.perf.track("quota.getOrCreateProfile"):
            row = await self.db.fetchrow("profile_get", _SELECT, user_id)
        if row is not None:
            profile = ProfileRecord.from_row(row)
            if not profile.needs_reset(window) and (not email or email == profile.email):
                return profile

        async def upsert(conn: asyncpg.Connection) -> ProfileRecord:
            return await self._locked_profile(conn, user_id, email, window)

        return await self.db.transaction("profile_upsert", upsert)

    async def reserve(
        self,
        user_id: str,
        email: str,
        window: QuotaWindow,
        reservation: uuid.UUID,
        *,
        consume: bool = False,
    ) -> UserReserveResult:
        """Take one unit of today's quota if any is left, recording `reservation`: pending
        until settled, or with `consume` already committed (one transaction either way)."""
        insert = _INSERT_CONSUMED if consume else _INSERT_RESERVATION

        attempts = 0

        async def reserve_in(conn: asyncpg.Connection) -> UserReserveResult:
            nonlocal attempts
            attempts += 1
            profile = await self._locked_profile(conn, user_id, email, window)
            # Database.run retries a transaction whose outcome it did not see; if the earlier
            # attempt did commit, the unit is already taken: do not take a second one.
            if attempts > 1 and await conn.fetchval(_RESERVATION_EXISTS, reservation):
                return UserReserveResult(reserved=True, profile=profile)
            if profile.daily_used >= self.limits.for_plan(user_plan(profile.is_pro)):
                return UserReserveResult(reserved=False, profile=profile)
            row = await conn.fetchrow(_INCREMENT, user_id)
            await conn.execute(insert, reservation, user_id, window.day)
            return UserReserveResult(reserved=True, profile=ProfileRecord.from_row(row))

        return await self.db.transaction(
            "quota_consume" if consume else "quota_reserve", reserve_in
        )

    async def settle(
        self, reservation: uuid.UUID, settlement: Settlement
    ) -> UserSettleResult | None:
        """Commit, refund or expire a reservation still `reserved`; None when it is unknown.
        Only the first settlement applies: the UPDATE is conditional on state 'reserved', so of
        concurrent settlements (a late refund racing the sweeper's expiry, or two sweepers)
        exactly one changes anything. A refund or an expiry gives the unit back only while the
        profile is still on the reservation's quota day (yesterday's refund must not free one
        of today's units), and never below 0; the row keeps the settlement's state."""

        async def settle_in(conn: asyncpg.Connection) -> UserSettleResult | None:
            settled = await conn.fetchrow(_SETTLE_RESERVATION, reservation, settlement.value)
            if settled is None:
                owner = await conn.fetchval(_RESERVATION_OWNER, reservation)
                if owner is None:
                    return None
                row = await conn.fetchrow(_SELECT, owner)
                return UserSettleResult(applied=False, profile=ProfileRecord.from_row(row))
            user_id: str = settled["user_id"]
            profile = ProfileRecord.from_row(await conn.fetchrow(_SELECT_FOR_UPDATE, user_id))
            if (
                settlement in _GIVES_UNIT_BACK
                and profile.daily_used > 0
                and self.clock.day_of(profile.last_reset_time) == settled["quota_day"]
            ):
                profile = ProfileRecord.from_row(await conn.fetchrow(_DECREMENT, user_id))
            return UserSettleResult(applied=True, profile=profile)

        return await self.db.transaction("quota_settle", settle_in)

    async def stale_reservations(self, older_than_seconds: float, limit: int) -> list[uuid.UUID]:
        """Up to `limit` reservations still `reserved` that were made more than
        `older_than_seconds` ago (by the database clock), oldest first."""

        async def stale_in(conn: asyncpg.Connection) -> list[uuid.UUID]:
            rows = await conn.fetch(_STALE_RESERVATIONS, float(older_than_seconds), limit)
            return [row["reservation_id"] for row in rows]

        return await self.db.run("quota_stale_reservations", stale_in)

    async def prune_settled(self, older_than_seconds: float, limit: int) -> int:
        """Delete up to `limit` settled reservations (any state but `reserved`) settled more
        than `older_than_seconds` ago (by the database clock), oldest first; returns how many
        were deleted. Pending reservations are never deleted."""

        async def prune_in(conn: asyncpg.Connection) -> int:
            deleted: int = await conn.fetchval(_PRUNE_SETTLED, float(older_than_seconds), limit)
            return deleted

        return await self.db.run("quota_prune_settled", prune_in)

    async def _locked_profile(
        self, conn: asyncpg.Connection, user_id: str, email: str, window: QuotaWindow
    ) -> ProfileRecord:
        """Get or create the profile and lock it for the rest of the transaction, then reset
        it if it is from an earlier day."""
        async with self.perf.track("quota.getOrCreateProfile"):
            await conn.execute(_INSERT, user_id, email, window.now)
            profile = ProfileRecord.from_row(await conn.fetchrow(_SELECT_FOR_UPDATE, user_id))
            if email and email != profile.email:
                profile = ProfileRecord.from_row(await conn.fetchrow(_UPDATE_EMAIL, user_id, email))
        async with self.perf.track("quota.resetProfileIfNeeded"):
            if profile.needs_reset(window):
                profile = ProfileRecord.from_row(await conn.fetchrow(_RESET, user_id, window.now))
        return profile
