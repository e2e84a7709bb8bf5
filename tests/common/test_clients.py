from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.breaker import BreakerState
from services.common.db import Database
from services.common.errors import ServiceError
from services.common.perf import PerformanceMonitor
from services.common.redis import RedisUnavailable, ResilientRedis
from services.common.settings import PostgresSettings, RedisSettings

pytestmark = pytest.mark.integration


async def test_redis_runs_commands_under_the_prefix(redis_url: str, redis_prefix: str) -> None:
    r = ResilientRedis(
        RedisSettings(redis_url=redis_url, redis_key_prefix=redis_prefix), PerformanceMonitor()
    )
    try:
        key = r.key("common", "k")
        assert key.startswith(redis_prefix)
        await r.run("set", lambda c: c.set(key, "v", ex=30))
        assert await r.run("get", lambda c: c.get(key)) == b"v"
        await r.ping()
    finally:
        await r.close()


async def test_unreachable_redis_fails_fast_then_is_bypassed() -> None:
    settings = RedisSettings(
        redis_url="redis://127.0.0.1:1/0",
        redis_timeout_seconds=0.2,
        redis_error_threshold=2,
        redis_cooldown_seconds=60,
    )
    perf = PerformanceMonitor()
    r = ResilientRedis(settings, perf)
    try:
        async with asyncio.timeout(5):
            for _ in range(2):
                with pytest.raises(RedisUnavailable):
                    await r.run("get", lambda c: c.get("x"))
            assert r.breaker.state is BreakerState.OPEN
            attempts = perf.snapshot()[0].count
            with pytest.raises(RedisUnavailable):
                await r.run("get", lambda c: c.get("x"))
        # Bypassed: no new attempt was made while the breaker is open.
        assert perf.snapshot()[0].count == attempts
        assert not r.available
    finally:
        await r.close()


async def test_redis_comes_back_by_itself_after_the_cooldown(redis_url: str) -> None:
    r = ResilientRedis(
        RedisSettings(redis_url=redis_url, redis_error_threshold=1, redis_cooldown_seconds=0.2),
        PerformanceMonitor(),
    )
    try:
        permit = r.breaker.try_acquire()
        assert permit is not None
        assert permit.failure() is True
        assert not r.available
        await asyncio.sleep(0.3)
        assert await r.run("ping", lambda c: c.ping()) is True
        assert r.breaker.state is BreakerState.CLOSED
    finally:
        await r.close()


def test_no_redis_url_means_the_fallback() -> None:
    r = ResilientRedis(RedisSettings(redis_url=""), PerformanceMonitor())
    assert not r.configured
    assert not r.available


async def test_database_runs_queries_and_times_them(database_url: str) -> None:
    perf = PerformanceMonitor()
    db = Database(PostgresSettings(database_url=database_url), perf)
    try:
        row = await db.fetchrow("select_one", "SELECT 1 AS one")
        assert row is not None
        assert row["one"] == 1
        await db.ping()
        assert [t.name for t in perf.snapshot()] == ["db.select_one"]
    finally:
        await db.close()


async def test_an_unreachable_database_is_unavailable_not_a_hang() -> None:
    db = Database(
        PostgresSettings(
            database_url="postgresql://postgres@127.0.0.1:1/none",
            db_retry_attempts=2,
            db_command_timeout_seconds=1,
        ),
        PerformanceMonitor(),
    )
    async with asyncio.timeout(10):
        with pytest.raises(ServiceError) as caught:
            await db.fetchrow("select_one", "SELECT 1")
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    await db.close()
