"""The quota replica's stats (genmesh.stats.v1): GetStats over gRPC, with Redis up or down,
and the pushes to telemetry's StatsCollectorService (a recording fake)."""

from __future__ import annotations

import asyncio

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genmesh.quota.v1 import quota_pb2
from genmesh.stats.v1 import stats_pb2, stats_pb2_grpc
from services.common.stats_service import STATS_SERVICE_NAME
from tests.common.stats_collector import running_collector
from tests.quota.conftest import RunningQuota, SettingsFactory, running_quota, unique_ip

pytestmark = pytest.mark.integration


def guest(ip: str) -> quota_pb2.ReserveQuotaRequest:
    return quota_pb2.ReserveQuotaRequest(caller=quota_pb2.Caller(client_ip=ip))


async def get_stats(quota: RunningQuota) -> stats_pb2.ReplicaStats:
    return await stats_pb2_grpc.StatsServiceStub(quota.channel).GetStats(
        stats_pb2.GetStatsRequest(), timeout=5
    )


async def test_get_stats_answers(quota: RunningQuota) -> None:
    await quota.stub.ReserveQuota(guest(unique_ip()), timeout=10)
    stats = await get_stats(quota)
    assert stats.service == "quota"
    assert stats.replica
    assert stats.serving
    assert stats.ttl_seconds == 15  # three of the default 5 s intervals
    assert [b.name for b in stats.breakers] == ["redis"]
    assert stats.breakers[0].state == stats_pb2.BREAKER_STATE_CLOSED
    assert [(f.name, f.engaged) for f in stats.fallbacks] == [("redis", False)]
    assert not stats.HasField("cache")  # quota has no response cache
    assert stats.inflight == 0
    windows = {(op.name, op.window_seconds) for op in stats.operations}
    assert {(name, w) for name, _ in windows for w in (60, 300)} == windows
    assert any(name.startswith("redis.") for name, _ in windows)

    health = health_pb2_grpc.HealthStub(quota.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=STATS_SERVICE_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_get_stats_shows_the_redis_fallback_engaged_when_redis_is_down(
    quota_settings: SettingsFactory,
) -> None:
    settings = quota_settings(
        redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.2, redis_error_threshold=1
    )
    async with running_quota(settings) as quota:
        async with asyncio.timeout(30):
            await quota.stub.ReserveQuota(guest(unique_ip()), timeout=10)
            stats = await get_stats(quota)
    assert [(f.name, f.engaged) for f in stats.fallbacks] == [("redis", True)]
    [redis] = stats.breakers
    assert redis.name == "redis"
    assert redis.state == stats_pb2.BREAKER_STATE_OPEN
    assert redis.failures >= 1 and redis.HasField("last_failure_time")
    assert stats.serving  # Redis is optional: still serving


async def test_quota_pushes_its_stats_and_leaves_on_stop(quota_settings: SettingsFactory) -> None:
    async with running_collector() as collector:
        settings = quota_settings(
            telemetry_addr=collector.addr,
            stats_publish_interval_seconds=0.1,
            replica_id="quota-test-replica",
        )
        async with running_quota(settings):
            reports = await collector.recorder.wait_for(lambda r: len(r) >= 2)
        stopped = collector.recorder.of("quota", "quota-test-replica")
    assert all((r.service, r.replica) == ("quota", "quota-test-replica") for r in reports)
    assert reports[0].ttl_seconds == 1 and reports[0].serving
    assert stopped[-1].ttl_seconds == 0
