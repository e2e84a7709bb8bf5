"""Direct gRPC calls with the generated stubs, grpc.health.v1 on every service, and one
trace across the mesh."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid

import asyncpg
import grpc
import httpx
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from genmesh.generation.v1 import generation_pb2, generation_pb2_grpc
from genmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.errors import Reason, error_info_from_call
from services.gateway.settings import DEFAULT_DESCRIPTOR_SET
from tests.e2e.conftest import RunningMesh

pytestmark = pytest.mark.e2e


def addresses(mesh: RunningMesh) -> dict[str, str]:
    c = mesh.config
    return {
        "genmesh.generation.v1.GenerationService": c.generation_addr,
        "genmesh.quota.v1.QuotaService": c.quota_addr,
        "genmesh.telemetry.v1.TelemetryService": c.telemetry_addr,
    }


async def test_every_service_is_serving(mesh: RunningMesh) -> None:
    for service, addr in addresses(mesh).items():
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (service, name)


async def test_generate_over_grpc(mesh: RunningMesh) -> None:
    async with grpc.aio.insecure_channel(mesh.config.generation_addr) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        reply = await stub.Generate(
            generation_pb2.GenerateRequest(text=f"hello {uuid.uuid4()}"),
            metadata=(("x-genmesh-client-ip", "10.1.2.3"),),
            timeout=30,
        )
    assert reply.text
    assert reply.quota.plan == "guest"


async def test_internal_quota_rpcs_over_grpc(mesh: RunningMesh) -> None:
    async with grpc.aio.insecure_channel(mesh.config.quota_addr) as channel:
        stub = quota_pb2_grpc.QuotaServiceStub(channel)
        caller = quota_pb2.Caller(client_ip="10.9.8.7")
        reservation = await stub.ReserveQuota(quota_pb2.ReserveQuotaRequest(caller=caller))
        assert reservation.quota.used >= 1
        refund = quota_pb2.SettleReservationRequest(
            reservation_id=reservation.reservation_id, outcome=quota_pb2.OUTCOME_REFUND
        )
        first = await stub.SettleReservation(refund)
        second = await stub.SettleReservation(refund)
    assert first.applied is True
    assert second.applied is False
    assert first.quota.used == reservation.quota.used - 1


async def test_bad_grpc_input_is_invalid_argument_with_field(mesh: RunningMesh) -> None:
    async with grpc.aio.insecure_channel(mesh.config.telemetry_addr) as channel:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SubmitFeedback(telemetry_pb2.SubmitFeedbackRequest(rating=7))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = error_info_from_call(tuple(caught.value.trailing_metadata() or ()))  # type: ignore[arg-type]
    assert err is not None
    assert err.reason is Reason.INVALID_ARGUMENT
    assert [v.field for v in err.violations] == ["rating"]


async def test_internal_rpcs_are_not_reachable_through_the_gateway(mesh: RunningMesh) -> None:
    gateway = f"{mesh.config.gateway_host}:{mesh.config.gateway_port}"
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = quota_pb2_grpc.QuotaServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReserveQuota(
                quota_pb2.ReserveQuotaRequest(caller=quota_pb2.Caller(client_ip="1.2.3.4")),
                timeout=5,
            )
    assert caught.value.code() != grpc.StatusCode.OK


def unannotated_methods() -> list[str]:
    """The gRPC path of every genmesh method without a google.api.http rule: internal RPCs,
    which have no REST route."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(DEFAULT_DESCRIPTOR_SET.read_bytes())
    return sorted(
        f"/{file.package}.{service.name}/{rpc.name}"
        for file in fds.file
        if file.package.startswith("genmesh.")
        for service in file.service
        for rpc in service.method
        if not rpc.options.HasExtension(annotations_pb2.http)
    )


# Other gRPC services the mesh's services serve, none of them for the public.
OTHER_GRPC_METHODS = [
    "/grpc.health.v1.Health/Check",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
    "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs",
    # A public method by its gRPC path: only its REST route reaches it.
    "/genmesh.telemetry.v1.TelemetryService/GetHealth",
]


