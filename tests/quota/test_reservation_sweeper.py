"""The reservation sweeper against this run's real PostgreSQL: signed-in users' reservations
nobody settled expire (their unit comes back exactly once), settled rows are pruned after the
retention period, and the service really runs the loop. Rows are aged by moving their
timestamps back in SQL, never by sleeping."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from genmesh.quota.v1 import quota_pb2
from services.common.db import Database, database_unavailable
from services.common.perf import PerformanceMonitor
from services.common.server import GrpcService
from services.common.settings import ServiceSettings
from services.quota.clock import QuotaClock
from services.quota.plans import QuotaLimits
from services.quota.profile_store import ProfileStore
from services.quota.reservation_sweeper import ReservationSweeper
from services.quota.reservations import Settlement
from services.quota.settings import QuotaSettings
from tests.quota.conftest import (
    FREE_LIMIT,
    GUEST_LIMIT,
    PRO_LIMIT,
    MovableNow,
    SettingsFactory,
    before_a_future_midnight,
    running_quota,
    unique_ip,
    unique_user,
    user_metadata,
)

pytestmark = pytest.mark.integration

TTL = 3600.0  # far longer than this run, so only rows a test ages on purpose are stale
RETENTION = 86400.0
LIMITS = QuotaLimits(GUEST_LIMIT, FREE_LIMIT, PRO_LIMIT)
TIMEOUT = 10


@pytest.fixture
def profiles(database: Database) -> ProfileStore:
    return ProfileStore(database, QuotaClock(), LIMITS, PerformanceMonitor())


def sweeper_for(profiles: ProfileStore, batch_size: int = 500) -> ReservationSweeper:
    return ReservationSweeper(
        profiles,
        ttl_seconds=TTL,
        retention_seconds=RETENTION,
        interval_seconds=3600,
        batch_size=batch_size,
    )


async def reserve(profiles: ProfileStore, user_id: str, email: str, n: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    for rid in ids:
        assert (await profiles.reserve(user_id, email, profiles.clock.window(), rid)).reserved
    return ids


async def age_created(db: asyncpg.Connection, rid: uuid.UUID, seconds: float) -> None:
    await db.execute(
        "UPDATE quota_reservations SET created_at = now() - make_interval(secs => $2)"
        " WHERE reservation_id = $1",
        rid,
        seconds,
    )


async def age_settled(db: asyncpg.Connection, rid: uuid.UUID, seconds: float) -> None:
    await db.execute(
        "UPDATE quota_reservations SET settled_at = now() - make_interval(secs => $2)"
        " WHERE reservation_id = $1 AND state <> 'reserved'",
        rid,
        seconds,
    )


async def state_of(db: asyncpg.Connection, rid: uuid.UUID) -> str | None:
    state: str | None = await db.fetchval(
        "SELECT state FROM quota_reservations WHERE reservation_id = $1", rid
    )
    return state


async def daily_used(db: asyncpg.Connection, user_id: str) -> int:
    used: int = await db.fetchval("SELECT daily_used FROM profiles WHERE user_id = $1", user_id)
    return used


async def stale_count(db: asyncpg.Connection) -> int:
    """Every stale pending row in this run's database: what a full sweep must expire."""
    count: int = await db.fetchval(
        "SELECT count(*) FROM quota_reservations"
        " WHERE state = 'reserved' AND created_at < now() - make_interval(secs => $1)",
        TTL,
    )
    return count


async def prunable_count(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM quota_reservations"
        " WHERE state <> 'reserved' AND settled_at < now() - make_interval(secs => $1)",
        RETENTION,
    )
    return count


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


EXPIRED_METRIC = "genmesh_quota_reservations_expired_total"
PRUNED_METRIC = "genmesh_quota_reservations_pruned_total"


# -- expiry --------------------------------------------------------------------------------------


