"""Where telemetry keeps the replicas' pushed stats (ReplicaStatsStore): in Redis under its own
keys, so every telemetry replica sees every report, each expiring after its ttl_seconds and
dropped at once by ttl_seconds 0; in memory, with the same expiry, while Redis is unavailable.
Also ReportStats' checks of what it keeps and telemetry's own LocalReporter."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from genmesh.stats.v1 import stats_pb2
from services.common.errors import ServiceError
from services.common.perf import PerformanceMonitor
from services.common.redis import RedisUnavailable, ResilientRedis
from services.common.replica_stats import ReplicaStatsBuilder, timestamp
from services.common.settings import RedisSettings
from services.telemetry.stats_collector import (
    MAX_TTL_SECONDS,
    LocalReporter,
    ReplicaStatsStore,
    check_report,
)

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def report(
    replica: str, ttl: int = 15, *, service: str = "generation", at: float | None = None
) -> stats_pb2.ReplicaStats:
    stats = stats_pb2.ReplicaStats(service=service, replica=replica, serving=True, ttl_seconds=ttl)
    if at is not None:
        stats.reported_at.CopyFrom(timestamp(at))
    return stats


def names(replicas: list[stats_pb2.ReplicaStats]) -> list[tuple[str, str]]:
    return [(r.service, r.replica) for r in replicas]


def without_redis(**kwargs: Any) -> ReplicaStatsStore:
    return ReplicaStatsStore(
        ResilientRedis(RedisSettings(redis_url=""), PerformanceMonitor()), **kwargs
    )


# -- in memory (no Redis) ------------------------------------------------------------------


async def test_without_redis_reports_are_kept_in_memory_until_their_ttl() -> None:
    clock = FakeClock(100.0)
    store = without_redis(clock=clock)
    await store.put(report("gen-a", ttl=15))
    await store.put(report("gen-b", ttl=30))
    await store.put(report("quota-a", ttl=15, service="quota"))
    reports = await store.current()
    assert reports.from_redis is False
    assert names(reports.replicas) == [
        ("generation", "gen-a"),
        ("generation", "gen-b"),
        ("quota", "quota-a"),
    ]
    assert all(r.HasField("reported_at") for r in reports.replicas)  # stamped on arrival

    clock.now += 15  # gen-a and quota-a expire, gen-b has 15 s left
    assert names((await store.current()).replicas) == [("generation", "gen-b")]
    clock.now += 15
    assert (await store.current()).replicas == []


async def test_ttl_zero_drops_a_replica_at_once_and_a_newer_push_replaces() -> None:
    store = without_redis(clock=FakeClock(0.0))
    await store.put(report("gen-a", at=T0))
    await store.put(report("gen-b", at=T0))
    newer = report("gen-a", at=T0 + 5)
    newer.inflight = 3
    await store.put(newer)
    await store.put(report("gen-b", ttl=0))
    [only] = (await store.current()).replicas
    assert (only.replica, only.inflight) == ("gen-a", 3)


async def test_a_ttl_is_capped_and_memory_is_bounded() -> None:
    clock = FakeClock(0.0)
    store = without_redis(clock=clock, max_memory_reports=2)
    await store.put(report("forever", ttl=10**6))
    await store.put(report("short", ttl=5))
    await store.put(report("new", ttl=15))  # full: the one expiring soonest makes room
    assert {r.replica for r in (await store.current()).replicas} == {"forever", "new"}
    clock.now = MAX_TTL_SECONDS
    assert (await store.current()).replicas == []


def test_reports_that_cannot_be_kept_are_refused() -> None:
    check_report(report("gen-a"))
    for bad in (
        report("", service="generation"),
        report("gen-a", service=""),
        report("gen-a", ttl=-1),
        report("x" * 300),
    ):
        with pytest.raises(ServiceError) as caught:
            check_report(bad)
        assert caught.value.code.name == "INVALID_ARGUMENT"


async def test_local_reporter_keeps_its_own_stats_and_drops_them_on_stop() -> None:
    store = without_redis()
    builder = ReplicaStatsBuilder("telemetry", "tel-a", perf=PerformanceMonitor())
    reporter = LocalReporter(builder, store, interval_seconds=0.05)
    assert reporter.ttl_seconds == 1
    await reporter.start()
    async with asyncio.timeout(5):
        while not (await store.current()).replicas:
            await asyncio.sleep(0.01)
    [own] = (await store.current()).replicas
    assert (own.service, own.replica, own.ttl_seconds) == ("telemetry", "tel-a", 1)
    await reporter.stop()
    assert (await store.current()).replicas == []


# -- in Redis ------------------------------------------------------------------------------


@pytest.fixture
async def shared_redis(
    redis_url: str, redis_prefix: str
) -> AsyncIterator[Callable[[], ResilientRedis]]:
    """ResilientRedis clients on one fresh key prefix: each one a telemetry replica's."""
    settings = RedisSettings(
        redis_url=redis_url, redis_key_prefix=f"{redis_prefix}collector-{uuid.uuid4().hex[:8]}:"
    )
    made: list[ResilientRedis] = []

    def make() -> ResilientRedis:
        made.append(ResilientRedis(settings, PerformanceMonitor()))
        return made[-1]

    yield make
    for client in made:
        await client.close()