async def test_internal_rpcs_are_not_reachable_as_rest_through_the_gateway(
    mesh: RunningMesh, http: httpx.Client, database_url: str
) -> None:
    """POSTing JSON to an internal RPC's gRPC path is a 404 with a JSON error from Envoy; the
    service never sees it (a security event sent that way is not stored)."""
    internal = unannotated_methods()
    assert {
        "/genmesh.quota.v1.QuotaService/ReserveQuota",
        "/genmesh.quota.v1.QuotaService/SettleReservation",
        "/genmesh.telemetry.v1.TelemetryService/RecordSecurityEvent",
        "/genmesh.stats.v1.StatsService/GetStats",
        "/genmesh.stats.v1.StatsCollectorService/ReportStats",
    } <= set(internal), internal
    forged = f"forged_{uuid.uuid4().hex[:12]}"
    bodies: dict[str, dict[str, object]] = {
        "/genmesh.telemetry.v1.TelemetryService/RecordSecurityEvent": {
            "event_type": forged,
            "severity": "SEVERITY_CRITICAL",
            "ip": "203.0.113.7",
        },
        "/genmesh.quota.v1.QuotaService/ReserveQuota": {"caller": {"client_ip": "203.0.113.7"}},
    }
    for path in [*internal, *OTHER_GRPC_METHODS]:
        r = http.post(path, json=bodies.get(path, {}))
        assert r.status_code == 404, (path, r.status_code, r.text[:300])
        assert r.headers["content-type"].startswith("application/json"), path
        body = r.json()
        assert body["code"] == 5, (path, body)
        assert [d["reason"] for d in body["details"]] == ["NOT_FOUND"], (path, body)
    # The same event sent by an internal caller, straight to telemetry, is stored: the query
    # below would see the forged one had it got through.
    control = f"control_{uuid.uuid4().hex[:12]}"
    async with grpc.aio.insecure_channel(mesh.config.telemetry_addr) as channel:
        await telemetry_pb2_grpc.TelemetryServiceStub(channel).RecordSecurityEvent(
            telemetry_pb2.RecordSecurityEventRequest(
                event_type=control, severity=telemetry_pb2.SEVERITY_LOW, ip="203.0.113.7"
            ),
            timeout=10,
        )
    conn = await asyncpg.connect(database_url)
    try:
        query = "SELECT event_type FROM security_events WHERE event_type = ANY($1::text[])"
        deadline = time.monotonic() + 10
        stored: list[str] = []
        while time.monotonic() < deadline:
            stored = [row["event_type"] for row in await conn.fetch(query, [forged, control])]
            if control in stored:
                break
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    assert stored == [control]


async def test_an_internal_callers_trace_runs_to_postgres_redis_and_the_model(
    mesh: RunningMesh,
) -> None:
    """Internal callers reach the services directly and may propagate their trace context
    (through the gateway a client's is set aside: tests/e2e/test_trace_sampling.py)."""
    trace_id = secrets.token_hex(16)
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    async with grpc.aio.insecure_channel(mesh.config.generation_addr) as channel:
        reply = await generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            generation_pb2.GenerateRequest(text=f"trace me {uuid.uuid4()}"),
            # A signed-in user, so quota's reservation goes to PostgreSQL.
            metadata=(("traceparent", traceparent), ("x-genmesh-user-id", "tracer")),
            timeout=30,
        )
    assert reply.text
    spans = mesh.collector.wait_for_spans(
        trace_id,
        {
            ("generation", "/genmesh.generation.v1.GenerationService/Generate"),
            ("quota", "/genmesh.quota.v1.QuotaService/ReserveQuota"),
            ("quota", "INSERT"),  # the reservation row, through asyncpg
            ("generation", "GET"),  # the response cache lookup, through redis
            ("generation", "chat gpt-4o-mini"),
        },
    )
    # The service called and quota share the trace the caller started ...
    assert {"generation", "quota"} <= {service for service, _ in spans}, spans
    # ... down to PostgreSQL, Redis and the model (a GenAI "chat <model>" client span).
    assert ("quota", "INSERT") in spans, spans
    assert ("generation", "GET") in spans, spans
    assert ("generation", "chat gpt-4o-mini") in spans, spans


async def test_reflection_lists_each_services_contract(mesh: RunningMesh) -> None:
    """What `grpcurl -plaintext <addr> list` shows (README)."""
    for service, addr in addresses(mesh).items():
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for reply in stub.ServerReflectionInfo(iter([request])):
                names = {s.name for s in reply.list_services_response.service}
                break
        assert {service, "grpc.health.v1.Health"} <= names, names
