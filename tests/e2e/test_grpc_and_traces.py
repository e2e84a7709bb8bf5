"""Direct gRPC calls with the generated stubs, grpc.health.v1 on every service, and one
trace across the mesh."""

from __future__ import annotations

import secrets
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from genmesh.generation.v1 import generation_pb2, generation_pb2_grpc
from genmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.errors import Reason, error_info_from_call
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
