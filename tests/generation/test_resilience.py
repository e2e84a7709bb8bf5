"""The generation service under upstream trouble, over gRPC against the simulator's faults:
the breaker's probes, retries within the deadline, cancellation, the in-flight limit, and
single-flight within and across replicas."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from typing import Any

import grpc
import pytest

from genmesh.generation.v1 import generation_pb2 as gen
from services.common.identity import CLIENT_IP_HEADER
from tests.generation.conftest import (
    Generation,
    Quota,
    Sim,
    eventually,
    retry_after_header,
    service_error,
    unique_ip,
)

pytestmark = pytest.mark.integration


def someone() -> tuple[tuple[str, str], ...]:
    """A guest of its own (each guest has GUEST_DAILY_LIMIT units)."""
    return ((CLIENT_IP_HEADER, unique_ip()),)


def prompt(text: str = "What is the capital of France?") -> gen.GenerateRequest:
    return gen.GenerateRequest(text=f"{text} {uuid.uuid4()}", lang="en")


async def refused(g: Generation, request: gen.GenerateRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await g.stub.Generate(request, metadata=g.guest)
    return caught.value


async def open_breaker(g: Generation, sim: Sim, failures: int) -> None:
    await sim.set_faults(status=500, rate=1.0)
    for _ in range(failures):
        await refused(g, prompt())
    assert g.service.components.breaker.snapshot().state == "open"
    await sim.clear_faults()


# -- the breaker ---------------------------------------------------------------------------------


async def test_while_open_nothing_reaches_the_upstream_and_retry_after_counts_down(
    make_generation: Any, sim: Sim
) -> None:
    async with make_generation(sim, circuit_breaker_threshold=3) as g:
        await open_breaker(g, sim, 3)
        before = await sim.requests()
        first = await refused(g, prompt())
        await asyncio.sleep(1.2)
        second = await refused(g, prompt())
        assert await sim.requests() == before
        for err in (first, second):
            assert err.code() is grpc.StatusCode.UNAVAILABLE
            assert service_error(err).reason == "UPSTREAM_UNAVAILABLE"
        assert 59 <= retry_after_header(first) <= 60
        assert retry_after_header(second) < retry_after_header(first)


async def test_an_upstream_retry_after_longer_than_the_timeout_keeps_it_open(
    make_generation: Any, sim: Sim
) -> None:
    await sim.set_faults(status=429, rate=1.0, retry_after=30)
    async with make_generation(
        sim, circuit_breaker_threshold=2, circuit_breaker_timeout_seconds=0.5
    ) as g:
        await refused(g, prompt())
        opened = await refused(g, prompt())
        assert 29 <= retry_after_header(opened) <= 30
        await sim.clear_faults()
        await asyncio.sleep(0.8)  # past CIRCUIT_BREAKER_TIMEOUT_SECONDS
        still = await refused(g, prompt())
        assert await sim.requests() == 2
        assert 28 <= retry_after_header(still) <= 30
        assert g.service.components.breaker.snapshot().state == "open"


async def test_half_open_admits_exactly_the_configured_number_of_concurrent_probes(
    make_generation: Any, sim: Sim
) -> None:
    async with make_generation(
        sim,
        circuit_breaker_threshold=1,
        circuit_breaker_timeout_seconds=0.3,
        circuit_breaker_half_open_attempts=2,
    ) as g:
        await open_breaker(g, sim, 1)
        await asyncio.sleep(0.4)
        await sim.set_faults(latency_ms=500, rate=1.0)  # slow successes: probes overlap
        before = await sim.requests()
        results = await asyncio.gather(
            *(g.stub.Generate(prompt(), metadata=someone()) for _ in range(6)),
            return_exceptions=True,
        )
        answered = [r for r in results if isinstance(r, gen.GenerateResponse)]
        failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(answered) == 2
        assert len(failed) == 4
        assert all(service_error(e).reason == "UPSTREAM_UNAVAILABLE" for e in failed)
        assert await sim.requests() - before == 2
        # Two successes of two: closed again.
        assert g.service.components.breaker.snapshot().state == "closed"
        await sim.clear_faults()


async def test_three_probe_successes_close_it_and_a_probe_failure_reopens_it(
    make_generation: Any, sim: Sim
) -> None:
    async with make_generation(
        sim, circuit_breaker_threshold=1, circuit_breaker_timeout_seconds=0.3
    ) as g:
        breaker = g.service.components.breaker
        await open_breaker(g, sim, 1)
        await asyncio.sleep(0.4)
        assert breaker.snapshot().state == "half_open"
        for _ in range(2):
            await g.stub.Generate(prompt(), metadata=g.guest)
        assert breaker.snapshot().state == "half_open"
        await g.stub.Generate(prompt(), metadata=g.guest)
        assert breaker.snapshot().state == "closed"

        await open_breaker(g, sim, 1)
        await asyncio.sleep(0.4)
        await g.stub.Generate(prompt(), metadata=g.guest)
        await sim.set_faults(status=503, rate=1.0)
        reopened = await refused(g, prompt())
        assert breaker.snapshot().state == "open"
        assert retry_after_header(reopened) >= 1
        await sim.clear_faults()


# -- retries, deadlines, cancellation ------------------------------------------------------------


async def test_retries_stop_at_the_deadline(make_generation: Any, sim: Sim) -> None:
    await sim.set_faults(status=503, rate=1.0, latency_ms=200)
    async with make_generation(
        sim,
        openai_max_retries=10,
        openai_retry_base_delay_seconds=0.2,
        circuit_breaker_threshold=100,
    ) as g:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(), metadata=g.guest, timeout=1.5)
        elapsed = time.monotonic() - started
    # Our own answer, before the caller's deadline, not a bare DEADLINE_EXCEEDED from grpc.
    assert service_error(caught.value).reason in ("UPSTREAM_UNAVAILABLE", "UPSTREAM_TIMEOUT")
    assert elapsed < 1.5
    assert 2 <= await sim.requests() < 11


async def test_a_2s_deadline_against_a_hanging_upstream_returns_in_about_2s(
    make_generation: Any, sim: Sim, quota: Quota
) -> None:
    await sim.set_faults(hang=True, rate=1.0)
    async with make_generation(sim, openai_timeout_seconds=30) as g:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(), metadata=g.guest, timeout=2)
        elapsed = time.monotonic() - started
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert service_error(caught.value).reason == "UPSTREAM_TIMEOUT"
        assert 1.5 <= elapsed <= 2.2
        assert (await quota.of_guest(g.ip)).used == 0
        # The hung upstream request was abandoned, not left running.
        await eventually(lambda: _stat_is(sim, "cancelled", 1))
    await sim.clear_faults()


async def _stat_is(sim: Sim, name: str, value: int) -> bool:
    return (await sim.stats())[name] == value


async def test_a_client_that_leaves_cancels_the_upstream_call_and_is_refunded(
    make_generation: Any, sim: Sim, quota: Quota
) -> None:
    await sim.set_faults(latency_ms=5000, rate=1.0)
    async with make_generation(sim) as g:
        for streaming in (False, True):
            before = (await sim.stats())["cancelled"]
            call: Any = (
                g.stub.StreamGenerate(prompt(), metadata=g.guest)
                if streaming
                else g.stub.Generate(prompt(), metadata=g.guest)
            )
            running = asyncio.ensure_future(_drain(call) if streaming else call)
            await eventually(lambda: _stat_is(sim, "in_flight", 1))
            call.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await eventually(functools.partial(_stat_is, sim, "cancelled", before + 1))
            await eventually(lambda: _unused(quota, g.ip))
            assert g.service.components.limiter.active == 0
            assert g.service.components.breaker.snapshot().failures == 0
    await sim.clear_faults()


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


async def _unused(quota: Quota, ip: str) -> bool:
    return (await quota.of_guest(ip)).used == 0


# -- in-flight limit and single-flight -----------------------------------------------------------


async def test_32_concurrent_cache_hits_all_succeed_over_an_inflight_limit_of_3(
    make_generation: Any, sim: Sim
) -> None:
    async with make_generation(sim, gen_max_inflight=3) as g:
        known = prompt()
        await g.stub.Generate(known, metadata=g.guest)
        replies = await asyncio.gather(
            *(g.stub.Generate(known, metadata=someone()) for _ in range(32))
        )
    assert all(r.cached for r in replies)
    assert await sim.requests() == 1


async def test_identical_misses_over_two_replicas_make_one_upstream_call(
    make_generation: Any, sim: Sim, redis_prefix: str
) -> None:
    await sim.set_faults(latency_ms=400, rate=1.0)
    shared = f"{redis_prefix}gen-pair-{uuid.uuid4().hex[:8]}:"
    async with (
        make_generation(sim, redis_key_prefix=shared, gen_max_inflight=1) as a,
        make_generation(sim, redis_key_prefix=shared, gen_max_inflight=1) as b,
    ):
        request = prompt()
        replies = await asyncio.gather(
            *(g.stub.Generate(request, metadata=g.guest) for g in (a, b, a, b, a, b, a, b))
        )
    await sim.clear_faults()
    assert await sim.requests() == 1
    assert len({r.text for r in replies}) == 1
    assert not any(r.cached for r in replies)


async def test_a_failed_leader_fails_its_followers_without_a_second_call(
    make_generation: Any, sim: Sim, quota: Quota, redis_prefix: str
) -> None:
    await sim.set_faults(status=500, latency_ms=400, rate=1.0)
    shared = f"{redis_prefix}gen-pair-{uuid.uuid4().hex[:8]}:"
    async with (
        make_generation(sim, redis_key_prefix=shared) as a,
        make_generation(sim, redis_key_prefix=shared) as b,
    ):
        request = prompt()
        results = await asyncio.gather(
            *(g.stub.Generate(request, metadata=g.guest) for g in (a, a, b, b)),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(errors) == 4
        assert {service_error(e).reason for e in errors} == {"UPSTREAM_UNAVAILABLE"}
        assert await sim.requests() == 1
        assert (await quota.of_guest(a.ip)).used == 0
        assert (await quota.of_guest(b.ip)).used == 0
    await sim.clear_faults()


async def test_followers_are_charged_only_for_the_answer_they_receive(
    make_generation: Any, sim: Sim, quota: Quota
) -> None:
    await sim.set_faults(latency_ms=400, rate=1.0)
    async with make_generation(sim) as g:
        request = prompt()
        replies = await asyncio.gather(
            *(g.stub.Generate(request, metadata=g.guest) for _ in range(5))
        )
        assert await sim.requests() == 1
        assert len(replies) == 5
        assert (await quota.of_guest(g.ip)).used == 5
    await sim.clear_faults()
