"""Unit tests of the guest quota stores that need no server: the in-memory fallback, the
composite that falls back to it, client networks and reservation ids."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.common.client_networks import ClientNetworks
from services.common.redis import RedisUnavailable
from services.quota.clock import QuotaClock, QuotaWindow
from services.quota.guest_store import (
    FallbackGuestQuotaStore,
    GuestReserveResult,
    GuestSettleResult,
    MemoryGuestQuotaStore,
    guest_tag,
)
from services.quota.reservations import (
    ReservationId,
    Settlement,
    new_guest_reservation,
    new_user_reservation,
    parse_reservation_id,
)

CLOCK = QuotaClock("UTC")
NOON = datetime(2025, 6, 15, 12, tzinfo=UTC)
IP = "203.0.113.7"
TTL = 300.0


class WallClock:
    """The memory store's wall clock, starting at NOON, moved by the tests."""

    def __init__(self, start: datetime = NOON) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def window_at(instant: datetime) -> QuotaWindow:
    return CLOCK.window(instant)


def rid(network: str, window: QuotaWindow) -> ReservationId:
    return new_guest_reservation(guest_tag(network, window.day))


def memory_store(clock: WallClock | None = None) -> MemoryGuestQuotaStore:
    return MemoryGuestQuotaStore(TTL, clock or WallClock())


async def test_memory_reserves_until_the_limit() -> None:
    store = memory_store()
    window = window_at(NOON)
    results = [await store.reserve(IP, window, 3, rid(IP, window)) for _ in range(4)]
    assert [r.reserved for r in results] == [True, True, True, False]
    assert [r.used for r in results] == [1, 2, 3, 3]
    assert await store.used(IP, window) == 3
    assert await store.used("203.0.113.8", window) == 0


async def test_memory_refund_gives_the_unit_back_once() -> None:
    store = memory_store()
    window = window_at(NOON)
    reservation = rid(IP, window)
    await store.reserve(IP, window, 3, reservation)
    await store.reserve(IP, window, 3, rid(IP, window))
    first = await store.settle(reservation, Settlement.REFUND)
    second = await store.settle(reservation, Settlement.REFUND)
    assert first == GuestSettleResult(applied=True, network=IP, day=window.day, used=1)
    assert second == GuestSettleResult(applied=False, network=IP, day=window.day, used=1)
    assert await store.used(IP, window) == 1


async def test_memory_commit_then_refund_is_not_applied() -> None:
    store = memory_store()
    window = window_at(NOON)
    reservation = rid(IP, window)
    await store.reserve(IP, window, 3, reservation)
    committed = await store.settle(reservation, Settlement.COMMIT)
    refunded = await store.settle(reservation, Settlement.REFUND)
    assert committed is not None and committed.applied
    assert refunded is not None and not refunded.applied
    assert await store.used(IP, window) == 1


async def test_memory_unknown_guest_day_is_none() -> None:
    store = memory_store()
    assert await store.settle(rid(IP, window_at(NOON)), Settlement.REFUND) is None


async def test_memory_unsettled_reservation_expires_and_gives_its_unit_back() -> None:
    clock = WallClock()
    store = memory_store(clock)
    window = window_at(NOON)
    forgotten, committed = rid(IP, window), rid(IP, window)
    await store.reserve(IP, window, 2, forgotten)
    await store.reserve(IP, window, 2, committed)
    await store.settle(committed, Settlement.COMMIT)
    assert not (await store.reserve(IP, window, 2, rid(IP, window))).reserved

    clock.advance(TTL - 1)
    assert await store.used(IP, window) == 2  # not yet
    clock.advance(2)
    assert await store.used(IP, window) == 1  # the forgotten one is back; the commit stays
    # Its late settlement changes nothing: the unit was given back already.
    late = await store.settle(forgotten, Settlement.COMMIT)
    assert late is not None and not late.applied and late.used == 1
    assert (await store.reserve(IP, window, 2, rid(IP, window))).reserved


