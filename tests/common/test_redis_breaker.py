"""How ResilientRedis uses its circuit breaker's permits, with a stand-in client and a fake
clock (no Redis server needed: the real-server cases are in test_clients.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import cast

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from services.common.breaker import BreakerState, CircuitBreaker
from services.common.perf import PerformanceMonitor
from services.common.redis import RedisUnavailable, ResilientRedis
from services.common.settings import RedisSettings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resilient(clock: FakeClock, threshold: int = 2) -> ResilientRedis:
    r = ResilientRedis(
        RedisSettings(redis_url=""), PerformanceMonitor(), client=cast(Redis, object())
    )
    # The same breaker ResilientRedis builds, on a clock the test moves.
    r.breaker = CircuitBreaker(
        "redis", failure_threshold=threshold, reset_timeout=60, half_open_attempts=1, clock=clock
    )
    return r


async def broken(_client: Redis) -> None:
    raise RedisConnectionError("connection refused")


async def fine(_client: Redis) -> str:
    return "ok"


def run(r: ResilientRedis, fn: Callable[[Redis], Awaitable[object]]) -> Awaitable[object]:
    return r.run("get", fn)


async def test_errors_open_the_breaker_then_calls_are_bypassed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = resilient(FakeClock())
    calls = 0

    async def counted(client: Redis) -> None:
        nonlocal calls
        calls += 1
        await broken(client)

    with caplog.at_level(logging.WARNING, logger="services.common.redis"):
        for _ in range(3):
            with pytest.raises(RedisUnavailable):
                await run(r, counted)
    assert calls == 2  # the third never reached Redis
    assert r.breaker.state is BreakerState.OPEN
    assert not r.available
    bypassed = [m for m in caplog.messages if m.startswith("redis bypassed")]
    assert bypassed == ["redis bypassed for 60s after errors: connection refused"]


async def test_the_probe_after_the_cooldown_brings_redis_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    r = resilient(clock)
    for _ in range(2):
        with pytest.raises(RedisUnavailable):
            await run(r, broken)
    clock.now += 60
    with caplog.at_level(logging.INFO, logger="services.common.redis"):
        assert await run(r, fine) == "ok"
    assert r.breaker.state is BreakerState.CLOSED
    assert "redis is back" in caplog.messages


async def test_a_failed_probe_bypasses_redis_again(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    r = resilient(clock)
    for _ in range(2):
        with pytest.raises(RedisUnavailable):
            await run(r, broken)
    clock.now += 60
    with (
        caplog.at_level(logging.WARNING, logger="services.common.redis"),
        pytest.raises(RedisUnavailable),
    ):
        await run(r, broken)
    assert r.breaker.state is BreakerState.OPEN
    assert r.breaker.retry_after() == 60
    assert any(m.startswith("redis bypassed for 60s") for m in caplog.messages)


async def test_available_is_a_pure_read() -> None:
    clock = FakeClock()
    r = resilient(clock)
    for _ in range(2):
        with pytest.raises(RedisUnavailable):
            await run(r, broken)
    clock.now += 60
    before = r.breaker.snapshot()
    assert r.available
    assert r.available
    assert r.breaker.snapshot() == before
    assert r.breaker.snapshot().opened_total == 1


async def test_a_cancelled_probe_frees_its_slot() -> None:
    clock = FakeClock()
    r = resilient(clock)
    for _ in range(2):
        with pytest.raises(RedisUnavailable):
            await run(r, broken)
    clock.now += 60
    started = asyncio.Event()

    async def hangs(_client: Redis) -> None:
        started.set()
        await asyncio.Event().wait()

    probe = asyncio.create_task(r.run("get", hangs))
    await started.wait()
    assert r.breaker.snapshot().probes_in_flight == 1
    assert not r.available  # the one probe slot is taken
    with pytest.raises(RedisUnavailable):
        await run(r, fine)

    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    snap = r.breaker.snapshot()
    assert (snap.state, snap.probes_in_flight, snap.failures) == (BreakerState.HALF_OPEN, 0, 2)
    assert r.available
    assert await run(r, fine) == "ok"
    assert r.breaker.state is BreakerState.CLOSED


async def test_an_error_that_is_not_redis_s_counts_for_nothing() -> None:
    r = resilient(FakeClock(), threshold=1)

    async def bug(_client: Redis) -> None:
        raise ValueError("the caller's own bug")

    with pytest.raises(ValueError):
        await run(r, bug)
    snap = r.breaker.snapshot()
    assert (snap.state, snap.failures, snap.successes) == (BreakerState.CLOSED, 0, 0)


async def test_a_redis_call_timing_out_counts_as_a_failure() -> None:
    r = ResilientRedis(
        RedisSettings(redis_url="", redis_timeout_seconds=0.01, redis_error_threshold=1),
        PerformanceMonitor(),
        client=cast(Redis, object()),
    )

    async def slow(_client: Redis) -> None:
        await asyncio.sleep(1)

    with pytest.raises(RedisUnavailable):
        await run(r, slow)
    assert r.breaker.state is BreakerState.OPEN
