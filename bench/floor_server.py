"""The floor of the mesh's shape, in `make bench`: what a cache hit, a cache miss or a batch of
funnel events costs when every hop and round trip it needs is there and the code at each hop
does nothing else.

    python -m bench.floor_server quota HOST:PORT REDIS_URL KEY_PREFIX
    python -m bench.floor_server generation HOST:PORT QUOTA_ADDR REDIS_URL KEY_PREFIX
    python -m bench.floor_server telemetry HOST:PORT DATABASE_URL

A cache hit crosses, in the real mesh: Envoy's rate-limit check (the quota service, one Redis
script), the generation service, its call to the quota service to consume a unit (one Redis
script), and the cache lookup (one Redis GET). The first two roles keep exactly those hops
and round trips, with trivial work at each:

- `quota` serves envoy.service.ratelimit.v3.RateLimitService (always OK, after one Redis
  INCR) and genmesh.bench.v1.EchoService (the consume: one Redis INCR, then the text back);
- `generation` serves EchoService: it calls the quota role's Echo, reads the cached answer
  with one Redis GET (written at start) and answers with it.

A request whose `lang` is "miss" is a cache miss instead, as the mesh makes one: the quota
call (the reservation), the Redis GET that misses, the single-flight claim (SET NX), the chat
completion through the openai SDK (its aiohttp transport, as generation's default) to
OPENAI_BASE_URL with OPENAI_API_KEY from the environment, the cache write, the single-flight
publish, and the settlement (a second quota call, after the answer, as generation makes it).

`telemetry` stores funnel events, and nothing else (bench/floor_telemetry.py).

All run as the services do (grpc.aio, the default asyncio loop, the same server options,
the standard gRPC health service Envoy checks, redis.asyncio), with no interceptors,
validation, tracing, metrics or per-request logs. bench/floor.py puts them behind an Envoy
of their own (bench/gateway.py, the rate-limit filter on), so the floor goes through the same
filter chain as the mesh. Nothing in the shape the services have can cost less; the gap
between the floor and the mesh is what the services' own code costs. Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import grpc
import openai
from redis.asyncio import Redis

from bench.echo_server import SERVICE_NAME as ECHO_SERVICE
from bench.echo_server import serve_until_signal
from bench.floor_telemetry import SERVICE_NAME as TELEMETRY_SERVICE
from bench.floor_telemetry import FloorTelemetry
from bench.misses import FLOOR_MISS_LANG as MISS
from bench.misses import upstream_body
from genmesh.bench.v1 import echo_pb2, echo_pb2_grpc
from services.common.envoy_api import message_classes

USAGE = """usage: python -m bench.floor_server quota HOST:PORT REDIS_URL KEY_PREFIX
       python -m bench.floor_server generation HOST:PORT QUOTA_ADDR REDIS_URL KEY_PREFIX
       python -m bench.floor_server telemetry HOST:PORT DATABASE_URL"""
RLS_SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
# The names Envoy's health checks ask for (the clusters of the real services).
QUOTA_HEALTH = ("", ECHO_SERVICE, "genmesh.quota.v1.QuotaService")
GENERATION_HEALTH = ("", ECHO_SERVICE, "genmesh.generation.v1.GenerationService")
TELEMETRY_HEALTH = ("", TELEMETRY_SERVICE)
# Connections of the telemetry role: one statement per request, 32 requests in flight.
POOL_SIZE = 10
# About the size of a cached answer the bench's generate requests get back.
CACHED_TEXT = "floor " + "x" * 250
_OK = 1  # envoy.service.ratelimit.v3.RateLimitResponse.Code.OK


class FloorQuota(echo_pb2_grpc.EchoServiceServicer):
    """The consume: one Redis round trip."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis, self.key = redis, f"{prefix}floor:consumed"

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> echo_pb2.EchoResponse:
        await self.redis.incr(self.key)
        return echo_pb2.EchoResponse(text=request.text)


