"""The shape's floor (bench/floor_server.py) does each hop's Redis round trip and answers as a
cache hit would, and its Envoy keeps the rate limit filter on the echo routes."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from bench.children import Process, spawn_python, wait_grpc_serving
from bench.floor_server import CACHED_TEXT, RLS_SERVICE
from bench.floor_telemetry import SERVICE_NAME as TELEMETRY_SERVICE
from bench.gateway import ECHO_PATH, RATE_LIMIT_FILTER, add_echo
from bench.misses import FLOOR_MISS_LANG
from devstack.infra import free_port
from genmesh.bench.v1 import echo_pb2, echo_pb2_grpc
from genmesh.telemetry.v1 import telemetry_pb2
from services.common.envoy_api import message_classes
from tests.bench.conftest import ECHO_ADDR
from tests.gateway.harness import hcm
from tests.generation.conftest import UPSTREAM_API_KEY, Sim, running_sim


@pytest.fixture
async def upstream() -> AsyncIterator[Sim]:
    async with running_sim() as sim:
        yield sim


@pytest.fixture
def floor(
    redis_url: str, redis_prefix: str, tmp_path: Path, upstream: Sim
) -> Iterator[tuple[str, str, str]]:
    quota_addr, generation_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    prefix = f"{redis_prefix}floor-test-{uuid.uuid4().hex[:8]}:"
    started: list[Process] = []
    try:
        quota = spawn_python(
            "floor-quota",
            ["-m", "bench.floor_server", "quota", quota_addr, redis_url, prefix],
            os.environ,
            tmp_path,
        )
        started.append(quota)
        generation = spawn_python(
            "floor-generation",
            [
                "-m",
                "bench.floor_server",
                "generation",
                generation_addr,
                quota_addr,
                redis_url,
                prefix,
            ],
            {
                **os.environ,
                "OPENAI_BASE_URL": upstream.base_url,
                "OPENAI_API_KEY": UPSTREAM_API_KEY,
            },
            tmp_path,
        )
        started.append(generation)
        wait_grpc_serving(quota, quota_addr)
        wait_grpc_serving(generation, generation_addr)
        yield quota_addr, generation_addr, prefix
    finally:
        for process in started:
            process.stop()
        for process in started:
            assert process.popen.returncode == 0, process.log.read_text()


async def test_a_floor_hit_takes_each_round_trip_and_answers_from_the_cache(
    floor: tuple[str, str, str], redis_url: str
) -> None:
    quota_addr, generation_addr, prefix = floor
    request_class, response_class = message_classes(
        "envoy.service.ratelimit.v3.RateLimitRequest",
        "envoy.service.ratelimit.v3.RateLimitResponse",
    )
    async with (
        grpc.aio.insecure_channel(quota_addr) as quota,
        grpc.aio.insecure_channel(generation_addr) as generation,
    ):
        check = quota.unary_unary(
            f"/{RLS_SERVICE}/ShouldRateLimit",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        request: Any = request_class(domain="genmesh")
        decision: Any = await check(request, timeout=5)
        assert decision.overall_code == 1  # OK
        hit = echo_pb2_grpc.EchoServiceStub(generation)
        for _ in range(3):
            answer = await hit.Echo(echo_pb2.EchoRequest(text="hello"), timeout=5)
            assert answer.text == CACHED_TEXT
    redis = Redis.from_url(redis_url)
    try:
        assert await redis.get(f"{prefix}floor:decisions") == b"1"
        assert await redis.get(f"{prefix}floor:consumed") == b"3"
    finally:
        await redis.aclose()


async def test_a_floor_miss_asks_the_upstream_caches_and_settles(
    floor: tuple[str, str, str], upstream: Sim, redis_url: str
) -> None:
    _, generation_addr, prefix = floor
    async with grpc.aio.insecure_channel(generation_addr) as channel:
        answer = await echo_pb2_grpc.EchoServiceStub(channel).Echo(
            echo_pb2.EchoRequest(text="name a colour", lang=FLOOR_MISS_LANG), timeout=10
        )
    assert answer.text and answer.text != CACHED_TEXT
    assert await upstream.requests() == 1
    redis = Redis.from_url(redis_url)
    try:
        assert await redis.get(f"{prefix}floor:miss:name a colour") == answer.text.encode()
        # The reservation, then the settlement after the answer.
        for _ in range(50):
            if await redis.get(f"{prefix}floor:consumed") == b"2":
                break
            await asyncio.sleep(0.05)
        assert await redis.get(f"{prefix}floor:consumed") == b"2"
    finally:
        await redis.aclose()


def test_the_floor_envoy_keeps_the_rate_limit_filter(rendered: dict[str, Any]) -> None:
    routes = hcm(add_echo(rendered, ECHO_ADDR, rate_limited=True))["route_config"]["virtual_hosts"][
        0
    ]["routes"]
    markers = [r for r in routes if r["match"].get("prefix") == ECHO_PATH]
    assert len(markers) == 2
    for marker in markers:
        assert RATE_LIMIT_FILTER not in marker.get("typed_per_filter_config", {})


async def test_the_floor_telemetry_stores_each_event_once(
    database_url: str, tmp_path: Path
) -> None:
    addr = f"127.0.0.1:{free_port()}"
    role = spawn_python(
        "floor-telemetry",
        ["-m", "bench.floor_server", "telemetry", addr, database_url],
        os.environ,
        tmp_path,
    )
    ids = [str(uuid.uuid4()) for _ in range(3)]
    request = telemetry_pb2.TrackEventsRequest(
        events=[telemetry_pb2.FunnelEvent(event_id=i.upper(), event="floor_test") for i in ids]
    )
    track = f"/{TELEMETRY_SERVICE}/TrackEvents"
    try:
        wait_grpc_serving(role, addr)
        async with grpc.aio.insecure_channel(addr) as channel:
            call = channel.unary_unary(
                track,
                request_serializer=telemetry_pb2.TrackEventsRequest.SerializeToString,
                response_deserializer=telemetry_pb2.TrackEventsResponse.FromString,
            )
            first = await call(request, timeout=10)
            again = await call(request, timeout=10)
    finally:
        role.stop()
    assert (first.accepted, first.duplicates) == (3, 0)
    assert (again.accepted, again.duplicates) == (0, 3)
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetch(
            "SELECT event_id::text AS id FROM funnel_events WHERE event_id = ANY($1::uuid[])", ids
        )
    finally:
        await conn.close()
    assert sorted(r["id"] for r in stored) == sorted(ids)
