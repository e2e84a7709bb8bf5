"""The gRPC face of telemetry: read the caller, call the domain code, map to protos."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.admin_auth import AdminGuard
from services.common.client_networks import DEFAULT_NETWORKS, ClientNetworks
from services.common.identity import identity_from_metadata
from services.telemetry import records
from services.telemetry.health import HealthReport, SystemHealth
from services.telemetry.public_health import CachedHealth, PublicHealth
from services.telemetry.store import TelemetryStore

Context = Any  # grpc.aio.ServicerContext, generic in request and response


class TelemetryServicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    def __init__(
        self,
        store: TelemetryStore,
        health: CachedHealth,
        networks: ClientNetworks = DEFAULT_NETWORKS,
    ) -> None:
        self.store = store
        self.health = health
        self.networks = networks

    async def SubmitFeedback(
        self, request: telemetry_pb2.SubmitFeedbackRequest, context: Context
    ) -> telemetry_pb2.SubmitFeedbackResponse:
        metadata = context.invocation_metadata()
        who = identity_from_metadata(metadata, context.peer())
        key = records.idempotency_key(metadata, records.FEEDBACK_ROUTE, who, request, self.networks)
        feedback_id = await self.store.submit_feedback(records.feedback_row(request, who, key))
        return telemetry_pb2.SubmitFeedbackResponse(feedback_id=str(feedback_id))

    async def JoinWishlist(
        self, request: telemetry_pb2.JoinWishlistRequest, context: Context
    ) -> telemetry_pb2.JoinWishlistResponse:
        metadata = context.invocation_metadata()
        who = identity_from_metadata(metadata, context.peer())
        key = records.idempotency_key(metadata, records.WISHLIST_ROUTE, who, request, self.networks)
        lang = records.wishlist_lang(request)
        created = await self.store.join_wishlist(request.email, lang, who.user_id or None, key)
        return telemetry_pb2.JoinWishlistResponse(created=created)

    async def TrackEvents(
        self, request: telemetry_pb2.TrackEventsRequest, context: Context
    ) -> telemetry_pb2.TrackEventsResponse:
        who = identity_from_metadata(context.invocation_metadata(), context.peer())
        rows = records.funnel_event_rows(request.events, who, datetime.now(UTC))
        counts = await self.store.track_events(rows)
        return telemetry_pb2.TrackEventsResponse(
            accepted=counts.accepted, duplicates=counts.duplicates
        )

    async def RecordSecurityEvent(
        self, request: telemetry_pb2.RecordSecurityEventRequest, context: Context
    ) -> telemetry_pb2.RecordSecurityEventResponse:
        event_id = await self.store.record_security_event(records.security_event_row(request))
        return telemetry_pb2.RecordSecurityEventResponse(event_id=str(event_id))

    async def GetHealth(
        self, request: telemetry_pb2.GetHealthRequest, context: Context
    ) -> telemetry_pb2.GetHealthResponse:
        return public_health_response(await self.health.current())


class TelemetryAdminServicer(telemetry_pb2_grpc.TelemetryAdminServiceServicer):
    def __init__(self, guard: AdminGuard, health: SystemHealth) -> None:
        self.guard = guard
        self.health = health

    async def GetHealthReport(
        self, request: telemetry_pb2.GetHealthReportRequest, context: Context
    ) -> telemetry_pb2.HealthReport:
        metadata = tuple(context.invocation_metadata() or ())
        self.guard.check(
            metadata, identity_from_metadata(metadata, context.peer()), "GetHealthReport"
        )
        return health_report(await self.health.report())


def public_health_response(health: PublicHealth) -> telemetry_pb2.GetHealthResponse:
    """The public answer: the overall status and when it was checked, nothing else."""
    return telemetry_pb2.GetHealthResponse(
        status=health.status.value, checked_at=_timestamp(health.checked_at)
    )


def health_report(report: HealthReport) -> telemetry_pb2.HealthReport:
    """The operators' report: the status and why, the dependencies, every replica's report,
    and the figures merged across replicas."""
    stats = report.stats
    response = telemetry_pb2.HealthReport(
        status=report.status.value,
        checked_at=_timestamp(report.checked_at),
        response_time_ms=report.response_time_ms,
        reasons=report.reasons,
        dependencies=[
            telemetry_pb2.DependencyHealth(
                name=d.name, status=d.status.value, latency_ms=d.latency_ms, detail=d.detail
            )
            for d in report.dependencies
        ],
        operations=[
            telemetry_pb2.OperationStats(
                service=op.service,
                operation=op.name,
                window_seconds=op.window_seconds,
                count=op.count,
                errors=op.errors,
                slow=op.slow,
                error_rate=op.error_rate,
                requests_per_second=op.requests_per_second,
                avg_ms=op.avg_ms,
                p95_ms=op.p95_ms,
                max_ms=op.max_ms,
                replicas=op.replicas,
            )
            for op in stats.operations
        ],
        replicas=stats.replicas,
    )
    for b in stats.breakers:
        breaker = response.circuit_breakers.add(
            service=b.service,
            name=b.name,
            state=b.state_name,
            failures=b.failures,
            successes=b.successes,
            replicas=b.replicas,
            tripped_replicas=b.tripped_replicas,
        )
        if b.last_failure_time is not None:
            breaker.last_failure_time.CopyFrom(_timestamp(b.last_failure_time))
    if stats.cache is not None:
        response.cache.CopyFrom(
            telemetry_pb2.CacheStatistics(
                hits=stats.cache.hits,
                misses=stats.cache.misses,
                hit_rate=stats.cache.hit_rate,
                entries=stats.cache.entries,
            )
        )
    return response


def _timestamp(unix_seconds: float) -> timestamp_pb2.Timestamp:
    # Split before scaling: seconds * 1e9 would lose the fraction's precision.
    seconds = math.floor(unix_seconds)
    nanos = min(round((unix_seconds - seconds) * 1e9), 999_999_999)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
