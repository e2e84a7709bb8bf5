"""Builds the telemetry service: database, Redis, the store with its group committers, the
health report and its probes. Nothing is started here."""

from __future__ import annotations

from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.db import Database
from services.common.perf import PerformanceMonitor
from services.common.redis import ResilientRedis
from services.common.server import Dependency, GrpcService
from services.telemetry.group_commit import BatchLimits
from services.telemetry.health import (
    GENERATION_SERVICE,
    QUOTA_SERVICE,
    GrpcHealthTarget,
    Probe,
    SystemHealth,
)
from services.telemetry.servicer import TelemetryServicer
from services.telemetry.settings import TelemetrySettings
from services.telemetry.stats import RedisStatsSource
from services.telemetry.store import TelemetryStore

SERVICE_NAME = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name


class TelemetryService(GrpcService):
    """The service, with handles on what tests observe (the committers' counters)."""

    store: TelemetryStore
    system_health: SystemHealth


async def create_service(settings: TelemetrySettings) -> TelemetryService:
    perf = PerformanceMonitor(settings.slow_operation_ms)
    db = Database(settings, perf)
    redis = ResilientRedis(settings, perf)
    store = TelemetryStore(
        db,
        BatchLimits(
            max_rows=settings.telemetry_batch_max_rows,
            max_wait_seconds=settings.telemetry_batch_max_wait_ms / 1000,
            max_in_flight=settings.telemetry_batch_max_in_flight,
            max_pending_rows=settings.telemetry_batch_max_pending_rows,
        ),
    )
    generation = GrpcHealthTarget(settings.generation_addr, GENERATION_SERVICE)
    quota = GrpcHealthTarget(settings.quota_addr, QUOTA_SERVICE)
    timeout = settings.health_check_timeout_seconds
    health = SystemHealth(
        [
            Probe("database", db.ping),
            Probe("redis", redis.ping),
            Probe("generation", lambda: generation.check(timeout)),
            Probe("quota", lambda: quota.check(timeout)),
        ],
        RedisStatsSource(redis),
        perf,
        timeout_seconds=timeout,
        degraded_latency_ms=settings.health_degraded_latency_ms,
        openai_breaker=settings.health_openai_breaker_name,
    )
    servicer = TelemetryServicer(store, health)
    service = TelemetryService(
        "telemetry",
        settings,
        [SERVICE_NAME],
        lambda server: telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(servicer, server),
        dependencies=[
            Dependency("postgres", db.ping, required=True),
            # Only the health report's stats come from Redis: it is reported, not required.
            Dependency("redis", redis.ping, required=False),
        ],
        # In order: the server has drained, so commit what is pending, then close clients.
        on_stop=[store.close, generation.close, quota.close, db.close, redis.close],
    )
    service.store = store
    service.system_health = health
    return service
