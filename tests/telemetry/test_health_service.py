"""The health report of the telemetry service in-process, against the real PostgreSQL and Redis:
the replicas' stats pushed to it (StatsCollectorService.ReportStats over gRPC) and pulled from
generation and quota stand-ins (grpc.health.v1 and StatsService.GetStats on real servers)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from genmesh.stats.v1 import stats_pb2, stats_pb2_grpc
from genmesh.telemetry.v1 import telemetry_pb2
from services.common.breaker import CircuitBreaker
from services.common.perf import PerformanceMonitor
from services.common.replica_stats import ReplicaStatsBuilder
from services.telemetry.settings import TelemetrySettings
from tests.telemetry.fake_services import FakeService, fake_service
from tests.telemetry.test_service import Running, closed_port, make_settings, running

pytestmark = pytest.mark.integration


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
async def services() -> AsyncIterator[tuple[FakeService, FakeService]]:
    """generation and quota, each answering Check and GetStats as one replica."""
    async with (
        fake_service("generation", "gen-pulled") as generation,
        fake_service("quota", "quota-pulled") as quota,
    ):
        yield generation, quota


def settings_for(
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    services: tuple[FakeService, FakeService],
    **overrides: Any,
) -> TelemetrySettings:
    generation, quota = services
    values: dict[str, Any] = {
        "generation_addr": generation.address,
        "quota_addr": quota.address,
        "replica_id": "tel-a",
        **overrides,
    }
    return make_settings(database_url, redis_url, redis_prefix, **values)


@pytest.fixture(scope="module")
async def telemetry(
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    services: tuple[FakeService, FakeService],
) -> AsyncIterator[Running]:
    async with running(settings_for(database_url, redis_url, redis_prefix, services)) as r:
        yield r


@asynccontextmanager
async def collector(r: Running) -> AsyncIterator[stats_pb2_grpc.StatsCollectorServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.service.port}") as channel:
        yield stats_pb2_grpc.StatsCollectorServiceStub(channel)


async def push(r: Running, *reports: stats_pb2.ReplicaStats) -> None:
    async with collector(r) as stub:
        for stats in reports:
            await stub.ReportStats(stats_pb2.ReportStatsRequest(stats=stats), timeout=5)


async def leave(r: Running, *replicas: tuple[str, str]) -> None:
    """Clean stops: ttl_seconds 0."""
    await push(
        r, *(stats_pb2.ReplicaStats(service=s, replica=n, ttl_seconds=0) for s, n in replicas)
    )


def generation_replica(
    name: str, *, errors: int, calls: int, hits: int, openai: CircuitBreaker | None = None
) -> ReplicaStatsBuilder:
    perf = PerformanceMonitor()
    for i in range(calls):
        perf.record("openai.chat.completions", 100.0 * (1 + i % 3), failed=i < errors)
    breaker = openai or CircuitBreaker("openai")

    class Cache:
        def __init__(self) -> None:
            self.hits, self.misses, self.entries, self.backend = hits, 2, 12, "redis"

    async def cache() -> Cache:
        return Cache()

    return ReplicaStatsBuilder(
        "generation",
        name,
        perf=perf,
        breakers=[breaker],
        cache=cache,
        inflight=lambda: 1,
        fallbacks={"redis": lambda: False},
        serving=serving,
    )


async def serving() -> bool:
    return True


def replicas_of(report: telemetry_pb2.HealthReport) -> list[tuple[str, str]]:
    return [(r.service, r.replica) for r in report.replicas]


def operation(
    report: telemetry_pb2.HealthReport, service: str, name: str, window: int
) -> telemetry_pb2.OperationStats:
    return next(
        o
        for o in report.operations
        if (o.service, o.operation, o.window_seconds) == (service, name, window)
    )


# -- pushed stats reach the report ---------------------------------------------------------


async def test_stats_from_two_generation_replicas_reach_the_report(
    telemetry: Running, services: tuple[FakeService, FakeService]
) -> None:
    gen_a = generation_replica("gen-a", errors=2, calls=10, hits=6)
    tripped = CircuitBreaker("openai", failure_threshold=1)
    gen_b = generation_replica("gen-b", errors=1, calls=30, hits=2, openai=tripped)
    await push(telemetry, await gen_a.build(30), await gen_b.build(30))
    try:
        report = await telemetry.report()
        assert report.status == "healthy", report.reasons
        assert list(report.reasons) == []
        assert replicas_of(report) == [
            ("generation", "gen-a"),
            ("generation", "gen-b"),
            ("generation", "gen-pulled"),
            ("quota", "quota-pulled"),
            ("telemetry", "tel-a"),
        ]
        deps = {d.name: d for d in report.dependencies}
        assert set(deps) == {"database", "redis", "generation", "quota", "openai"}
        assert all(d.status == "healthy" for d in deps.values()), deps
        breakers = {(b.service, b.name): b for b in report.circuit_breakers}
        openai = breakers["generation", "openai"]
        assert (openai.state, openai.replicas, openai.tripped_replicas) == ("closed", 2, 0)
        assert ("telemetry", "redis") in breakers
        assert (report.cache.hits, report.cache.misses, report.cache.entries) == (8, 4, 12)
        for window in (60, 300):
            chat = operation(report, "generation", "openai.chat.completions", window)
            assert (chat.count, chat.errors, chat.replicas) == (40, 3, 2)
            assert chat.error_rate == pytest.approx(3 / 40)
            assert chat.requests_per_second == pytest.approx(40 / window)
            # Weighted: gen-a's 10 calls total 1900 ms, gen-b's 30 calls 6000 ms.
            assert chat.avg_ms == pytest.approx((1900 + 6000) / 40)
            assert chat.p95_ms >= 300.0
            assert chat.max_ms == 300.0

        # One replica's upstream breaker opens: degraded, and the report says where.
        permit = tripped.try_acquire()
        assert permit is not None and permit.failure()  # it opens
        await push(telemetry, await gen_b.build(30))
        report = await telemetry.report()
        assert report.status == "degraded"
        assert "generation/gen-b has circuit breaker openai open" in report.reasons
        assert {d.name: d.status for d in report.dependencies}["openai"] == "unhealthy"
        openai = {(b.service, b.name): b for b in report.circuit_breakers}["generation", "openai"]
        assert (openai.state, openai.tripped_replicas) == ("open", 1)
    finally:
        await leave(telemetry, ("generation", "gen-a"), ("generation", "gen-b"))


async def test_no_serving_quota_replica_is_unhealthy_and_one_pushed_serving_is_not(
    telemetry: Running, services: tuple[FakeService, FakeService]
) -> None:
    _, quota = services
    quota.health.status = health_pb2.HealthCheckResponse.NOT_SERVING
    quota.stats.stats.serving = False
    try:
        report = await telemetry.report()
        assert report.status == "unhealthy"
        assert any(r.startswith("no quota replica is serving") for r in report.reasons)
        assert "quota/quota-pulled is not serving" in report.reasons
        quota_dep = {d.name: d for d in report.dependencies}["quota"]
        assert (quota_dep.status, "NOT_SERVING" in quota_dep.detail) == ("unhealthy", True)

        # Another quota replica (behind the same address) still serves: degraded only.
        await push(
            telemetry,
            stats_pb2.ReplicaStats(service="quota", replica="q-b", serving=True, ttl_seconds=30),
        )
        report = await telemetry.report()
        assert report.status == "degraded"
    finally:
        quota.health.status = health_pb2.HealthCheckResponse.SERVING
        quota.stats.stats.serving = True
        await leave(telemetry, ("quota", "q-b"))


async def test_a_report_expires_after_its_ttl_and_ttl_zero_removes_it(telemetry: Running) -> None:
    await push(
        telemetry,
        stats_pb2.ReplicaStats(service="generation", replica="brief", serving=True, ttl_seconds=1),
        stats_pb2.ReplicaStats(service="generation", replica="stays", serving=True, ttl_seconds=60),
    )
    assert {"brief", "stays"} <= {r for _, r in replicas_of(await telemetry.report())}
    await asyncio.sleep(1.3)
    replicas = {r for _, r in replicas_of(await telemetry.report())}
    assert "brief" not in replicas and "stays" in replicas
    await leave(telemetry, ("generation", "stays"))
    assert "stays" not in {r for _, r in replicas_of(await telemetry.report())}


async def test_error_rates_fall_back_to_zero_after_the_window_passes(telemetry: Running) -> None:
    clock = FakeClock(50_000.0)
    perf = PerformanceMonitor(clock=clock)
    builder = ReplicaStatsBuilder("quota", "q-clock", perf=perf, serving=serving)
    for i in range(8):
        perf.record("db.reserve", 20.0, failed=i % 2 == 0)
    try:
        await push(telemetry, await builder.build(30))
        report = await telemetry.report()
        assert operation(report, "quota", "db.reserve", 60).error_rate == 0.5
        assert operation(report, "quota", "db.reserve", 300).error_rate == 0.5

        clock.now += 400  # both windows have passed on that replica
        await push(telemetry, await builder.build(30))
        report = await telemetry.report()
        for window in (60, 300):
            figures = operation(report, "quota", "db.reserve", window)
            assert (figures.count, figures.errors, figures.error_rate) == (0, 0, 0.0)
    finally:
        await leave(telemetry, ("quota", "q-clock"))


async def test_report_stats_refuses_what_it_cannot_keep(telemetry: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await push(telemetry, stats_pb2.ReplicaStats(service="", replica="x", ttl_seconds=5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_telemetry_answers_get_stats_for_itself(telemetry: Running) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{telemetry.service.port}") as channel:
        stats = await stats_pb2_grpc.StatsServiceStub(channel).GetStats(
            stats_pb2.GetStatsRequest(), timeout=5
        )
    assert (stats.service, stats.replica, stats.serving) == ("telemetry", "tel-a", True)
    assert [(f.name, f.engaged) for f in stats.fallbacks] == [("redis", False)]


# -- every telemetry replica, and Redis down -----------------------------------------------


async def test_every_telemetry_replica_sees_every_pushed_report(
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    services: tuple[FakeService, FakeService],
) -> None:
    shared = f"{redis_prefix}telemetry-{uuid.uuid4().hex[:8]}:"

    def settings(replica: str) -> TelemetrySettings:
        return settings_for(
            database_url,
            redis_url,
            redis_prefix,
            services,
            redis_key_prefix=shared,
            replica_id=replica,
        )

    async with running(settings("tel-a")) as a, running(settings("tel-b")) as b:
        await push(
            a,
            stats_pb2.ReplicaStats(
                service="generation", replica="gen-x", serving=True, ttl_seconds=30
            ),
        )
        await push(
            b,
            stats_pb2.ReplicaStats(
                service="generation", replica="gen-y", serving=True, ttl_seconds=30
            ),
        )
        for r in (a, b):
            replicas = replicas_of(await r.report())
            assert {("generation", "gen-x"), ("generation", "gen-y")} <= set(replicas)
            # Each telemetry replica keeps its own stats there too.
            assert {("telemetry", "tel-a"), ("telemetry", "tel-b")} <= set(replicas)
        # A clean stop reaching one telemetry replica leaves every report.
        await leave(b, ("generation", "gen-x"))
        assert ("generation", "gen-x") not in replicas_of(await a.report())
    async with running(settings("tel-c")) as c:
        # tel-a and tel-b stopped cleanly: gone at once, not after their ttl.
        telemetry = {r for s, r in replicas_of(await c.report()) if s == "telemetry"}
        assert telemetry == {"tel-c"}


async def test_without_redis_pushed_reports_are_kept_in_memory(
    database_url: str, redis_prefix: str, services: tuple[FakeService, FakeService]
) -> None:
    settings = settings_for(
        database_url,
        f"redis://127.0.0.1:{closed_port()}/0",
        redis_prefix,
        services,
        redis_timeout_seconds=0.1,
    )
    async with running(settings) as r:
        await push(
            r,
            stats_pb2.ReplicaStats(
                service="generation", replica="gen-m", serving=True, ttl_seconds=30
            ),
        )
        report = await r.report()
    assert ("generation", "gen-m") in replicas_of(report)
    assert report.status == "degraded"
    assert any("memory" in reason for reason in report.reasons)
    assert any(reason.startswith("redis is failing") for reason in report.reasons)


# -- a dependency that never answers -------------------------------------------------------


async def test_the_admin_report_answers_within_two_seconds_while_generation_hangs(
    database_url: str, redis_url: str, redis_prefix: str, services: tuple[FakeService, FakeService]
) -> None:
    _, quota = services
    async with fake_service("generation", "gen-hung") as hung:
        hung.hang()
        # The default timeouts and deadline (not the tests' shorter ones).
        settings = settings_for(
            database_url, redis_url, redis_prefix, (hung, quota), replica_id="tel-hang"
        )
        async with running(settings) as r:
            timings: list[float] = []
            reports: list[telemetry_pb2.HealthReport] = []
            for _ in range(2):
                started = time.monotonic()
                reports.append(await r.report(timeout=2.0))
                timings.append(time.monotonic() - started)
            started = time.monotonic()
            public = await r.stub.GetHealth(telemetry_pb2.GetHealthRequest(), timeout=2.0)
            timings.append(time.monotonic() - started)
    assert max(timings) < 2.0, timings
    for report in reports:
        generation = {d.name: d for d in report.dependencies}["generation"]
        assert generation.status == "unhealthy"
        assert "timed out" in generation.detail
        assert report.status == "unhealthy"
        assert any(
            reason.startswith("no generation replica is serving") for reason in report.reasons
        )
    assert public.status == "unhealthy"
