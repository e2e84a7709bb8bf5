"""The generation replica's stats beyond GetStats' basics (test_service.py): calls in flight,
the Redis fallback, and the pushes to telemetry's StatsCollectorService (a recording fake)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from genmesh.generation.v1 import generation_pb2 as gen
from genmesh.stats.v1 import stats_pb2, stats_pb2_grpc
from tests.common.stats_collector import running_collector
from tests.generation.conftest import Generation, Sim, eventually

pytestmark = pytest.mark.integration


def prompt() -> gen.GenerateRequest:
    return gen.GenerateRequest(text=f"What is the capital of France? {uuid.uuid4()}", lang="en")


async def get_stats(g: Generation) -> stats_pb2.ReplicaStats:
    return await stats_pb2_grpc.StatsServiceStub(g.channel).GetStats(
        stats_pb2.GetStatsRequest(), timeout=5
    )


async def test_inflight_counts_the_model_calls_running_now(make_generation: Any, sim: Sim) -> None:
    await sim.set_faults(latency_ms=5000, rate=1.0)
    try:
        async with make_generation(sim) as g:
            call: Any = g.stub.Generate(prompt(), metadata=g.guest)
            running = asyncio.ensure_future(call)

            async def one_in_flight() -> bool:
                return (await get_stats(g)).inflight == 1

            await eventually(one_in_flight)
            call.cancel()
            await asyncio.gather(running, return_exceptions=True)

            async def none_in_flight() -> bool:
                return (await get_stats(g)).inflight == 0

            await eventually(none_in_flight)
    finally:
        await sim.clear_faults()


async def test_without_redis_the_fallback_is_engaged(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim, redis_url="") as g:
        await g.stub.Generate(prompt(), metadata=g.guest)
        stats = await get_stats(g)
    assert [(f.name, f.engaged) for f in stats.fallbacks] == [("redis", True)]
    assert [b.name for b in stats.breakers] == ["openai"]  # no Redis client, no Redis breaker
    assert stats.cache.backend == "memory"
    assert (stats.cache.misses, stats.cache.entries) == (1, 1)


async def test_stats_are_pushed_to_telemetry_and_dropped_on_stop(
    make_generation: Any, sim: Sim
) -> None:
    async with running_collector() as collector:
        recorder = collector.recorder
        async with make_generation(
            sim, telemetry_addr=collector.addr, stats_publish_interval_seconds=0.1
        ) as g:
            replica = g.settings.gen_replica_id
            first = (await recorder.wait_for(bool))[0]
            await g.stub.Generate(prompt(), metadata=g.guest)

            def shows_the_call(reports: list[stats_pb2.ReplicaStats]) -> bool:
                return any(
                    op.name == "openai.chat.completions" and op.count == 1
                    for r in reports
                    for op in r.operations
                )

            await recorder.wait_for(shows_the_call)
            live = list(recorder.of("generation", replica))
        stopped = recorder.of("generation", replica)

    assert (first.service, first.replica) == ("generation", replica)
    assert all(r.ttl_seconds == 1 for r in live)  # ceil(3 x 0.1 s)
    assert all(r.serving for r in live)
    assert [b.name for b in live[-1].breakers] == ["openai", "redis"]
    assert live[-1].cache.misses == 1
    # A clean stop: one last report, ttl 0, sent while draining (so not serving).
    last = stopped[-1]
    assert len(stopped) > len(live)
    assert last.ttl_seconds == 0
    assert not last.serving
    assert all(r.ttl_seconds == 1 for r in stopped[:-1])
