"""Aggregation of the generation replicas' published stats, and the health status rules,
with plain dicts and fake probes (no Redis, no network)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.common.perf import OperationTotals, PerformanceMonitor
from services.telemetry.health import (
    DependencyReport,
    Probe,
    Status,
    SystemHealth,
    overall_status,
)
from services.telemetry.stats import StaticStatsSource, aggregate


def snapshot(replica: str, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "replica": replica,
        "published_at": 1_700_000_000.0,
        "circuit_breakers": [
            {
                "name": "openai",
                "state": "closed",
                "failures": 1,
                "successes": 10,
                "last_failure_time": None,
            }
        ],
        "cache": {"hits": 3, "misses": 1, "entries": 7, "backend": "redis"},
        "operations": [
            {
                "name": "openai.chat.completions",
                "count": 10,
                "errors": 1,
                "total_ms": 1000.0,
                "max_ms": 300.0,
                "slow": 0,
            }
        ],
    }
    base.update(overrides)
    return base


def test_replicas_are_summed_and_merged() -> None:
    a = snapshot("a")
    b = snapshot(
        "b",
        circuit_breakers=[
            {
                "name": "openai",
                "state": "half_open",
                "failures": 5,
                "successes": 2,
                "last_failure_time": 1_700_000_100.5,
            }
        ],
        cache={"hits": 5, "misses": 1, "entries": 9, "backend": "redis"},
        operations=[
            {
                "name": "openai.chat.completions",
                "count": 30,
                "errors": 2,
                "total_ms": 3000.0,
                "max_ms": 2500.0,
                "slow": 1,
            },
            {
                "name": "redis.get",
                "count": 4,
                "errors": 0,
                "total_ms": 4.0,
                "max_ms": 2.0,
                "slow": 0,
            },
        ],
    )
    stats = aggregate([a, b])
    assert stats.replicas == ["a", "b"]
    [breaker] = stats.breakers
    assert (breaker.state, breaker.failures, breaker.successes) == ("half_open", 6, 12)
    assert breaker.last_failure_time == 1_700_000_100.5
    assert stats.cache is not None
    assert (stats.cache.hits, stats.cache.misses) == (8, 2)
    assert stats.cache.hit_rate == pytest.approx(0.8)
    # Both replicas share the Redis cache: its entries are counted once.
    assert stats.cache.entries == 9
    ops = {o.name: o for o in stats.operations}
    chat = ops["openai.chat.completions"]
    assert (chat.count, chat.errors, chat.slow, chat.max_ms) == (40, 3, 1, 2500.0)
    assert chat.avg_ms == pytest.approx(100.0)
    assert chat.error_rate == pytest.approx(3 / 40)
    assert ops["redis.get"].count == 4


def test_the_worst_breaker_state_wins() -> None:
    states = ["closed", "open", "half_open"]
    stats = aggregate(
        snapshot(str(i), circuit_breakers=[{"name": "openai", "state": s}])
        for i, s in enumerate(states)
    )
    assert stats.breaker("openai") is not None
    assert stats.breakers[0].state == "open"


def test_in_memory_caches_add_up_and_local_operations_join() -> None:
    memory = {"hits": 1, "misses": 3, "entries": 4, "backend": "memory"}
    local = [OperationTotals("db.feedback.copy", count=2, errors=1, total_ms=10.0, max_ms=6.0)]
    stats = aggregate(
        [snapshot("a", cache=memory), snapshot("b", cache=memory, operations=[])], local
    )
    assert stats.cache is not None
    assert stats.cache.entries == 8
    assert stats.cache.hit_rate == pytest.approx(0.25)
    ops = {o.name: o for o in stats.operations}
    assert ops["db.feedback.copy"].error_rate == pytest.approx(0.5)
    assert ops["openai.chat.completions"].count == 10


def test_malformed_snapshots_are_skipped() -> None:
    good = snapshot("good")
    bad_state = snapshot("bad", circuit_breakers=[{"name": "openai", "state": "melted"}])
    stats = aggregate([good, bad_state, {"nonsense": True}, snapshot("x", cache="nope")])
    assert stats.replicas == ["good"]


def test_nothing_published_means_no_cache_and_no_breakers() -> None:
    stats = aggregate([])
    assert stats.cache is None
    assert stats.breakers == []
    assert stats.replicas == []


def test_a_snapshot_without_cache_or_lookups_has_a_zero_hit_rate() -> None:
    stats = aggregate([snapshot("a", cache={"hits": 0, "misses": 0, "entries": 0})])
    assert stats.cache is not None
    assert stats.cache.hit_rate == 0.0


def dep(name: str, status: Status) -> DependencyReport:
    return DependencyReport(name, status, 1.0)


@pytest.mark.parametrize(
    ("down", "expected"),
    [
        (None, Status.HEALTHY),
        ("database", Status.UNHEALTHY),
        ("generation", Status.UNHEALTHY),
        ("quota", Status.UNHEALTHY),
        ("redis", Status.DEGRADED),
        ("openai", Status.DEGRADED),
    ],
)
def test_overall_status(down: str | None, expected: Status) -> None:
    names = ["database", "redis", "generation", "quota", "openai"]
    deps = [dep(n, Status.UNHEALTHY if n == down else Status.HEALTHY) for n in names]
    assert overall_status(deps) is expected


def test_a_slow_or_unknown_dependency() -> None:
    assert overall_status([dep("database", Status.DEGRADED)]) is Status.DEGRADED
    assert overall_status([dep("openai", Status.UNKNOWN)]) is Status.HEALTHY


def system_health(probes: list[Probe], snapshots: list[dict[str, Any]]) -> SystemHealth:
    return SystemHealth(
        probes,
        StaticStatsSource(snapshots),
        PerformanceMonitor(),
        timeout_seconds=0.2,
        degraded_latency_ms=50,
    )


async def ok() -> None:
    return None


async def test_a_hanging_probe_is_cut_at_its_timeout() -> None:
    async def hang() -> None:
        await asyncio.Event().wait()

    async def slow() -> None:
        await asyncio.sleep(0.1)

    health = system_health(
        [Probe("database", ok), Probe("quota", hang), Probe("redis", slow)], [snapshot("a")]
    )
    report = await asyncio.wait_for(health.report(), 10)
    deps = {d.name: d for d in report.dependencies}
    assert deps["quota"].status is Status.UNHEALTHY
    assert "no answer" in deps["quota"].detail
    assert deps["redis"].status is Status.DEGRADED
    assert deps["database"].status is Status.HEALTHY
    assert deps["openai"].status is Status.HEALTHY
    assert report.status is Status.UNHEALTHY


async def test_breaker_state_drives_the_openai_dependency() -> None:
    half_open = snapshot("a", circuit_breakers=[{"name": "openai", "state": "half_open"}])
    report = await system_health([Probe("database", ok)], [half_open]).report()
    deps = {d.name: d for d in report.dependencies}
    assert deps["openai"].status is Status.DEGRADED
    assert report.status is Status.DEGRADED

    other = snapshot("a", circuit_breakers=[{"name": "something", "state": "open"}])
    report = await system_health([Probe("database", ok)], [other]).report()
    deps = {d.name: d for d in report.dependencies}
    assert deps["openai"].status is Status.UNKNOWN
    assert "openai" in deps["openai"].detail

    report = await system_health([Probe("database", ok)], []).report()
    assert {d.name: d for d in report.dependencies}["openai"].status is Status.UNKNOWN
    assert report.status is Status.HEALTHY


async def test_concurrent_reports_share_one_round_of_probes() -> None:
    calls = 0

    async def counted() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)

    health = system_health([Probe("database", counted)], [])
    reports = await asyncio.gather(*(health.report() for _ in range(5)))
    assert calls == 1
    assert len({id(r) for r in reports}) == 1
