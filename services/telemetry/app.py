"""Builds the telemetry service: database, Redis, the store with its group committers, the
health report and its probes. Nothing is started here."""

from __future__ import annotations

import grpc

from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.admin_auth import AdminGuard
from services.common.background import BackgroundTasks
from services.common.db import Database
from services.common.perf import PerformanceMonitor
from services.common.redis import ResilientRedis
from services.common.server import Dependency, GrpcService
from services.telemetry.access_log import SERVICE_NAME as ALS_SERVICE_NAME
from services.telemetry.access_log import AccessLogServicer, AlsMessages, add_access_log_service
from services.telemetry.edge_events import EdgeEventAggregator
from services.telemetry.group_commit import BatchLimits
from services.telemetry.health import (
    GENERATION_SERVICE,
    QUOTA_SERVICE,
    GrpcHealthTarget,
    Probe,
    SystemHealth,
)
from services.telemetry.local_security_events import LocalSecurityEvents
from services.telemetry.public_health import CachedHealth
from services.telemetry.retention import RetentionJob
from services.telemetry.servicer import TelemetryAdminServicer, TelemetryServicer
from services.telemetry.settings import TelemetrySettings
from services.telemetry.stats import RedisStatsSource
from services.telemetry.store import TelemetryStore

SERVICE_NAME = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name
ADMIN_SERVICE_NAME = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryAdminService"].full_name
# How long stop() waits for security events still being stored.
BACKGROUND_DRAIN_SECONDS = 5.0


class TelemetryService(GrpcService):
    """The service, with handles on what tests observe (the committers' counters)."""

    store: TelemetryStore
    system_health: SystemHealth
    public_health: CachedHealth


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
    # /api/health: the overall status only, from a result at most HEALTH_CACHE_SECONDS old.
    public_health = CachedHealth(
        health.report,
        max_age_seconds=settings.health_cache_seconds,
        deadline_seconds=timeout + 0.5,
    )
    servicer = TelemetryServicer(store, public_health)
    # Monthly partitions of the event tables: created ahead, dropped past retention.
    retention = RetentionJob.from_settings(db, settings)
    background = BackgroundTasks()
    guard = AdminGuard(settings.genmesh_admin_token, LocalSecurityEvents(store, background))
    # Envoy's access log of the gateway's failures -> per-client bursts -> security events.
    access_log = AccessLogServicer(
        AlsMessages(),
        EdgeEventAggregator(
            window_seconds=settings.edge_event_window_seconds,
            threshold=settings.edge_event_threshold,
            max_tracked=settings.edge_event_max_tracked,
        ),
        LocalSecurityEvents(store, background),
    )

    def register(server: grpc.aio.Server) -> None:
        telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(servicer, server)
        telemetry_pb2_grpc.add_TelemetryAdminServiceServicer_to_server(
            TelemetryAdminServicer(guard, health), server
        )
        add_access_log_service(server, access_log)

    async def drain_background() -> None:
        await background.drain(BACKGROUND_DRAIN_SECONDS)

    service = TelemetryService(
        "telemetry",
        settings,
        [SERVICE_NAME, ADMIN_SERVICE_NAME],
        register,
        dependencies=[
            Dependency("postgres", db.ping, required=True),
            # Only the health report's stats come from Redis: it is reported, not required.
            Dependency("redis", redis.ping, required=False),
        ],
        # Called by Envoy itself, at the rate of the gateway's failures: no span, no validation.
        lean_services=[ALS_SERVICE_NAME],
        # Envoy never ends its access log streams: end them so the drain need not wait.
        on_drain=[access_log.close_streams],
        on_start=[retention.start],
        # In order: the retention job stops (it uses the database); the server has drained,
        # so hand pending security events to the store, commit what is pending, then close
        # clients.
        on_stop=[
            retention.stop,
            drain_background,
            store.close,
            generation.close,
            quota.close,
            db.close,
            redis.close,
        ],
    )
    service.store = store
    service.system_health = health
    service.public_health = public_health
    return service