async def test_a_stale_reservation_expires_and_gives_its_unit_back_once(
    profiles: ProfileStore, db: asyncpg.Connection
) -> None:
    user_id, email = unique_user()
    committed, *stale, young = await reserve(profiles, user_id, email, 5)
    assert (await profiles.settle(committed, Settlement.COMMIT)) is not None
    for rid in stale:
        await age_created(db, rid, TTL + 60)
    await age_created(db, young, TTL - 60)  # not yet stale
    assert await daily_used(db, user_id) == 5
    expected = await stale_count(db)
    assert expected >= 3
    before = metric(EXPIRED_METRIC, {"store": "postgres"})

    # batch_size 2: the three stale rows take two batches.
    result = await sweeper_for(profiles, batch_size=2).sweep_once()

    assert result.expired == expected
    assert metric(EXPIRED_METRIC, {"store": "postgres"}) - before == expected
    assert await daily_used(db, user_id) == 2  # exactly one unit back per stale reservation
    assert [await state_of(db, rid) for rid in stale] == ["expired"] * 3
    assert await state_of(db, committed) == "committed"
    assert await state_of(db, young) == "reserved"
    settled_at = await db.fetchval(
        "SELECT settled_at FROM quota_reservations WHERE reservation_id = $1", stale[0]
    )
    assert settled_at is not None

    # The caller comes back late: neither its commit nor its refund changes anything.
    for settlement in (Settlement.COMMIT, Settlement.REFUND):
        late = await profiles.settle(stale[0], settlement)
        assert late is not None and not late.applied
        assert late.profile.daily_used == 2
    assert await state_of(db, stale[0]) == "expired"
    assert await daily_used(db, user_id) == 2

    # Sweeping again finds nothing of this user's to expire.
    again = await sweeper_for(profiles).sweep_once()
    assert again.expired == 0
    assert await daily_used(db, user_id) == 2
    assert await state_of(db, young) == "reserved"


async def test_a_consumed_unit_is_committed_at_once_never_expires_and_is_pruned(
    profiles: ProfileStore, db: asyncpg.Connection
) -> None:
    user_id, email = unique_user()
    (reserved,) = await reserve(profiles, user_id, email, 1)
    consumed = uuid.uuid4()
    window = profiles.clock.window()
    result = await profiles.reserve(user_id, email, window, consumed, consume=True)
    assert result.reserved and result.profile.daily_used == 2
    row = await db.fetchrow(
        "SELECT state, settled_at, quota_day FROM quota_reservations WHERE reservation_id = $1",
        consumed,
    )
    assert row is not None
    assert (row["state"], row["quota_day"]) == ("committed", window.day)
    assert row["settled_at"] is not None
    # Nothing pending: however old, the sweeper finds nothing to expire.
    await age_created(db, consumed, TTL + 60)
    assert consumed not in await profiles.stale_reservations(TTL, 100_000)
    await sweeper_for(profiles).sweep_once()
    assert await state_of(db, consumed) == "committed"
    assert await daily_used(db, user_id) == 2
    # A later settlement of its id changes nothing.
    for settlement in (Settlement.REFUND, Settlement.COMMIT):
        late = await profiles.settle(consumed, settlement)
        assert late is not None and not late.applied and late.profile.daily_used == 2
    # Pruned after the retention like any settled row; the pending one is kept.
    await age_settled(db, consumed, RETENTION + 60)
    await sweeper_for(profiles).sweep_once()
    assert await state_of(db, consumed) is None
    assert await state_of(db, reserved) == "reserved"


async def test_consume_is_refused_at_the_limit_like_reserve(
    profiles: ProfileStore, db: asyncpg.Connection
) -> None:
    user_id, email = unique_user()
    window = profiles.clock.window()
    for _ in range(FREE_LIMIT):
        assert (await profiles.reserve(user_id, email, window, uuid.uuid4(), consume=True)).reserved
    refused = uuid.uuid4()
    result = await profiles.reserve(user_id, email, window, refused, consume=True)
    assert not result.reserved and result.profile.daily_used == FREE_LIMIT
    assert await state_of(db, refused) is None  # no row for a unit not taken
    assert await daily_used(db, user_id) == FREE_LIMIT


