"""Unit tests of the guest quota stores that need no server: the in-memory fallback, the
composite that falls back to it, and reservation ids."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from services.common.redis import RedisUnavailable
from services.quota.clock import QuotaClock, QuotaWindow
from services.quota.guest_store import (
    FallbackGuestQuotaStore,
    GuestReserveResult,
    GuestSettleResult,
    MemoryGuestQuotaStore,
)
from services.quota.reservations import (
    ReservationKind,
    Settlement,
    new_reservation_id,
    parse_reservation_id,
)

CLOCK = QuotaClock("UTC")
NOON = datetime(2025, 6, 15, 12, tzinfo=UTC)
IP = "203.0.113.7"


def window_at(instant: datetime) -> QuotaWindow:
    return CLOCK.window(instant)


async def test_memory_reserves_until_the_limit() -> None:
    store = MemoryGuestQuotaStore()
    window = window_at(NOON)
    results = [await store.reserve(IP, window, 3, uuid.uuid4()) for _ in range(4)]
    assert [r.reserved for r in results] == [True, True, True, False]
    assert [r.used for r in results] == [1, 2, 3, 3]
    assert await store.used(IP, window) == 3
    assert await store.used("203.0.113.8", window) == 0


async def test_memory_refund_gives_the_unit_back_once() -> None:
    store = MemoryGuestQuotaStore()
    window = window_at(NOON)
    reservation = uuid.uuid4()
    await store.reserve(IP, window, 3, reservation)
    await store.reserve(IP, window, 3, uuid.uuid4())
    first = await store.settle(reservation, Settlement.REFUND, NOON)
    second = await store.settle(reservation, Settlement.REFUND, NOON)
    assert first == GuestSettleResult(applied=True, ip=IP, day=window.day, used=1)
    assert second == GuestSettleResult(applied=False, ip=IP, day=window.day, used=1)
    assert await store.used(IP, window) == 1


async def test_memory_commit_then_refund_is_not_applied() -> None:
    store = MemoryGuestQuotaStore()
    window = window_at(NOON)
    reservation = uuid.uuid4()
    await store.reserve(IP, window, 3, reservation)
    committed = await store.settle(reservation, Settlement.COMMIT, NOON)
    refunded = await store.settle(reservation, Settlement.REFUND, NOON)
    assert committed is not None and committed.applied
    assert refunded is not None and not refunded.applied
    assert await store.used(IP, window) == 1


async def test_memory_unknown_reservation_is_none() -> None:
    store = MemoryGuestQuotaStore()
    assert await store.settle(uuid.uuid4(), Settlement.REFUND, NOON) is None


async def test_memory_counts_and_reservations_expire_at_the_reset() -> None:
    store = MemoryGuestQuotaStore()
    today = window_at(NOON)
    reservation = uuid.uuid4()
    for _ in range(3):
        await store.reserve(IP, today, 3, uuid.uuid4())
    await store.reserve("203.0.113.9", today, 3, reservation)
    assert not (await store.reserve(IP, today, 3, uuid.uuid4())).reserved

    just_before = today.resets_at - timedelta(microseconds=1)
    assert await store.used(IP, window_at(just_before)) == 3
    tomorrow = window_at(today.resets_at)
    assert tomorrow.day != today.day
    assert await store.used(IP, tomorrow) == 0
    assert len(store) == 0  # yesterday's counters are gone, not just hidden
    # Yesterday's reservation expired with its day: a late refund changes nothing.
    assert await store.settle(reservation, Settlement.REFUND, tomorrow.now) is None
    assert (await store.reserve(IP, tomorrow, 3, uuid.uuid4())).used == 1


async def test_memory_stays_exact_under_concurrency() -> None:
    store = MemoryGuestQuotaStore()
    window = window_at(NOON)
    results = await asyncio.gather(
        *(store.reserve(IP, window, 10, uuid.uuid4()) for _ in range(30))
    )
    assert sum(r.reserved for r in results) == 10
    assert await store.used(IP, window) == 10


class FlakyPrimary:
    """A stand-in for the Redis store that is down until `up` is set."""

    def __init__(self) -> None:
        self.up = False
        self.calls = 0
        self.memory = MemoryGuestQuotaStore()

    def _check(self) -> None:
        self.calls += 1
        if not self.up:
            raise RedisUnavailable("down")

    async def used(self, ip: str, window: QuotaWindow) -> int:
        self._check()
        return await self.memory.used(ip, window)

    async def reserve(
        self, ip: str, window: QuotaWindow, limit: int, reservation: uuid.UUID
    ) -> GuestReserveResult:
        self._check()
        return await self.memory.reserve(ip, window, limit, reservation)

    async def settle(
        self, reservation: uuid.UUID, settlement: Settlement, now: datetime
    ) -> GuestSettleResult | None:
        self._check()
        return await self.memory.settle(reservation, settlement, now)


async def test_fallback_engages_per_request_and_returns_to_the_primary() -> None:
    primary = FlakyPrimary()
    fallback = MemoryGuestQuotaStore()
    store = FallbackGuestQuotaStore(primary, fallback)
    window = window_at(NOON)

    made_in_memory = uuid.uuid4()
    assert (await store.reserve(IP, window, 3, made_in_memory)).reserved
    assert await store.used(IP, window) == 1
    assert await fallback.used(IP, window) == 1

    primary.up = True
    made_in_primary = uuid.uuid4()
    assert (await store.reserve(IP, window, 3, made_in_primary)).used == 1  # primary's count
    assert await primary.memory.used(IP, window) == 1
    assert await store.used(IP, window) == 1

    # Each reservation is settled where it was made.
    in_memory = await store.settle(made_in_memory, Settlement.REFUND, NOON)
    in_primary = await store.settle(made_in_primary, Settlement.REFUND, NOON)
    assert in_memory is not None and in_memory.applied
    assert in_primary is not None and in_primary.applied
    assert await fallback.used(IP, window) == 0
    assert await primary.memory.used(IP, window) == 0


async def test_fallback_settle_of_a_primary_reservation_while_it_is_down() -> None:
    primary = FlakyPrimary()
    primary.up = True
    store = FallbackGuestQuotaStore(primary, MemoryGuestQuotaStore())
    window = window_at(NOON)
    reservation = uuid.uuid4()
    await store.reserve(IP, window, 3, reservation)
    primary.up = False
    assert await store.settle(reservation, Settlement.REFUND, NOON) is None


def test_reservation_ids_round_trip_and_stay_short() -> None:
    for kind in ReservationKind:
        rid = new_reservation_id(kind)
        text = str(rid)
        assert len(text) <= 64
        assert parse_reservation_id(text) == rid
    assert str(new_reservation_id(ReservationKind.GUEST)).startswith("g_")
    assert str(new_reservation_id(ReservationKind.USER)).startswith("u_")


def test_foreign_reservation_ids_are_rejected() -> None:
    u = uuid.uuid4()
    for text in ["", "x_" + u.hex, "g_not-a-uuid", "u_{" + str(u) + "}", "g_" + str(u), u.hex]:
        assert parse_reservation_id(text) is None, text
