"""ReplicaStatsBuilder: what a replica reports about itself (genmesh.stats.v1.ReplicaStats),
built from a service's breakers, performance monitor, cache, in-flight count, fallbacks and
health, with no service behind it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer

from genmesh.stats.v1 import stats_pb2
from services.common.breaker import CircuitBreaker
from services.common.perf import PerformanceMonitor
from services.common.redis import ResilientRedis
from services.common.replica_stats import (
    ReplicaStatsBuilder,
    breaker_stats,
    default_replica_id,
    redis_fallback,
    replica_id,
)
from services.common.settings import RedisSettings


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Figures:
    hits: int
    misses: int
    entries: int
    backend: str


# -- breakers ------------------------------------------------------------------------------------


def test_breaker_states_map_to_the_enum_with_their_figures() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "upstream", failure_threshold=2, reset_timeout=30, half_open_attempts=2, clock=clock
    )
    closed = breaker_stats(breaker.snapshot())
    assert closed.state == stats_pb2.BREAKER_STATE_CLOSED
    assert (closed.name, closed.failures, closed.successes) == ("upstream", 0, 0)
    assert not closed.HasField("last_failure_time")  # never failed: unset

    ok = breaker.try_acquire()
    assert ok is not None
    ok.success()
    before = time.time()
    for _ in range(2):
        permit = breaker.try_acquire()
        assert permit is not None
        permit.failure()
    opened = breaker_stats(breaker.snapshot())
    assert opened.state == stats_pb2.BREAKER_STATE_OPEN
    assert (opened.failures, opened.successes, opened.consecutive_failures) == (2, 1, 2)
    assert opened.retry_after_seconds == pytest.approx(30)
    assert opened.HasField("last_failure_time")
    failed_at = opened.last_failure_time.ToMicroseconds() / 1e6
    assert before - 1 <= failed_at <= time.time() + 1

    clock.now += 30  # time is up: half-open, a probe admitted
    probe = breaker.try_acquire()
    assert probe is not None
    half_open = breaker_stats(breaker.snapshot())
    assert half_open.state == stats_pb2.BREAKER_STATE_HALF_OPEN
    assert half_open.probes_in_flight == 1
    assert half_open.retry_after_seconds == 0
    probe.release()


async def test_every_breaker_is_reported_in_order() -> None:
    a, b = CircuitBreaker("openai"), CircuitBreaker("redis")
    stats = await ReplicaStatsBuilder("svc", "r1", breakers=[a, b]).build()
    assert [x.name for x in stats.breakers] == ["openai", "redis"]
    assert all(x.state == stats_pb2.BREAKER_STATE_CLOSED for x in stats.breakers)


# -- operations ----------------------------------------------------------------------------------


async def test_operations_have_a_60_and_a_300_second_window() -> None:
    clock = FakeClock(10_000.0)
    perf = PerformanceMonitor(slow_threshold_ms=100, clock=clock)
    perf.record("db.query", 50)
    clock.now += 120  # two minutes later: still in the 5-minute window only
    perf.record("openai.call", 20)
    perf.record("openai.call", 40, failed=True)
    perf.record("openai.call", 500)  # slow

    stats = await ReplicaStatsBuilder("svc", "r1", perf=perf).build()
    ops = {(op.name, op.window_seconds): op for op in stats.operations}
    assert set(ops) == {
        ("db.query", 60),
        ("db.query", 300),
        ("openai.call", 60),
        ("openai.call", 300),
    }
    assert [(op.name, op.window_seconds) for op in stats.operations] == sorted(ops)
    assert ops["db.query", 60].count == 0
    assert ops["db.query", 300].count == 1
    assert ops["db.query", 300].max_ms == pytest.approx(50)
    minute = ops["openai.call", 60]
    assert (minute.count, minute.errors, minute.slow) == (3, 1, 1)
    assert minute.avg_ms == pytest.approx((20 + 40 + 500) / 3)
    assert minute.max_ms == pytest.approx(500)
    assert 0 < minute.p95_ms <= 500
    assert ops["openai.call", 300].count == 3


async def test_no_monitor_no_operations() -> None:
    assert list((await ReplicaStatsBuilder("svc", "r1").build()).operations) == []


# -- fallbacks -----------------------------------------------------------------------------------


def redis_settings(**overrides: Any) -> RedisSettings:
    values: dict[str, Any] = {"redis_url": "redis://127.0.0.1:1/0", "redis_error_threshold": 1}
    return RedisSettings(**(values | overrides))


async def test_redis_fallback_is_engaged_when_redis_is_unset_or_down() -> None:
    unset = ResilientRedis(redis_settings(redis_url=""), PerformanceMonitor())
    configured = ResilientRedis(redis_settings(), PerformanceMonitor())
    try:
        builder = ReplicaStatsBuilder(
            "svc",
            "r1",
            fallbacks={"unset": redis_fallback(unset), "configured": redis_fallback(configured)},
        )
        stats = await builder.build()
        assert {f.name: f.engaged for f in stats.fallbacks} == {
            "unset": True,
            "configured": False,
        }

        # One error opens this client's breaker: Redis is bypassed, the fallback serves.
        permit = configured.breaker.try_acquire()
        assert permit is not None
        permit.failure()
        stats = await builder.build()
        assert {f.name: f.engaged for f in stats.fallbacks} == {"unset": True, "configured": True}
    finally:
        await configured.close()


async def test_a_fallback_that_cannot_be_read_counts_as_engaged() -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    stats = await ReplicaStatsBuilder("svc", "r1", fallbacks={"x": broken}).build()
    assert [(f.name, f.engaged) for f in stats.fallbacks] == [("x", True)]


# -- cache, in flight, identity, health ----------------------------------------------------------


async def test_cache_inflight_identity_and_time() -> None:
    async def cache() -> Figures:
        return Figures(hits=3, misses=4, entries=5, backend="memory")

    active = {"n": 2}
    before = time.time()
    stats = await ReplicaStatsBuilder(
        "generation", "pod-7", cache=cache, inflight=lambda: active["n"]
    ).build(ttl_seconds=15)
    assert (stats.service, stats.replica, stats.ttl_seconds) == ("generation", "pod-7", 15)
    assert stats.cache == stats_pb2.CacheStats(hits=3, misses=4, entries=5, backend="memory")
    assert stats.inflight == 2
    assert before - 1 <= stats.reported_at.ToMicroseconds() / 1e6 <= time.time() + 1


async def test_without_a_cache_the_field_is_unset_and_a_failing_one_is_left_out() -> None:
    assert not (await ReplicaStatsBuilder("quota", "r1").build()).HasField("cache")

    async def failing() -> Figures:
        raise RuntimeError("cache broken")

    breaker = CircuitBreaker("redis")
    stats = await ReplicaStatsBuilder("svc", "r1", breakers=[breaker], cache=failing).build()
    assert not stats.HasField("cache")
    assert [b.name for b in stats.breakers] == ["redis"]  # the rest is still reported


async def test_serving_follows_the_health_servicer() -> None:
    builder = ReplicaStatsBuilder("svc", "r1")
    assert (await builder.build()).serving is False  # not bound to any health: unknown

    health = AsyncHealthServicer()
    builder.follow_health(health)
    assert (await builder.build()).serving is True
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert (await builder.build()).serving is False
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.enter_graceful_shutdown()
    assert (await builder.build()).serving is False

    builder.follow_health(AsyncHealthServicer(), service="not.a.Service")
    assert (await builder.build()).serving is False


def test_replica_id_prefers_the_first_setting_given() -> None:
    assert replica_id("gen-1", "pod-1") == "gen-1"
    assert replica_id("", "pod-1") == "pod-1"
    assert replica_id("", "") == default_replica_id()
    assert default_replica_id().endswith(f"-{os.getpid()}")