async def test_a_reservation_younger_than_the_ttl_is_untouched(
    profiles: ProfileStore, db: asyncpg.Connection
) -> None:
    user_id, email = unique_user()
    (rid,) = await reserve(profiles, user_id, email, 1)
    await age_created(db, rid, TTL - 30)
    assert rid not in await profiles.stale_reservations(TTL, 1000)

    await sweeper_for(profiles).sweep_once()

    assert await state_of(db, rid) == "reserved"
    assert await daily_used(db, user_id) == 1
    settled = await profiles.settle(rid, Settlement.COMMIT)  # its caller can still settle it
    assert settled is not None and settled.applied and settled.profile.daily_used == 1


async def test_stale_reservations_are_listed_oldest_first(
    profiles: ProfileStore, db: asyncpg.Connection
) -> None:
    user_id, email = unique_user()
    newer, older = await reserve(profiles, user_id, email, 2)
    await age_created(db, newer, TTL + 1000)
    await age_created(db, older, TTL + 500_000)  # older than anything another test ages
    listed = await profiles.stale_reservations(TTL, 1000)
    assert listed[0] == older
    assert listed.index(newer) > 0
    assert await profiles.stale_reservations(TTL, 1) == [older]
    await sweeper_for(profiles).sweep_once()
    assert await state_of(db, older) == await state_of(db, newer) == "expired"


async def test_an_expired_reservation_from_an_earlier_day_gives_back_none_of_today(
    database: Database, db: asyncpg.Connection
) -> None:
    now = MovableNow()
    clock = QuotaClock("America/New_York", now=now)
    now.set(before_a_future_midnight(clock, seconds=30))
    profiles = ProfileStore(database, clock, LIMITS, PerformanceMonitor())
    user_id, email = unique_user()

    (yesterday,) = await reserve(profiles, user_id, email, 1)
    now.advance(timedelta(minutes=1))
    (today,) = await reserve(profiles, user_id, email, 1)
    assert await daily_used(db, user_id) == 1  # reset on first sight today
    await age_created(db, yesterday, TTL + 60)

    await sweeper_for(profiles).sweep_once()

    assert await state_of(db, yesterday) == "expired"
    assert await daily_used(db, user_id) == 1  # today's unit is still used
    assert await state_of(db, today) == "reserved"