class FloorGeneration(echo_pb2_grpc.EchoServiceServicer):
    """The cache hit: one call to quota, one Redis GET; or the miss (lang MISS)."""

    def __init__(
        self,
        quota: echo_pb2_grpc.EchoServiceAsyncStub,
        redis: Redis,
        prefix: str,
        upstream: openai.AsyncOpenAI | None,
    ) -> None:
        self.quota, self.redis, self.prefix = quota, redis, prefix
        self.key = f"{prefix}floor:cached"
        self.upstream = upstream
        self._settlements: set[asyncio.Task[Any]] = set()

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> echo_pb2.EchoResponse:
        if request.lang == MISS:
            return echo_pb2.EchoResponse(text=await self._miss(request.text))
        await self.quota.Echo(echo_pb2.EchoRequest(text=request.text))
        cached = await self.redis.get(self.key)  # bytes: the client does not decode
        return echo_pb2.EchoResponse(text=cached.decode() if isinstance(cached, bytes) else "")

    async def _miss(self, text: str) -> str:
        if self.upstream is None:
            raise RuntimeError("a miss needs OPENAI_BASE_URL and OPENAI_API_KEY")
        key = f"{self.prefix}floor:miss:{text}"
        await self.quota.Echo(echo_pb2.EchoRequest(text=text))
        await self.redis.get(key)
        await self.redis.set(f"{key}:flight", "1", nx=True, px=30_000)
        completion = await self.upstream.chat.completions.create(**upstream_body(text))
        answer = completion.choices[0].message.content or ""
        await self.redis.set(key, answer, ex=60)
        await self.redis.publish(f"{key}:flight", answer)
        settle = asyncio.create_task(self._settle(text))
        self._settlements.add(settle)
        settle.add_done_callback(self._settlements.discard)
        return answer

    async def _settle(self, text: str) -> None:
        await self.quota.Echo(echo_pb2.EchoRequest(text=text))


def _add_rate_limit_service(server: grpc.aio.Server, redis: Redis, prefix: str) -> None:
    request_class, response_class = message_classes(
        "envoy.service.ratelimit.v3.RateLimitRequest",
        "envoy.service.ratelimit.v3.RateLimitResponse",
    )
    key = f"{prefix}floor:decisions"

    async def should_rate_limit(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await redis.incr(key)
        response: Any = response_class()
        response.overall_code = _OK
        return response

    handler = grpc.unary_unary_rpc_method_handler(
        should_rate_limit,
        request_deserializer=request_class.FromString,
        response_serializer=response_class.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(RLS_SERVICE, {"ShouldRateLimit": handler})]
    )


async def serve_quota(addr: str, redis_url: str, prefix: str) -> None:
    redis = Redis.from_url(redis_url)

    def register(server: grpc.aio.Server) -> None:
        echo_pb2_grpc.add_EchoServiceServicer_to_server(FloorQuota(redis, prefix), server)
        _add_rate_limit_service(server, redis, prefix)

    try:
        await serve_until_signal(addr, QUOTA_HEALTH, register)
    finally:
        await redis.aclose()


async def serve_generation(addr: str, quota_addr: str, redis_url: str, prefix: str) -> None:
    redis = Redis.from_url(redis_url)
    await redis.set(f"{prefix}floor:cached", CACHED_TEXT)
    channel = grpc.aio.insecure_channel(quota_addr)
    upstream = None
    if os.environ.get("OPENAI_BASE_URL") and os.environ.get("OPENAI_API_KEY"):
        upstream = openai.AsyncOpenAI(
            base_url=os.environ["OPENAI_BASE_URL"],
            api_key=os.environ["OPENAI_API_KEY"],
            max_retries=0,
            http_client=openai.DefaultAioHttpClient(),
        )

    def register(server: grpc.aio.Server) -> None:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        servicer = FloorGeneration(stub, redis, prefix, upstream)
        echo_pb2_grpc.add_EchoServiceServicer_to_server(servicer, server)

    try:
        await serve_until_signal(addr, GENERATION_HEALTH, register)
    finally:
        if upstream is not None:
            await upstream.close()
        await channel.close(grace=None)
        await redis.aclose()


async def serve_telemetry(addr: str, database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=POOL_SIZE)

    try:
        await serve_until_signal(addr, TELEMETRY_HEALTH, FloorTelemetry(pool).register)
    finally:
        await pool.close()


ROLES: dict[str, tuple[int, Callable[..., Coroutine[Any, Any, None]]]] = {
    "quota": (3, serve_quota),
    "generation": (4, serve_generation),
    "telemetry": (2, serve_telemetry),
}


def main(argv: list[str]) -> None:
    role = ROLES.get(argv[0]) if argv else None
    if role is None or len(argv) - 1 != role[0]:
        sys.exit(USAGE)
    asyncio.run(role[1](*argv[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