async def test_memory_guest_days_go_at_their_reset() -> None:
    clock = WallClock()
    store = memory_store(clock)
    today = window_at(NOON)
    reservation = rid("203.0.113.9", today)
    for _ in range(3):
        await store.reserve(IP, today, 3, rid(IP, today))
    await store.reserve("203.0.113.9", today, 3, reservation)
    assert not (await store.reserve(IP, today, 3, rid(IP, today))).reserved

    clock.now = today.resets_at.timestamp()
    tomorrow = window_at(today.resets_at)
    assert tomorrow.day != today.day
    assert await store.used(IP, tomorrow) == 0
    assert len(store) == 0  # yesterday's guest-days are gone, not just hidden
    # Yesterday's reservation went with its day: a late refund changes nothing.
    assert await store.settle(reservation, Settlement.REFUND) is None
    assert (await store.reserve(IP, tomorrow, 3, rid(IP, tomorrow))).used == 1


async def test_memory_consume_takes_the_unit_for_good_with_nothing_pending() -> None:
    clock = WallClock()
    store = memory_store(clock)
    window = window_at(NOON)
    consumed = rid(IP, window)
    assert await store.reserve(IP, window, 2, consumed, consume=True) == GuestReserveResult(
        reserved=True, used=1
    )
    assert not store.knows(consumed)  # nothing pending
    clock.advance(TTL + 1)
    assert await store.used(IP, window) == 1  # nothing to expire: the unit stays used
    # Settling it later changes nothing.
    for settlement in (Settlement.REFUND, Settlement.COMMIT):
        late = await store.settle(consumed, settlement)
        assert late == GuestSettleResult(applied=False, network=IP, day=window.day, used=1)
    # The limit holds as for a reservation.
    assert (await store.reserve(IP, window, 2, rid(IP, window), consume=True)).reserved
    assert await store.reserve(IP, window, 2, rid(IP, window), consume=True) == (
        GuestReserveResult(reserved=False, used=2)
    )


async def test_memory_stays_exact_under_concurrency() -> None:
    store = memory_store()
    window = window_at(NOON)
    results = await asyncio.gather(
        *(store.reserve(IP, window, 10, rid(IP, window)) for _ in range(30))
    )
    assert sum(r.reserved for r in results) == 10
    assert await store.used(IP, window) == 10


class FlakyPrimary:
    """A stand-in for the Redis store that is down until `up` is set."""

    def __init__(self) -> None:
        self.up = False
        self.calls = 0
        self.memory = memory_store()

    def _check(self) -> None:
        self.calls += 1
        if not self.up:
            raise RedisUnavailable("down")

    async def used(self, network: str, window: QuotaWindow) -> int:
        self._check()
        return await self.memory.used(network, window)

    async def reserve(
        self,
        network: str,
        window: QuotaWindow,
        limit: int,
        reservation: ReservationId,
        *,
        consume: bool = False,
    ) -> GuestReserveResult:
        self._check()
        return await self.memory.reserve(network, window, limit, reservation, consume=consume)

    async def settle(
        self, reservation: ReservationId, settlement: Settlement
    ) -> GuestSettleResult | None:
        self._check()
        return await self.memory.settle(reservation, settlement)


async def test_fallback_engages_per_request_and_returns_to_the_primary() -> None:
    primary = FlakyPrimary()
    fallback = memory_store()
    store = FallbackGuestQuotaStore(primary, fallback)
    window = window_at(NOON)

    made_in_memory = rid(IP, window)
    assert (await store.reserve(IP, window, 3, made_in_memory)).reserved
    assert await store.used(IP, window) == 1
    assert await fallback.used(IP, window) == 1

    primary.up = True
    made_in_primary = rid(IP, window)
    assert (await store.reserve(IP, window, 3, made_in_primary)).used == 1  # primary's count
    assert await primary.memory.used(IP, window) == 1
    assert await store.used(IP, window) == 1

    # Each reservation is settled where it was made.
    in_memory = await store.settle(made_in_memory, Settlement.REFUND)
    in_primary = await store.settle(made_in_primary, Settlement.REFUND)
    assert in_memory is not None and in_memory.applied
    assert in_primary is not None and in_primary.applied
    assert await fallback.used(IP, window) == 0
    assert await primary.memory.used(IP, window) == 0