async def test_concurrent_sweepers_expire_each_reservation_exactly_once(
    quota_settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    """Replicas sweeping at once, each with its own pool: every stale reservation gives back
    exactly one unit. Each user keeps two committed units, so a second refund would show."""
    databases = [Database(quota_settings(), PerformanceMonitor()) for _ in range(3)]
    try:
        stores = [ProfileStore(d, QuotaClock(), LIMITS, PerformanceMonitor()) for d in databases]
        users = [unique_user() for _ in range(4)]
        stale: list[uuid.UUID] = []
        for user_id, email in users:
            rids = await reserve(stores[0], user_id, email, 6)
            for rid in rids[:2]:
                await stores[0].settle(rid, Settlement.COMMIT)
            for rid in rids[2:]:
                await age_created(db, rid, TTL + 60)
            stale += rids[2:]
        expected = await stale_count(db)
        assert expected >= len(stale) == 16

        results = await asyncio.gather(
            *(sweeper_for(store, batch_size=3).sweep_once() for store in stores * 2)
        )

        assert sum(r.expired for r in results) == expected
        for user_id, _ in users:
            assert await daily_used(db, user_id) == 2
        assert {await state_of(db, rid) for rid in stale} == {"expired"}
    finally:
        for d in databases:
            await d.close()


async def test_a_late_settlement_racing_the_expiry_applies_once(
    profiles: ProfileStore, db: asyncpg.Connection
) -> None:
    user_id, email = unique_user()
    _, rid = await reserve(profiles, user_id, email, 2)
    outcomes = await asyncio.gather(
        profiles.settle(rid, Settlement.REFUND),
        *(profiles.settle(rid, Settlement.EXPIRE) for _ in range(6)),
    )
    assert sum(1 for o in outcomes if o is not None and o.applied) == 1
    assert await daily_used(db, user_id) == 1
    assert await state_of(db, rid) in {"refunded", "expired"}


# -- pruning -------------------------------------------------------------------------------------


async def test_prune_deletes_only_settled_rows_past_the_retention(
    profiles: ProfileStore, db: asyncpg.Connection
) -> None:
    user_id, email = unique_user()
    rids = await reserve(profiles, user_id, email, 10)
    old_settled, young_settled, pending = rids[:7], rids[7:9], rids[9]
    for rid, settlement in zip(
        old_settled + young_settled,
        [Settlement.COMMIT, Settlement.REFUND, Settlement.EXPIRE] * 3,
        strict=False,
    ):
        settled = await profiles.settle(rid, settlement)
        assert settled is not None and settled.applied
    for rid in old_settled:
        await age_settled(db, rid, RETENTION + 60)
    for rid in young_settled:
        await age_settled(db, rid, RETENTION - 60)
    # A pending row is never pruned, whatever its timestamps say (a settled_at that old cannot
    # happen, but only the state may decide). Younger than the TTL, so no sweep expires it.
    await db.execute(
        "UPDATE quota_reservations SET settled_at = now() - make_interval(secs => $2)"
        " WHERE reservation_id = $1",
        pending,
        RETENTION * 10,
    )

    assert await profiles.prune_settled(RETENTION, 2) == 2  # at most `limit`, oldest first
    assert await prunable_count(db) >= 5
    expected = await prunable_count(db)
    before = metric(PRUNED_METRIC)
    result = await sweeper_for(profiles, batch_size=2).sweep_once()  # batches of 2, 2, 1

    assert result.pruned == expected
    assert metric(PRUNED_METRIC) - before == expected
    assert await prunable_count(db) == 0
    assert [await state_of(db, rid) for rid in old_settled] == [None] * 7
    assert [await state_of(db, rid) for rid in young_settled] == ["refunded", "expired"]
    assert await state_of(db, pending) == "reserved"
    settled = await profiles.settle(pending, Settlement.COMMIT)
    assert settled is not None and settled.applied
    # A duplicate settlement of a pruned reservation finds nothing; of a kept one, "already".
    assert await profiles.settle(old_settled[0], Settlement.REFUND) is None
    kept = await profiles.settle(young_settled[0], Settlement.REFUND)
    assert kept is not None and not kept.applied


# -- the loop ------------------------------------------------------------------------------------


async def wait_for_state(db: asyncpg.Connection, rid: uuid.UUID, state: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        while await state_of(db, rid) != state:
            await asyncio.sleep(0.02)


async def test_the_service_runs_the_sweeper(
    quota_settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    settings = quota_settings(
        quota_reservation_ttl_seconds=TTL,
        quota_sweep_interval_seconds=0.05,
        profile_cache_ttl_seconds=60,
    )
    user_id, email = unique_user()
    metadata = user_metadata(user_id, email)
    async with running_quota(settings) as quota:
        reserved = await quota.stub.ReserveQuota(
            quota_pb2.ReserveQuotaRequest(
                caller=quota_pb2.Caller(user_id=user_id, email=email, client_ip=unique_ip())
            ),
            timeout=TIMEOUT,
        )
        rid = uuid.UUID(reserved.reservation_id.removeprefix("u_"))
        seen = await quota.stub.GetQuota(
            quota_pb2.GetQuotaRequest(), metadata=metadata, timeout=TIMEOUT
        )
        assert seen.used == 1  # and now cached for a minute

        await age_created(db, rid, TTL + 60)
        await wait_for_state(db, rid, "expired")

        # The sweeper invalidated the cached profile: the unit shows as back at once.
        after = await quota.stub.GetQuota(
            quota_pb2.GetQuotaRequest(), metadata=metadata, timeout=TIMEOUT
        )
        assert after.used == 0
        late = await quota.stub.SettleReservation(
            quota_pb2.SettleReservationRequest(
                reservation_id=reserved.reservation_id, outcome=quota_pb2.OUTCOME_COMMIT
            ),
            timeout=TIMEOUT,
        )
        assert not late.applied
        assert await daily_used(db, user_id) == 0


class FlakyProfileStore(ProfileStore):
    """Fails its first `failures` lookups of stale reservations like a database outage."""

    def __init__(self, inner: ProfileStore, failures: int) -> None:
        super().__init__(inner.db, inner.clock, inner.limits, inner.perf)
        self.failures = failures
        self.calls = 0

    async def stale_reservations(self, older_than_seconds: float, limit: int) -> list[uuid.UUID]:
        self.calls += 1
        if self.calls <= self.failures:
            raise database_unavailable()
        return await super().stale_reservations(older_than_seconds, limit)


async def test_the_loop_survives_database_errors(
    profiles: ProfileStore, db: asyncpg.Connection
) -> None:
    user_id, email = unique_user()
    (rid,) = await reserve(profiles, user_id, email, 1)
    await age_created(db, rid, TTL + 60)
    flaky = FlakyProfileStore(profiles, failures=3)
    sweeper = ReservationSweeper(flaky, TTL, RETENTION, interval_seconds=0.02)
    await sweeper.start()
    try:
        await wait_for_state(db, rid, "expired")
        assert flaky.calls > 3
        assert sweeper.running
    finally:
        await sweeper.stop()
    assert not sweeper.running
    assert await daily_used(db, user_id) == 0


async def test_the_loop_keeps_running_while_the_database_is_unreachable(
    quota_settings: SettingsFactory,
) -> None:
    settings: QuotaSettings = quota_settings(
        database_url="postgresql://postgres@127.0.0.1:1/nowhere", db_retry_attempts=1
    )
    database = Database(settings, PerformanceMonitor())
    unreachable = ProfileStore(database, QuotaClock(), LIMITS, PerformanceMonitor())
    with pytest.raises(Exception, match="database is unavailable"):
        await sweeper_for(unreachable).sweep_once()
    sweeper = ReservationSweeper(unreachable, TTL, RETENTION, interval_seconds=0.02)
    await sweeper.start()
    try:
        await asyncio.sleep(0.3)  # many failed sweeps
        assert sweeper.running
    finally:
        await sweeper.stop()
        await database.close()
    assert not sweeper.running


def test_sweeper_rejects_nonsense_settings(profiles: ProfileStore) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ReservationSweeper(profiles, TTL, RETENTION, 30, batch_size=0)
    with pytest.raises(ValueError, match="ttl_seconds"):
        ReservationSweeper(profiles, 0, RETENTION, 30)


def test_settings_defaults_and_bounds(quota_settings: SettingsFactory) -> None:
    defaults = QuotaSettings()
    assert defaults.quota_reservation_ttl_seconds == 300
    assert defaults.quota_sweep_interval_seconds == 30
    assert defaults.quota_settled_retention_seconds == 86400
    with pytest.raises(ValueError, match=r"quota_reservation_ttl_seconds|QUOTA_RESERVATION"):
        quota_settings(quota_reservation_ttl_seconds=0)


# -- GrpcService.on_start ------------------------------------------------------------------------


async def test_on_start_hooks_run_once_the_server_serves_and_a_failure_stops_it() -> None:
    events: list[str] = []
    service: GrpcService | None = None

    async def serving_check() -> None:
        assert service is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT
            )
        events.append(f"started:{health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")

    async def failing() -> None:
        events.append("failing")
        raise RuntimeError("cannot start")

    async def closed() -> None:
        events.append("stopped")

    settings = ServiceSettings(grpc_port=0, shutdown_grace_seconds=0.5)
    service = GrpcService(
        "t", settings, [], lambda server: None, on_start=[serving_check], on_stop=[closed]
    )
    await service.start()
    await service.stop()
    assert events == ["started:SERVING", "stopped"]

    events.clear()
    broken = GrpcService(
        "t", settings, [], lambda server: None, on_start=[failing], on_stop=[closed]
    )
    with pytest.raises(RuntimeError, match="cannot start"):
        await broken.start()
    assert events == ["failing", "stopped"]  # stopped, its on_stop hooks run