@pytest.mark.integration
async def test_every_telemetry_replica_sees_every_report(
    shared_redis: Callable[[], ResilientRedis],
) -> None:
    first, second = ReplicaStatsStore(shared_redis()), ReplicaStatsStore(shared_redis())
    await first.put(report("gen-a"))
    await second.put(report("gen-b"))
    await second.put(report("quota-a", service="quota"))
    for store in (first, second):
        reports = await store.current()
        assert reports.from_redis is True
        assert names(reports.replicas) == [
            ("generation", "gen-a"),
            ("generation", "gen-b"),
            ("quota", "quota-a"),
        ]
    # A clean stop reaching one telemetry replica removes the replica from every report.
    await second.put(report("gen-a", ttl=0))
    assert names((await first.current()).replicas) == [
        ("generation", "gen-b"),
        ("quota", "quota-a"),
    ]


@pytest.mark.integration
async def test_in_redis_a_report_expires_after_its_ttl(
    shared_redis: Callable[[], ResilientRedis],
) -> None:
    redis = shared_redis()
    store = ReplicaStatsStore(redis)
    await store.put(report("short", ttl=1))
    await store.put(report("long", ttl=30))
    assert {r.replica for r in (await store.current()).replicas} == {"short", "long"}
    other = ReplicaStatsStore(shared_redis())  # sees only what Redis has
    await asyncio.sleep(1.3)
    assert [r.replica for r in (await other.current()).replicas] == ["long"]
    assert [r.replica for r in (await store.current()).replicas] == ["long"]

    client = Redis.from_url(redis.settings.redis_url)
    try:
        keys = sorted([k.decode() async for k in client.scan_iter(match=f"{redis.prefix}*")])
        # Telemetry's own keys only; the index forgets expired members on the next write.
        assert keys == [store.index_key, store.report_key("generation", "long")]
        await store.put(report("long", ttl=30))
        assert await client.zrange(store.index_key, 0, -1) == [b"generation:long"]
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_reports_kept_while_redis_failed_still_count_once_it_is_back(
    shared_redis: Callable[[], ResilientRedis],
) -> None:
    redis = shared_redis()
    store = ReplicaStatsStore(redis)
    await store.put(report("gen-a", at=T0))
    real_run = redis.run
    down = True

    async def flaky(operation: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        if down:
            raise RedisUnavailable(operation)
        return await real_run(operation, fn)

    redis.run = flaky  # type: ignore[method-assign]
    await store.put(report("gen-b", at=T0))  # Redis never gets it
    during = await store.current()
    assert during.from_redis is False
    assert [r.replica for r in during.replicas] == ["gen-a", "gen-b"]

    down = False
    after = await store.current()
    assert after.from_redis is True
    assert [r.replica for r in after.replicas] == ["gen-a", "gen-b"]
    # Another telemetry replica, reading Redis only, misses it until its next push.
    assert [r.replica for r in (await ReplicaStatsStore(shared_redis()).current()).replicas] == [
        "gen-a"
    ]