async def test_fallback_settle_of_a_primary_reservation_while_it_is_down() -> None:
    primary = FlakyPrimary()
    primary.up = True
    store = FallbackGuestQuotaStore(primary, memory_store())
    window = window_at(NOON)
    reservation = rid(IP, window)
    await store.reserve(IP, window, 3, reservation)
    primary.up = False
    assert await store.settle(reservation, Settlement.REFUND) is None


async def test_fallback_consume_takes_the_unit_where_it_is_served() -> None:
    primary = FlakyPrimary()
    fallback = memory_store()
    store = FallbackGuestQuotaStore(primary, fallback)
    window = window_at(NOON)

    in_memory = rid(IP, window)
    assert (await store.reserve(IP, window, 1, in_memory, consume=True)).reserved
    assert await fallback.used(IP, window) == 1
    assert not fallback.knows(in_memory)  # nothing pending to settle there
    exhausted = await store.reserve(IP, window, 1, rid(IP, window), consume=True)
    assert exhausted == GuestReserveResult(reserved=False, used=1)

    primary.up = True
    in_primary = rid(IP, window)
    assert (await store.reserve(IP, window, 1, in_primary, consume=True)).reserved
    assert await primary.memory.used(IP, window) == 1
    assert not primary.memory.knows(in_primary)
    late = await store.settle(in_primary, Settlement.REFUND)
    assert late is not None and not late.applied and late.used == 1


def test_client_networks_count_prefixes() -> None:
    default = ClientNetworks()
    # One IPv6 subscriber's /64 is one guest, whichever address it picks.
    assert default.network_of("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert default.network_of("2001:DB8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert default.network_of("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    # IPv4 per address, whichever way it is written.
    assert default.network_of("203.0.113.7") == "203.0.113.7"
    assert default.network_of("::ffff:203.0.113.7") == "203.0.113.7"
    assert default.network_of("::FFFF:203.0.113.7") == "203.0.113.7"
    assert default.network_of(" 203.0.113.7 ") == "203.0.113.7"
    # Not an IP: no network.
    assert default.network_of("") == ""
    assert default.network_of("not-an-ip") == ""
    wide = ClientNetworks(ipv4_prefix=24, ipv6_prefix=48)
    assert wide.network_of("203.0.113.7") == "203.0.113.0/24"
    assert wide.network_of("2001:db8:1:2::1") == "2001:db8:1::/48"
    assert ClientNetworks(ipv6_prefix=128).network_of("2001:db8::1") == "2001:db8::1"
    with pytest.raises(ValueError, match="IPv6"):
        ClientNetworks(ipv6_prefix=129)
    with pytest.raises(ValueError, match="IPv4"):
        ClientNetworks(ipv4_prefix=0)


def test_guest_tags_name_one_guest_day() -> None:
    day = NOON.date()
    tag = guest_tag("2001:db8:1:2::/64", day)
    assert len(tag) == 16 and int(tag, 16) >= 0
    assert guest_tag("2001:db8:1:2::/64", day) == tag
    assert guest_tag("2001:db8:1:3::/64", day) != tag
    assert guest_tag("2001:db8:1:2::/64", day + timedelta(days=1)) != tag


def test_reservation_ids_round_trip_and_stay_short() -> None:
    guest = new_guest_reservation(guest_tag("2001:db8:ffff:ffff::/64", NOON.date()))
    user = new_user_reservation()
    for reservation in (guest, user):
        text = str(reservation)
        assert len(text) <= 64
        assert parse_reservation_id(text) == reservation
    assert str(guest).startswith("g_") and guest.tag in str(guest)
    assert str(user).startswith("u_")


def test_foreign_reservation_ids_are_rejected() -> None:
    u = uuid.uuid4()
    tag = "0123456789abcdef"
    for text in [
        "",
        "x_" + u.hex,
        "g_not-a-uuid",
        "u_{" + str(u) + "}",
        "g_" + str(u),
        "g_" + u.hex,  # no tag
        f"g_{tag.upper()}_{u.hex}",
        f"g_{tag}_{u}",
        f"g_{tag[:15]}_{u.hex}",
        u.hex,
    ]:
        assert parse_reservation_id(text) is None, text
