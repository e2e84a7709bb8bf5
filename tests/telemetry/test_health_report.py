"""The health report against generation and quota stand-ins on real gRPC servers (their health
Check and GetStats), with the default timeouts: it answers within 2 s even when a dependency
never answers, and reports what it pulled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from grpc_health.v1 import health_pb2

from genmesh.stats.v1 import stats_pb2
from services.telemetry.health import (
    GENERATION_SERVICE,
    QUOTA_SERVICE,
    REQUIRED_SERVICES,
    HealthReport,
    Probe,
    ServiceTarget,
    Status,
    SystemHealth,
    service_probes,
)
from services.telemetry.settings import TelemetrySettings
from tests.telemetry.fake_services import FakeService, fake_service

DEFAULTS = TelemetrySettings()


async def ok() -> None:
    return None


@asynccontextmanager
async def health_of(generation: FakeService, quota: FakeService) -> AsyncIterator[SystemHealth]:
    """SystemHealth as the app builds it (default deadline and timeouts), the stores faked."""
    targets = [
        ServiceTarget("generation", generation.address, GENERATION_SERVICE),
        ServiceTarget("quota", quota.address, QUOTA_SERVICE),
    ]
    deadline = DEFAULTS.health_report_deadline_seconds
    timeout = min(DEFAULTS.health_check_timeout_seconds, deadline)
    calls = [service_probes(t, timeout) for t in targets]
    try:
        yield SystemHealth(
            [Probe("database", ok), Probe("redis", ok), *(check for check, _ in calls)],
            pulls=[pull for _, pull in calls],
            required_services=REQUIRED_SERVICES,
            timeout_seconds=timeout,
            deadline_seconds=deadline,
            degraded_latency_ms=60_000,
        )
    finally:
        for target in targets:
            await target.close()


async def timed_report(health: SystemHealth) -> tuple[HealthReport, float]:
    started = time.monotonic()
    report = await asyncio.wait_for(health.report(), 10)
    return report, time.monotonic() - started


async def test_the_report_answers_within_two_seconds_while_generation_hangs() -> None:
    async with (
        fake_service("generation", "gen-hung") as generation,
        fake_service("quota", "quota-a") as quota,
        health_of(generation, quota) as health,
    ):
        generation.hang()
        report, elapsed = await timed_report(health)
    assert elapsed < 2.0
    assert generation.health.calls == 1 and generation.stats.calls == 1
    deps = {d.name: d for d in report.dependencies}
    assert deps["generation"].status is Status.UNHEALTHY
    assert "timed out" in deps["generation"].detail
    assert "GetStats: timed out" in deps["generation"].detail
    assert deps["quota"].status is Status.HEALTHY
    # Nothing says a generation replica serves: nothing can be generated.
    assert report.status is Status.UNHEALTHY
    assert any("no generation replica is serving" in r for r in report.reasons)
    assert [(r.service, r.replica) for r in report.replicas] == [("quota", "quota-a")]


async def test_a_hanging_getstats_alone_leaves_the_service_serving() -> None:
    async with (
        fake_service("generation", "gen-a") as generation,
        fake_service("quota", "quota-a") as quota,
        health_of(generation, quota) as health,
    ):
        generation.stats.hang = True
        report, elapsed = await timed_report(health)
    assert elapsed < 2.0
    generation_dep = {d.name: d for d in report.dependencies}["generation"]
    assert generation_dep.status is Status.HEALTHY
    assert "GetStats: timed out" in generation_dep.detail
    assert report.status is Status.HEALTHY


async def test_pulled_stats_are_in_the_report() -> None:
    async with (
        fake_service("generation", "gen-a") as generation,
        fake_service("quota", "quota-a") as quota,
        health_of(generation, quota) as health,
    ):
        generation.stats.stats.breakers.add(name="openai", state=stats_pb2.BREAKER_STATE_CLOSED)
        generation.stats.stats.operations.add(name="openai.chat", window_seconds=60, count=3)
        report = await health.report()
        assert report.status is Status.HEALTHY, report.reasons
        assert {d.name: d.status for d in report.dependencies}["openai"] is Status.HEALTHY
        [op] = report.stats.operations
        assert (op.service, op.name, op.count) == ("generation", "openai.chat", 3)

        # The one generation replica stops serving, and says so: unhealthy.
        generation.health.status = health_pb2.HealthCheckResponse.NOT_SERVING
        generation.stats.stats.serving = False
        report = await health.report()
    assert report.status is Status.UNHEALTHY
    assert "generation/gen-a is not serving" in report.reasons
