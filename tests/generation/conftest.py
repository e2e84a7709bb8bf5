"""Helpers for the generation tests: the OpenAI simulator in-process, the real quota service on
this run's PostgreSQL and Redis, a recording fake of telemetry, and the generation service
itself, each started on an ephemeral port and stopped at the end."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest

from genmesh.generation.v1 import generation_pb2_grpc
from genmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.errors import ServiceError, error_info_from_call
from services.common.identity import CLIENT_IP_HEADER
from services.common.server import GrpcService
from services.common.settings import ServiceSettings
from services.generation.app import GenerationService, create_service
from services.generation.settings import GenerationSettings
from services.quota.app import create_service as create_quota_service
from services.quota.settings import QuotaSettings
from simulator import start
from tests.simulator.support import sim_settings

ADMIN_TOKEN = "test-admin-token"
# The simulator checks it, and the service sends it: neither knows what the other is.
UPSTREAM_API_KEY = "sk-test-upstream-key"
GUEST_DAILY_LIMIT = 5


# -- the OpenAI simulator ------------------------------------------------------------------------


@dataclass
class Sim:
    url: str
    http: aiohttp.ClientSession

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    async def set_faults(self, **faults: Any) -> None:
        async with self.http.post(f"{self.url}/_sim/faults", json=faults) as resp:
            assert resp.status == 200, await resp.text()

    async def clear_faults(self) -> None:
        async with self.http.delete(f"{self.url}/_sim/faults") as resp:
            assert resp.status == 200

    async def stats(self) -> dict[str, int]:
        async with self.http.get(f"{self.url}/_sim/stats") as resp:
            return {k: int(v) for k, v in (await resp.json()).items()}

    async def requests(self) -> int:
        return (await self.stats())["requests"]


@asynccontextmanager
async def running_sim(**overrides: Any) -> AsyncIterator[Sim]:
    runner, url = await start(sim_settings(**({"api_key": UPSTREAM_API_KEY} | overrides)))
    try:
        async with aiohttp.ClientSession() as http:
            yield Sim(url, http)
    finally:
        await runner.cleanup()


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    async with running_sim() as running:
        yield running


# -- the real quota service ----------------------------------------------------------------------


@dataclass
class Quota:
    addr: str
    stub: quota_pb2_grpc.QuotaServiceAsyncStub

    async def of_guest(self, ip: str) -> quota_pb2.Quota:
        return await self.stub.GetQuota(
            quota_pb2.GetQuotaRequest(), metadata=((CLIENT_IP_HEADER, ip),)
        )


@pytest.fixture(scope="module")
async def quota(database_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[Quota]:
    values: dict[str, Any] = {
        "grpc_port": 0,
        "metrics_port": 0,
        "database_url": database_url,
        "redis_url": redis_url,
        "redis_key_prefix": redis_prefix,
        "guest_daily_limit": GUEST_DAILY_LIMIT,
        "free_daily_limit": GUEST_DAILY_LIMIT,
        "pro_daily_limit": GUEST_DAILY_LIMIT,
        "quota_timezone": "UTC",
        "shutdown_grace_seconds": 1.0,
    }
    settings = QuotaSettings(**values)
    service = await create_quota_service(settings)
    port = await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Quota(f"127.0.0.1:{port}", quota_pb2_grpc.QuotaServiceStub(channel))
    finally:
        await channel.close(grace=None)
        await service.stop()


def unique_ip() -> str:
    """A fresh IPv6 address from the documentation range: one guest per test."""
    h = uuid.uuid4().hex
    return f"2001:db8:{h[0:4]}:{h[4:8]}:{h[8:12]}:{h[12:16]}:{h[16:20]}:{h[20:24]}"


# -- a recording telemetry fake ------------------------------------------------------------------


class RecordingTelemetry(telemetry_pb2_grpc.TelemetryServiceServicer):
    def __init__(self) -> None:
        self.events: list[telemetry_pb2.RecordSecurityEventRequest] = []

    async def RecordSecurityEvent(
        self, request: telemetry_pb2.RecordSecurityEventRequest, context: Any
    ) -> telemetry_pb2.RecordSecurityEventResponse:
        self.events.append(request)
        return telemetry_pb2.RecordSecurityEventResponse(event_id=str(uuid.uuid4()))

    def of_type(self, event_type: str) -> list[telemetry_pb2.RecordSecurityEventRequest]:
        return [e for e in self.events if e.event_type == event_type]


@dataclass
class Telemetry:
    addr: str
    recorder: RecordingTelemetry


@pytest.fixture(scope="module")
async def telemetry() -> AsyncIterator[Telemetry]:
    fake_settings: dict[str, Any] = {"grpc_port": 0, "shutdown_grace_seconds": 0.5}
    recorder = RecordingTelemetry()  # type: ignore[abstract]  # only the RPC generation calls
    service = GrpcService(
        "telemetry-fake",
        ServiceSettings(**fake_settings),
        ["genmesh.telemetry.v1.TelemetryService"],
        lambda server: telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(recorder, server),
    )
    port = await service.start()
    try:
        yield Telemetry(f"127.0.0.1:{port}", recorder)
    finally:
        await service.stop()


# -- the generation service ----------------------------------------------------------------------


@dataclass
class Generation:
    service: GenerationService
    settings: GenerationSettings
    channel: grpc.aio.Channel
    stub: generation_pb2_grpc.GenerationServiceAsyncStub
    admin: generation_pb2_grpc.GenerationAdminServiceAsyncStub
    ip: str = field(default_factory=unique_ip)

    @property
    def guest(self) -> tuple[tuple[str, str], ...]:
        """Metadata for this test's guest (as Envoy would set it)."""
        return ((CLIENT_IP_HEADER, self.ip),)

    @property
    def admin_md(self) -> tuple[tuple[str, str], ...]:
        return (("x-admin-token", ADMIN_TOKEN),)


