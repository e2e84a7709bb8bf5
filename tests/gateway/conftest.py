"""Fixtures of the gateway tests: the descriptor set, a clean environment, the in-test upstream
and the Envoys in front of it (see harness.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from genmesh.generation.v1 import generation_pb2_grpc
from genmesh.telemetry.v1 import telemetry_pb2_grpc
from services.gateway.render import (
    DEFAULT_DESCRIPTOR_SET,
)
from tests.gateway.harness import (
    MAX_BYTES,
    REPO,
    SECRET,
    SETTING_ENV,
    FakeRateLimitService,
    Gateway,
    Generation,
    Telemetry,
    Upstream,
    start_gateway,
    stop,
)


@pytest.fixture(scope="session")
def descriptor_set() -> Path:
    """The transcoder's descriptor set, built if this checkout has none yet."""
    if not DEFAULT_DESCRIPTOR_SET.exists():
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "build_protos.py")],
            cwd=REPO,
            env=env,
            check=True,
            timeout=300,
        )
    return DEFAULT_DESCRIPTOR_SET


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No gateway setting leaks in from the environment running the tests."""
    for name in SETTING_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="session")
async def upstream() -> AsyncIterator[Upstream]:
    """TelemetryService and GenerationService with grpc.health.v1, in the test event loop (so
    every test talks to Envoy asynchronously: a blocking call would starve this server)."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ]
    )
    telemetry = Telemetry()
    telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(telemetry, server)
    ratelimit = FakeRateLimitService()
    ratelimit.add_to(server)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(Generation(), server)
    health = HealthServicer()
    for name in (
        "genmesh.telemetry.v1.TelemetryService",
        "genmesh.generation.v1.GenerationService",
        # The limited gateway's quota cluster (only the rate limit service is here).
        "genmesh.quota.v1.QuotaService",
    ):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Upstream(port=port, telemetry=telemetry, ratelimit=ratelimit)
    await server.stop(grace=None)


@pytest.fixture(scope="session")
async def gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, descriptor_set: Path
) -> AsyncIterator[Gateway]:
    running, process = await start_gateway(
        tmp_path_factory.mktemp("envoy"), upstream.port, SECRET, MAX_BYTES
    )
    yield running
    stop(process)


@pytest.fixture(scope="session")
async def secretless_gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, descriptor_set: Path
) -> AsyncIterator[Gateway]:
    running, process = await start_gateway(
        tmp_path_factory.mktemp("envoy-no-secret"), upstream.port, "", MAX_BYTES
    )
    yield running
    stop(process)


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=20) as http:
        yield http


@pytest.fixture(scope="session")
async def limited_gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, descriptor_set: Path
) -> AsyncIterator[Gateway]:
    """Its quota cluster is the upstream, whose rate limit service is scripted."""
    running, process = await start_gateway(
        tmp_path_factory.mktemp("envoy-limited"), upstream.port, SECRET, MAX_BYTES, upstream.port
    )
    yield running
    stop(process)
