"""The Redis guest store, the profile cache and the PostgreSQL profile store, called directly
against this run's real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import pytest

from services.common.db import Database
from services.common.perf import PerformanceMonitor
from services.common.redis import RedisUnavailable, ResilientRedis
from services.quota.clock import QuotaClock, QuotaWindow
from services.quota.guest_store import (
    FallbackGuestQuotaStore,
    MemoryGuestQuotaStore,
    RedisGuestQuotaStore,
    guest_tag,
)
from services.quota.plans import QuotaLimits
from services.quota.profile_cache import ProfileCache
from services.quota.profile_store import ProfileStore
from services.quota.reservations import ReservationId, Settlement, new_guest_reservation
from tests.quota.conftest import (
    FREE_LIMIT,
    GUEST_LIMIT,
    PRO_LIMIT,
    MovableNow,
    SettingsFactory,
    before_a_future_midnight,
    unique_ip,
    unique_user,
)

pytestmark = pytest.mark.integration


# -- Redis guest store ---------------------------------------------------------------------------

TTL = 300.0


def rid(network: str, window: QuotaWindow) -> ReservationId:
    return new_guest_reservation(guest_tag(network, window.day))


async def test_redis_reserve_is_exact_under_concurrency(redis: ResilientRedis) -> None:
    store = RedisGuestQuotaStore(redis, TTL)
    window = QuotaClock().window()
    ip = unique_ip()
    results = await asyncio.gather(
        *(store.reserve(ip, window, 10, rid(ip, window)) for _ in range(30))
    )
    assert sum(r.reserved for r in results) == 10
    assert sorted(r.used for r in results if r.reserved) == list(range(1, 11))
    assert await store.used(ip, window) == 10


async def test_redis_keys_share_a_hash_tag_and_expire_at_the_reset(redis: ResilientRedis) -> None:
    store = RedisGuestQuotaStore(redis, TTL)
    window = QuotaClock().window()
    ip = unique_ip()
    reservation = rid(ip, window)
    await store.reserve(ip, window, 3, reservation)
    assert redis.client is not None
    keys = store.keys(reservation.tag)
    assert all("{" + reservation.tag + "}" in key for key in keys)
    for key in keys:
        expires_at = await redis.client.expiretime(key)
        assert expires_at == int(window.resets_at.timestamp())


async def test_redis_refund_once_and_commit_then_refund(redis: ResilientRedis) -> None:
    store = RedisGuestQuotaStore(redis, TTL)
    window = QuotaClock().window()
    ip = unique_ip()
    refunded, committed = rid(ip, window), rid(ip, window)
    await store.reserve(ip, window, 3, refunded)
    await store.reserve(ip, window, 3, committed)

    first = await store.settle(refunded, Settlement.REFUND)
    again = await store.settle(refunded, Settlement.REFUND)
    assert first is not None and (first.applied, first.used, first.network) == (True, 1, ip)
    assert first.day == window.day
    assert again is not None and (again.applied, again.used) == (False, 1)

    commit = await store.settle(committed, Settlement.COMMIT)
    late_refund = await store.settle(committed, Settlement.REFUND)
    assert commit is not None and commit.applied
    assert late_refund is not None and not late_refund.applied
    assert await store.used(ip, window) == 1
    # A reservation of a guest-day Redis never saw is unknown.
    assert await store.settle(rid(unique_ip(), window), Settlement.REFUND) is None


async def test_redis_refunds_concurrently_give_back_each_unit_once(redis: ResilientRedis) -> None:
    store = RedisGuestQuotaStore(redis, TTL)
    window = QuotaClock().window()
    ip = unique_ip()
    reservations = [rid(ip, window) for _ in range(5)]
    for reservation in reservations:
        await store.reserve(ip, window, 10, reservation)
    settled = await asyncio.gather(*(store.settle(r, Settlement.REFUND) for r in reservations * 4))
    assert sum(1 for s in settled if s is not None and s.applied) == 5
    assert await store.used(ip, window) == 0


async def test_redis_unsettled_reservation_expires_and_gives_its_unit_back(
    redis: ResilientRedis,
) -> None:
    store = RedisGuestQuotaStore(redis, ttl_seconds=0.3)
    window = QuotaClock().window()
    ip = unique_ip()
    forgotten, committed = rid(ip, window), rid(ip, window)
    await store.reserve(ip, window, 2, forgotten)
    await store.reserve(ip, window, 2, committed)
    await store.settle(committed, Settlement.COMMIT)
    assert not (await store.reserve(ip, window, 2, rid(ip, window))).reserved

    await asyncio.sleep(0.5)  # the forgotten reservation's TTL passes (Redis's clock)
    assert await store.used(ip, window) == 1  # its unit is back; the committed one stays
    late = await store.settle(forgotten, Settlement.COMMIT)
    assert late is not None and not late.applied and late.used == 1
    assert (await store.reserve(ip, window, 2, rid(ip, window))).reserved


async def test_redis_consume_takes_the_unit_for_good_with_nothing_pending(
    redis: ResilientRedis,
) -> None:
    store = RedisGuestQuotaStore(redis, ttl_seconds=0.3)
    window = QuotaClock().window()
    ip = unique_ip()
    consumed = rid(ip, window)
    result = await store.reserve(ip, window, 2, consumed, consume=True)
    assert (result.reserved, result.used) == (True, 1)
    assert redis.client is not None
    state, pending = store.keys(consumed.tag)
    assert await redis.client.zcard(pending) == 0  # nothing pending
    assert await redis.client.expiretime(state) == int(window.resets_at.timestamp())

    await asyncio.sleep(0.5)  # past the reservation TTL: nothing expires
    assert await store.used(ip, window) == 1
    late = await store.settle(consumed, Settlement.REFUND)
    assert late is not None and (late.applied, late.used) == (False, 1)
    assert (await store.reserve(ip, window, 2, rid(ip, window), consume=True)).reserved
    exhausted = await store.reserve(ip, window, 2, rid(ip, window), consume=True)
    assert (exhausted.reserved, exhausted.used) == (False, 2)


async def test_redis_counts_per_day(redis: ResilientRedis) -> None:
    now = MovableNow()
    clock = QuotaClock("America/New_York", now=now)
    now.set(before_a_future_midnight(clock, seconds=30))
    store = RedisGuestQuotaStore(redis, TTL)
    ip = unique_ip()
    today = clock.window()
    for _ in range(3):
        await store.reserve(ip, today, 3, rid(ip, today))
    assert not (await store.reserve(ip, today, 3, rid(ip, today))).reserved
    now.advance(timedelta(minutes=1))
    tomorrow = clock.window()
    assert tomorrow.day == today.day + timedelta(days=1)
    assert (await store.reserve(ip, tomorrow, 3, rid(ip, tomorrow))).used == 1


async def test_fallback_goes_back_to_redis_when_the_breaker_closes(
    quota_settings: SettingsFactory,
) -> None:
    redis = ResilientRedis(quota_settings(redis_cooldown_seconds=0.2), PerformanceMonitor())
    try:
        memory = MemoryGuestQuotaStore(TTL)
        store = FallbackGuestQuotaStore(RedisGuestQuotaStore(redis, TTL), memory)
        window = QuotaClock().window()
        ip = unique_ip()
        for _ in range(redis.breaker.failure_threshold):
            permit = redis.breaker.try_acquire()
            assert permit is not None
            permit.failure()
        assert not redis.available
        assert (await store.reserve(ip, window, 3, rid(ip, window))).used == 1
        assert await memory.used(ip, window) == 1  # served by the fallback

        await asyncio.sleep(0.3)  # the cooldown passes; the next call probes Redis
        assert (await store.reserve(ip, window, 3, rid(ip, window))).used == 1
        assert redis.available
        assert await RedisGuestQuotaStore(redis, TTL).used(ip, window) == 1
        assert await memory.used(ip, window) == 1  # untouched once Redis is back
    finally:
        await redis.close()


async def test_unreachable_redis_raises_unavailable_quickly(
    quota_settings: SettingsFactory,
) -> None:
    redis = ResilientRedis(
        quota_settings(redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.2),
        PerformanceMonitor(),
    )
    try:
        store = RedisGuestQuotaStore(redis, TTL)
        window = QuotaClock().window()
        ip = unique_ip()
        async with asyncio.timeout(5):
            with pytest.raises(RedisUnavailable):
                await store.reserve(ip, window, 3, rid(ip, window))
    finally:
        await redis.close()


# -- profile cache -------------------------------------------------------------------------------


async def test_cache_does_not_store_a_read_that_raced_an_invalidation(
    redis: ResilientRedis, database: Database
) -> None:
    clock = QuotaClock()
    profiles = ProfileStore(database, clock, QuotaLimits(3, 10, 20), PerformanceMonitor())
    cache = ProfileCache(redis, ttl_seconds=60)
    user_id, email = unique_user()
    window = clock.window()

    miss = await cache.lookup(user_id)
    assert miss.profile is None and miss.fence is not None
    stale = await profiles.load(user_id, email, window)
    await cache.invalidate(user_id)  # a write committed after the read
    await cache.store(stale, miss.fence)
    assert (await cache.lookup(user_id)).profile is None

    fresh_miss = await cache.lookup(user_id)
    fresh = await profiles.load(user_id, email, window)
    await cache.store(fresh, fresh_miss.fence)
    assert (await cache.lookup(user_id)).profile == fresh


async def test_cache_is_off_without_redis(quota_settings: SettingsFactory) -> None:
    redis = ResilientRedis(quota_settings(redis_url=""), PerformanceMonitor())
    cache = ProfileCache(redis, ttl_seconds=60)
    lookup = await cache.lookup("anyone")
    assert lookup.profile is None and lookup.fence is None
    await cache.invalidate("anyone")  # a no-op, not an error


# -- PostgreSQL profile store --------------------------------------------------------------------


async def test_profile_reserve_is_exact_under_concurrency(
    database: Database, db: asyncpg.Connection
) -> None:
    clock = QuotaClock()
    store = ProfileStore(
        database, clock, QuotaLimits(GUEST_LIMIT, FREE_LIMIT, PRO_LIMIT), PerformanceMonitor()
    )
    user_id, email = unique_user()
    window = clock.window()
    results = await asyncio.gather(
        *(store.reserve(user_id, email, window, uuid.uuid4()) for _ in range(30))
    )
    assert sum(r.reserved for r in results) == FREE_LIMIT
    assert await db.fetchval("SELECT daily_used FROM profiles WHERE user_id = $1", user_id) == 10
    rows = await db.fetchval(
        "SELECT count(*) FROM quota_reservations WHERE user_id = $1 AND state = 'reserved'",
        user_id,
    )
    assert rows == FREE_LIMIT


async def test_profile_refund_from_yesterday_does_not_free_a_unit_today(
    database: Database, db: asyncpg.Connection
) -> None:
    now = MovableNow()
    clock = QuotaClock("America/New_York", now=now)
    now.set(before_a_future_midnight(clock, seconds=30))
    perf = PerformanceMonitor()
    store = ProfileStore(database, clock, QuotaLimits(GUEST_LIMIT, FREE_LIMIT, PRO_LIMIT), perf)
    user_id, email = unique_user()

    yesterday = uuid.uuid4()
    assert (await store.reserve(user_id, email, clock.window(), yesterday)).reserved
    now.advance(timedelta(minutes=1))
    today = clock.window()
    reserved = await store.reserve(user_id, email, today, uuid.uuid4())
    assert reserved.profile.daily_used == 1  # reset on first sight today

    settled = await store.settle(yesterday, Settlement.REFUND)
    assert settled is not None and settled.applied
    assert settled.profile.daily_used == 1
    assert (
        await db.fetchval(
            "SELECT state FROM quota_reservations WHERE reservation_id = $1", yesterday
        )
        == "refunded"
    )
    names = {t.name for t in perf.snapshot()}
    assert {"quota.getOrCreateProfile", "quota.resetProfileIfNeeded"} <= names


async def test_profile_refund_never_goes_below_zero(
    database: Database, db: asyncpg.Connection
) -> None:
    clock = QuotaClock()
    store = ProfileStore(database, clock, QuotaLimits(3, 10, 20), PerformanceMonitor())
    user_id, email = unique_user()
    reservation = uuid.uuid4()
    await store.reserve(user_id, email, clock.window(), reservation)
    await db.execute("UPDATE profiles SET daily_used = 0 WHERE user_id = $1", user_id)
    settled = await store.settle(reservation, Settlement.REFUND)
    assert settled is not None and settled.applied and settled.profile.daily_used == 0


async def test_profile_load_creates_updates_email_and_resets(
    database: Database, db: asyncpg.Connection
) -> None:
    now = MovableNow()
    clock = QuotaClock(now=now)
    now.set(before_a_future_midnight(clock, seconds=30))
    store = ProfileStore(database, clock, QuotaLimits(3, 10, 20), PerformanceMonitor())
    user_id, email = unique_user()

    created = await store.load(user_id, email, clock.window())
    assert (created.user_id, created.email, created.daily_used) == (user_id, email, 0)
    await store.reserve(user_id, "", clock.window(), uuid.uuid4())
    assert (await store.load(user_id, "", clock.window())).email == email  # kept when not sent

    changed = await store.load(user_id, "new-" + email, clock.window())
    assert (changed.email, changed.daily_used) == ("new-" + email, 1)

    now.advance(timedelta(minutes=1))
    window = clock.window()
    reset = await store.load(user_id, "", window)
    assert reset.daily_used == 0
    assert reset.last_reset_time >= window.starts_at
    stored = await db.fetchrow("SELECT daily_used FROM profiles WHERE user_id = $1", user_id)
    assert stored is not None and stored["daily_used"] == 0