def generation_settings(**overrides: Any) -> GenerationSettings:
    base: dict[str, Any] = {
        "grpc_port": 0,
        "metrics_port": 0,
        "openai_api_key": UPSTREAM_API_KEY,
        "openai_max_retries": 0,
        "openai_retry_base_delay_seconds": 0.01,
        "openai_retry_max_delay_seconds": 0.5,
        "openai_timeout_seconds": 10.0,
        "openai_text_model": "gpt-4o-mini",
        "openai_vision_model": "gpt-4o",
        "gen_max_inflight": 25,
        "circuit_breaker_threshold": 5,
        "circuit_breaker_timeout_seconds": 60.0,
        "circuit_breaker_half_open_attempts": 3,
        "genmesh_admin_token": ADMIN_TOKEN,
        "stats_publish_interval_seconds": 0.2,
        "gen_replica_id": f"test-{uuid.uuid4().hex[:8]}",
        "shutdown_grace_seconds": 1.0,
        "health_probe_interval_seconds": 0.2,
    }
    return GenerationSettings(**(base | overrides))


GenerationFactory = Callable[..., Any]


@pytest.fixture
def make_generation(
    redis_url: str, redis_prefix: str, quota: Quota, telemetry: Telemetry
) -> Callable[..., Any]:
    """`async with make_generation(sim, **settings) as gen:` a running service on the real
    quota service, with its own Redis prefix (so "invalidate all" touches only its keys)."""

    @asynccontextmanager
    async def running(sim: Sim | None, **overrides: Any) -> AsyncIterator[Generation]:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "redis_key_prefix": f"{redis_prefix}gen-{uuid.uuid4().hex[:8]}:",
            "quota_addr": quota.addr,
            "telemetry_addr": telemetry.addr,
            "openai_base_url": sim.base_url if sim is not None else "",
        }
        settings = generation_settings(**(values | overrides))
        service = await create_service(settings)
        port = await service.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield Generation(
                service,
                settings,
                channel,
                generation_pb2_grpc.GenerationServiceStub(channel),
                generation_pb2_grpc.GenerationAdminServiceStub(channel),
            )
        finally:
            await channel.close(grace=None)
            await service.stop()

    return running


# -- assertions ----------------------------------------------------------------------------------


def _trailers(err: grpc.aio.AioRpcError) -> list[tuple[str, Any]]:
    # A grpc.aio.Metadata of (key, value) pairs at runtime; grpc-stubs type it otherwise.
    metadata: Any = err.trailing_metadata()
    return [(str(key), value) for key, value in metadata or ()]


def service_error(err: grpc.aio.AioRpcError) -> ServiceError:
    """The rich status (ErrorInfo, RetryInfo, BadRequest) of a failed call."""
    error = error_info_from_call(_trailers(err))
    assert error is not None, f"no rich status in {err.code()} {err.details()}"
    return error


def retry_after_header(err: grpc.aio.AioRpcError) -> int:
    values = [value for key, value in _trailers(err) if key == "retry-after"]
    assert values, "no retry-after trailing metadata"
    return int(values[0])


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)
