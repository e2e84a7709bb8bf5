"""The generation service end to end over gRPC: the OpenAI simulator in-process, the real quota
service on this run's PostgreSQL and Redis, and the service's own Redis prefix."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from genmesh.generation.v1 import generation_pb2 as gen
from genmesh.stats.v1 import stats_pb2, stats_pb2_grpc
from services.common.client_networks import ClientNetworks
from services.common.identity import CLIENT_IP_HEADER, USER_ID_HEADER, USER_ROLE_HEADER, Identity
from services.generation.pipeline import GenerationRequest
from services.quota.clock import QuotaClock
from services.quota.guest_store import guest_tag
from tests.generation.conftest import (
    GUEST_DAILY_LIMIT,
    Generation,
    Quota,
    Sim,
    Telemetry,
    eventually,
    retry_after_header,
    running_sim,
    service_error,
    unique_ip,
)
from tests.generation.upstreams import running_broken_stream_upstream
from tests.images import tiny_png

pytestmark = pytest.mark.integration


def prompt(text: str = "What is the capital of France?") -> gen.GenerateRequest:
    return gen.GenerateRequest(text=f"{text} {uuid.uuid4()}", lang="en")


async def stream_events(
    g: Generation, request: gen.GenerateRequest
) -> list[gen.StreamGenerateResponse]:
    return [event async for event in g.stub.StreamGenerate(request, metadata=g.guest)]


# -- answers -------------------------------------------------------------------------------------


async def test_text_generation_returns_the_upstream_answer(
    make_generation: Any, sim: Sim, quota: Quota
) -> None:
    async with make_generation(sim) as g:
        request = prompt("Name a colour")
        reply = await g.stub.Generate(request, metadata=g.guest)

    uuid.UUID(reply.generation_id)
    assert "You said:" in reply.text and "Simulated answer" in reply.text
    assert reply.model == "gpt-4o-mini"
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.cached is False
    assert reply.quota.plan == "guest"
    assert (reply.quota.limit, reply.quota.used) == (GUEST_DAILY_LIMIT, 1)
    assert reply.quota.remaining == GUEST_DAILY_LIMIT - 1
    assert reply.quota.resets_at.seconds > time.time()
    assert await sim.requests() == 1
    # Committed: the unit stays used.
    assert (await quota.of_guest(g.ip)).used == 1


async def test_language_reaches_the_model(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim) as g:
        reply = await g.stub.Generate(
            gen.GenerateRequest(text=f"Olá {uuid.uuid4()}", lang="pt-BR"), metadata=g.guest
        )
    assert reply.text.startswith("[pt-BR]")


async def test_image_generation_goes_to_the_vision_model(make_generation: Any, sim: Sim) -> None:
    png = tiny_png()
    async with make_generation(sim) as g:
        reply = await g.stub.Generate(
            gen.GenerateRequest(text="What is this?", image_data=png, image_mime_type="image/png"),
            metadata=g.guest,
        )
        image_only = await g.stub.Generate(
            gen.GenerateRequest(image_data=png, image_mime_type="image/png"), metadata=g.guest
        )
    assert reply.model == "gpt-4o"
    assert f"I see a image/png image of {len(png)} bytes." in reply.text
    assert "What is this?" in reply.text
    assert image_only.model == "gpt-4o"
    assert "image/png" in image_only.text


@pytest.mark.parametrize(
    ("image", "declared"),
    [
        (b"definitely not an image", "image/png"),
        (tiny_png(), "image/jpeg"),
        (b"GIF89a" + bytes(20), "image/webp"),
    ],
)
async def test_image_bytes_must_match_the_declared_type(
    make_generation: Any, sim: Sim, quota: Quota, telemetry: Telemetry, image: bytes, declared: str
) -> None:
    async with make_generation(sim) as g:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(
                gen.GenerateRequest(text="hi", image_data=image, image_mime_type=declared),
                metadata=g.guest,
            )
        err = service_error(caught.value)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert err.reason == "INVALID_ARGUMENT"
        assert [v.field for v in err.violations] == ["image_mime_type"]
        # Rejected before anything was spent.
        assert await sim.requests() == 0
        assert (await quota.of_guest(g.ip)).used == 0

        async def reported() -> bool:
            return any(
                e.ip == g.ip and e.details["declared"] == declared
                for e in telemetry.recorder.of_type("image_type_mismatch")
            )

        await eventually(reported)


async def test_protovalidate_rules_name_the_field(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim) as g:
        for request, field in [
            (gen.GenerateRequest(text=""), "text"),
            (gen.GenerateRequest(text="   \n\t "), "text"),
            (gen.GenerateRequest(text="x" * 4001), "text"),
            (gen.GenerateRequest(text="hi", lang="not a lang!"), "lang"),
            (gen.GenerateRequest(image_data=tiny_png()), "image_mime_type"),
            (
                gen.GenerateRequest(image_data=tiny_png(), image_mime_type="image/tiff"),
                "image_mime_type",
            ),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await g.stub.Generate(request, metadata=g.guest)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert field in {v.field for v in service_error(caught.value).violations}
    assert await sim.requests() == 0


# -- the response cache ----------------------------------------------------------------------------


async def test_repeat_is_served_from_the_cache(
    make_generation: Any, sim: Sim, quota: Quota
) -> None:
    async with make_generation(sim) as g:
        request = prompt()
        first = await g.stub.Generate(request, metadata=g.guest)
        # Same prompt modulo blanks: same key.
        spaced = gen.GenerateRequest(text=f"  {request.text.replace(' ', '   ')}\n", lang="en")
        second = await g.stub.Generate(spaced, metadata=g.guest)
        other_lang = await g.stub.Generate(
            gen.GenerateRequest(text=request.text, lang="de"), metadata=g.guest
        )
        stats = await g.admin.GetCacheStats(gen.GetCacheStatsRequest(), metadata=g.admin_md)

    assert first.cached is False
    assert second.cached is True
    assert second.text == first.text
    assert second.usage == first.usage
    assert second.generation_id != first.generation_id
    assert other_lang.cached is False
    assert await sim.requests() == 2  # the repeat never reached the upstream
    # A cached answer still costs a unit (the quota counts generations, not upstream calls).
    assert (await quota.of_guest(g.ip)).used == 3
    assert (stats.hits, stats.misses, stats.entries, stats.backend) == (1, 2, 2, "redis")
    assert stats.hit_rate == pytest.approx(1 / 3)


async def test_without_redis_the_memory_cache_serves(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim, redis_url="") as g:
        request = prompt()
        first = await g.stub.Generate(request, metadata=g.guest)
        second = await g.stub.Generate(request, metadata=g.guest)
        stats = await g.admin.GetCacheStats(gen.GetCacheStatsRequest(), metadata=g.admin_md)
    assert (first.cached, second.cached) == (False, True)
    assert (stats.backend, stats.entries, stats.hits) == ("memory", 1, 1)
    assert await sim.requests() == 1


# -- upstream failures ---------------------------------------------------------------------------


async def test_upstream_500_is_unavailable_and_the_unit_is_refunded(
    make_generation: Any, sim: Sim, quota: Quota
) -> None:
    await sim.set_faults(status=500, rate=1.0)
    async with make_generation(sim) as g:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(), metadata=g.guest)
        err = service_error(caught.value)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert err.reason == "UPSTREAM_UNAVAILABLE"
        assert retry_after_header(caught.value) >= 1
        assert await sim.requests() == 1
        assert (await quota.of_guest(g.ip)).used == 0
        assert g.service.components.breaker.snapshot().failures == 1

        # Nothing was cached: once the upstream is back, the same prompt reaches it.
        await sim.clear_faults()
        await g.stub.Generate(prompt(), metadata=g.guest)
        assert (await quota.of_guest(g.ip)).used == 1


async def test_transient_failures_are_retried_and_each_attempt_is_counted(
    make_generation: Any, sim: Sim
) -> None:
    await sim.set_faults(status=503, rate=1.0)
    async with make_generation(sim, openai_max_retries=2) as g:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(), metadata=g.guest)
        # One attempt and two retries, all three seen by the breaker (the SDK retries none).
        assert await sim.requests() == 3
        assert g.service.components.breaker.snapshot().failures == 3
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_a_retry_that_succeeds_answers(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim, openai_max_retries=3) as g:
        await sim.set_faults(status=500, rate=1.0)
        call = asyncio.ensure_future(g.stub.Generate(prompt(), metadata=g.guest))
        await eventually(lambda: _at_least(sim, 1))
        await sim.clear_faults()
        reply = await call
        assert reply.text
        snapshot = g.service.components.breaker.snapshot()
        assert (snapshot.failures, snapshot.successes) == (await sim.requests() - 1, 1)


async def _at_least(sim: Sim, requests: int) -> bool:
    return await sim.requests() >= requests


async def test_upstream_429_is_our_dependency_limit_not_the_callers(
    make_generation: Any, sim: Sim
) -> None:
    await sim.set_faults(status=429, rate=1.0, retry_after=7)
    async with make_generation(sim) as g:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(), metadata=g.guest)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    err = service_error(caught.value)
    assert err.reason == "UPSTREAM_UNAVAILABLE"
    assert err.retry_after_seconds == 7
    assert retry_after_header(caught.value) == 7


async def test_upstream_400_is_rejected_input_and_does_not_count_against_the_breaker(
    make_generation: Any, sim: Sim, quota: Quota
) -> None:
    await sim.set_faults(status=400, rate=1.0)
    async with make_generation(sim, circuit_breaker_threshold=1) as g:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(), metadata=g.guest)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert service_error(caught.value).reason == "UPSTREAM_REJECTED"
        # Fixed text: what the model API said ("Injected by the simulator.") stays in our logs.
        assert caught.value.details() == "the model refused the request"
        assert service_error(caught.value).message == "the model refused the request"
        assert g.service.components.breaker.snapshot().state == "closed"
        assert (await quota.of_guest(g.ip)).used == 0


async def test_upstream_timeout_is_deadline_exceeded(make_generation: Any, sim: Sim) -> None:
    await sim.set_faults(hang=True, rate=1.0)
    async with make_generation(sim, openai_timeout_seconds=0.3) as g:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(), metadata=g.guest)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert service_error(caught.value).reason == "UPSTREAM_TIMEOUT"
        assert g.service.components.breaker.snapshot().failures == 1
    await sim.clear_faults()


async def test_five_failures_open_the_breaker_and_then_it_fails_fast(
    make_generation: Any, sim: Sim, quota: Quota
) -> None:
    await sim.set_faults(status=502, rate=1.0)
    async with make_generation(sim, circuit_breaker_timeout_seconds=60) as g:
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await g.stub.Generate(prompt(), metadata=g.guest)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert await sim.requests() == 5
        # The call that opened it already tells the caller to wait for the breaker.
        assert 55 <= retry_after_header(caught.value) <= 60

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(), metadata=g.guest)
        err = service_error(caught.value)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert err.reason == "UPSTREAM_UNAVAILABLE"
        assert 55 <= retry_after_header(caught.value) <= 60
        assert err.retry_after_seconds is not None and 0 < err.retry_after_seconds <= 60
        assert await sim.requests() == 5  # failed fast: never reached the upstream
        assert (await quota.of_guest(g.ip)).used == 0  # ... nor took any quota

        # Streams fail fast too, with a normal status (nothing was sent yet).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream_events(g, prompt())
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert await sim.requests() == 5
        assert g.service.components.breaker.snapshot().state == "open"


async def test_an_open_breaker_still_serves_cached_answers(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim, circuit_breaker_threshold=1) as g:
        known = prompt()
        first = await g.stub.Generate(known, metadata=g.guest)
        await sim.set_faults(status=500, rate=1.0)
        with pytest.raises(grpc.aio.AioRpcError):
            await g.stub.Generate(prompt(), metadata=g.guest)
        assert g.service.components.breaker.snapshot().state == "open"
        again = await g.stub.Generate(known, metadata=g.guest)
    assert again.cached is True
    assert again.text == first.text


async def test_over_the_inflight_limit_calls_fail_fast(make_generation: Any) -> None:
    async with (
        running_sim(latency_ms=600) as slow_sim,
        make_generation(slow_sim, gen_max_inflight=1) as g,
    ):
        first = asyncio.ensure_future(g.stub.Generate(prompt(), metadata=g.guest))

        async def first_reached_upstream() -> bool:
            return await slow_sim.requests() == 1

        await eventually(first_reached_upstream)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(), metadata=g.guest)
        err = service_error(caught.value)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert err.reason == "OVERLOADED"
        assert retry_after_header(caught.value) == 1
        assert (await first).text  # the first one was not disturbed
        assert await slow_sim.requests() == 1
        # The slot is free again.
        assert (await g.stub.Generate(prompt(), metadata=g.guest)).text


# -- quota ---------------------------------------------------------------------------------------


async def test_quota_exhaustion_is_relayed_with_its_retry_info(
    make_generation: Any, sim: Sim, quota: Quota
) -> None:
    async with make_generation(sim) as g:
        for _ in range(GUEST_DAILY_LIMIT):
            await g.stub.Generate(prompt(), metadata=g.guest)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(), metadata=g.guest)
        err = service_error(caught.value)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.reason == "QUOTA_EXHAUSTED"
        assert err.retry_after_seconds is not None and 0 < err.retry_after_seconds <= 86400
        assert 0 < retry_after_header(caught.value) <= 86400
        assert await sim.requests() == GUEST_DAILY_LIMIT
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream_events(g, prompt())
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await quota.of_guest(g.ip)).remaining == 0


async def test_quota_unreachable_fails_calls_clearly_but_leaves_readiness_alone(
    make_generation: Any, sim: Sim
) -> None:
    """A sibling service is no readiness dependency: with quota away every replica would
    fail alike, so NOT_SERVING would only pull them all out of rotation. Each call fails fast
    with DEPENDENCY_UNAVAILABLE and a Retry-After instead, and the outage is reported."""
    async with make_generation(sim, quota_addr="127.0.0.1:1", quota_timeout_seconds=0.5) as g:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(), metadata=g.guest)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        err = service_error(caught.value)
        assert err.reason == "DEPENDENCY_UNAVAILABLE"
        assert "quota" in err.message
        assert err.retry_after_seconds is not None and err.retry_after_seconds > 0
        health = health_pb2_grpc.HealthStub(g.channel)
        for service in ("", "genmesh.generation.v1.GenerationService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        # Still probed and reported (the health report, GetStats), just not required.
        (status,) = [s for s in await g.service.refresh_health() if s.name == "quota"]
        assert (status.ok, status.required) == (False, False)
    assert await sim.requests() == 0


async def test_serving_without_redis_or_upstream(make_generation: Any) -> None:
    # The upstream is no readiness dependency (the breaker handles it); Redis is optional.
    async with make_generation(None, openai_base_url="http://127.0.0.1:1/v1", redis_url="") as g:
        health = health_pb2_grpc.HealthStub(g.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(), metadata=g.guest)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert service_error(caught.value).reason == "UPSTREAM_UNAVAILABLE"


async def test_no_api_key_and_no_base_url_is_not_serving(make_generation: Any) -> None:
    async with make_generation(None, openai_api_key="", openai_base_url="") as g:
        health = health_pb2_grpc.HealthStub(g.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert any(s.name == "openai_config" and not s.ok for s in g.service.last_statuses)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(), metadata=g.guest)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "OPENAI_API_KEY" in (caught.value.details() or "")


# -- streaming -----------------------------------------------------------------------------------


async def test_stream_sends_deltas_then_done(make_generation: Any, sim: Sim, quota: Quota) -> None:
    async with make_generation(sim) as g:
        request = prompt("Tell me a story about a lighthouse keeper and a cat")
        events = await stream_events(g, request)
        plain = await g.stub.Generate(request, metadata=g.guest)

    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "done"
    assert kinds.count("delta") > 1  # really streamed
    assert set(kinds[:-1]) == {"delta"}
    done = events[-1].done
    assert "".join(e.delta.text for e in events[:-1]) == done.text
    assert done.cached is False
    assert done.usage.total_tokens > 0
    assert done.model == "gpt-4o-mini"
    assert done.quota.used == 1
    uuid.UUID(done.generation_id)
    # The streamed answer was cached like any other.
    assert plain.cached is True
    assert plain.text == done.text
    assert (await quota.of_guest(g.ip)).used == 2


async def test_a_cached_stream_replays_its_deltas_in_order_with_usage(
    make_generation: Any, sim: Sim
) -> None:
    async with make_generation(sim) as g:
        request = prompt("Tell me a story about a lighthouse keeper and a cat")
        first = await stream_events(g, request)
        again = await stream_events(g, request)
        assert await sim.requests() == 1
    deltas = [e.delta.text for e in first if e.WhichOneof("event") == "delta"]
    replayed = [e.delta.text for e in again if e.WhichOneof("event") == "delta"]
    assert len(deltas) > 2
    assert replayed == deltas
    assert again[-1].done.cached is True
    assert again[-1].done.usage == first[-1].done.usage
    assert again[-1].done.usage.total_tokens > 0


async def test_a_unary_answer_streams_from_the_cache_in_several_deltas(
    make_generation: Any, sim: Sim
) -> None:
    async with make_generation(sim) as g:
        request = prompt("Tell me a story about a lighthouse keeper and a cat")
        first = await g.stub.Generate(request, metadata=g.guest)
        events = await stream_events(g, request)
        assert await sim.requests() == 1
    deltas = [e.delta.text for e in events if e.WhichOneof("event") == "delta"]
    assert len(deltas) > 2
    assert "".join(deltas) == first.text
    assert events[-1].done.cached is True
    assert events[-1].done.usage == first.usage


async def test_stream_failing_before_any_delta_is_a_normal_error(
    make_generation: Any, sim: Sim, quota: Quota
) -> None:
    await sim.set_faults(status=503, rate=1.0, retry_after=3)
    async with make_generation(sim) as g:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream_events(g, prompt())
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert service_error(caught.value).reason == "UPSTREAM_UNAVAILABLE"
        assert retry_after_header(caught.value) == 3
        assert (await quota.of_guest(g.ip)).used == 0


async def test_stream_failing_midway_ends_with_an_in_band_error(
    make_generation: Any, quota: Quota
) -> None:
    """An upstream that sends one chunk and drops the connection (the simulator cannot)."""
    async with (
        running_broken_stream_upstream() as base_url,
        make_generation(None, openai_base_url=base_url) as g,
    ):
        events = await stream_events(g, prompt())
        assert [e.WhichOneof("event") for e in events] == ["delta", "error"]
        assert events[0].delta.text == "Hello "
        error = events[1].error
        assert (error.code, error.reason) == ("UNAVAILABLE", "UPSTREAM_UNAVAILABLE")
        assert error.message
        # Refunded, and counted against the upstream.
        assert (await quota.of_guest(g.ip)).used == 0
        assert g.service.components.breaker.snapshot().failures == 1


# -- admin ---------------------------------------------------------------------------------------


async def test_admin_needs_an_admin_credential(
    make_generation: Any, sim: Sim, telemetry: Telemetry
) -> None:
    async with make_generation(sim) as g:
        request = gen.GetCacheStatsRequest()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.admin.GetCacheStats(request, metadata=g.guest)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert service_error(caught.value).reason == "UNAUTHENTICATED"

        a_user = (*g.guest, (USER_ID_HEADER, "u-1"), (USER_ROLE_HEADER, "authenticated"))
        for rpc, req in [
            (g.admin.GetCacheStats, request),
            (g.admin.InvalidateCache, gen.InvalidateCacheRequest(all=True)),
            (g.admin.GetPerformanceStats, gen.GetPerformanceStatsRequest()),
        ]:
            for metadata in [(*g.guest, ("x-admin-token", "wrong")), a_user]:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await rpc(req, metadata=metadata)
                assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED

        with_token = (*g.guest, *g.admin_md)
        assert (await g.admin.GetCacheStats(request, metadata=with_token)).backend == "redis"
        an_admin = (*g.guest, (USER_ID_HEADER, "u-admin"), (USER_ROLE_HEADER, "admin"))
        assert (await g.admin.GetCacheStats(request, metadata=an_admin)).backend == "redis"

        async def reported() -> bool:
            actions = [e for e in telemetry.recorder.of_type("admin_action") if e.ip == g.ip]
            return sorted(str(e.details["credential"]) for e in actions) == ["role", "token"]

        await eventually(reported)
        # Refusals are counted and reported at the edge (the rate limit decision), per burst:
        # the service does not write a row per guess.
        assert not [e for e in telemetry.recorder.of_type("admin_auth_failed") if e.ip == g.ip]


async def test_without_a_configured_token_only_the_admin_role_opens_the_admin_api(
    make_generation: Any, sim: Sim
) -> None:
    async with make_generation(sim, genmesh_admin_token="") as g:
        for metadata, code in [
            ((("x-admin-token", ""),), grpc.StatusCode.UNAUTHENTICATED),
            ((("x-admin-token", "anything"),), grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await g.admin.GetCacheStats(gen.GetCacheStatsRequest(), metadata=metadata)
            assert caught.value.code() is code
        an_admin = ((USER_ID_HEADER, "u-admin"), (USER_ROLE_HEADER, "admin"))
        stats = await g.admin.GetCacheStats(gen.GetCacheStatsRequest(), metadata=an_admin)
        assert stats.backend == "redis"


async def test_invalidation_by_tag_key_and_all(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim) as g:
        md = g.admin_md

        async def ask(text: str, lang: str = "en", image: bytes = b"") -> gen.GenerateResponse:
            reply: gen.GenerateResponse = await g.stub.Generate(
                gen.GenerateRequest(
                    text=text,
                    lang=lang,
                    image_data=image,
                    image_mime_type="image/png" if image else "",
                ),
                # A fresh guest each time: this test makes more calls than a daily quota.
                metadata=((CLIENT_IP_HEADER, unique_ip()),),
            )
            return reply

        english, german, picture = f"en {uuid.uuid4()}", f"de {uuid.uuid4()}", f"pic {uuid.uuid4()}"
        await ask(english)
        await ask(german, "de")
        await ask(picture, image=tiny_png())
        assert (await g.admin.GetCacheStats(gen.GetCacheStatsRequest(), metadata=md)).entries == 3

        removed = await g.admin.InvalidateCache(
            gen.InvalidateCacheRequest(tag="lang:de"), metadata=md
        )
        assert removed.removed == 1
        assert (await ask(german, "de")).cached is False  # gone, so answered afresh
        assert (await ask(english)).cached is True  # untouched

        removed = await g.admin.InvalidateCache(
            gen.InvalidateCacheRequest(tag="kind:image"), metadata=md
        )
        assert removed.removed == 1
        removed = await g.admin.InvalidateCache(
            gen.InvalidateCacheRequest(tag="model:gpt-4o-mini"), metadata=md
        )
        assert removed.removed == 2  # english and the re-asked german
        assert (await g.admin.GetCacheStats(gen.GetCacheStatsRequest(), metadata=md)).entries == 0

        # By key: the key is what the pipeline derives from the request.
        await ask(english)
        prepared = g.service.components.pipeline.prepare(_domain_request(english))
        removed = await g.admin.InvalidateCache(
            gen.InvalidateCacheRequest(key=prepared.cache_key), metadata=md
        )
        assert removed.removed == 1
        removed = await g.admin.InvalidateCache(
            gen.InvalidateCacheRequest(key=prepared.cache_key), metadata=md
        )
        assert removed.removed == 0

        await ask(english)
        await ask(german, "de")
        stats = await g.admin.GetCacheStats(gen.GetCacheStatsRequest(), metadata=md)
        assert stats.entries == 2
        removed = await g.admin.InvalidateCache(gen.InvalidateCacheRequest(all=True), metadata=md)
        assert removed.removed == 2
        stats = await g.admin.GetCacheStats(gen.GetCacheStatsRequest(), metadata=md)
        assert stats.entries == 0
        assert (
            stats.invalidations == 7
        )  # 1 (lang:de) + 1 (kind:image) + 2 (model) + 1 (key) + 2 (all)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.admin.InvalidateCache(gen.InvalidateCacheRequest(), metadata=md)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def _domain_request(text: str) -> GenerationRequest:
    return GenerationRequest(text, b"", "", "en", Identity("", "", "127.0.0.1"))


async def operation_counts(g: Generation) -> dict[str, int]:
    stats = await g.admin.GetPerformanceStats(gen.GetPerformanceStatsRequest(), metadata=g.admin_md)
    return {op.name: op.count for op in stats.operations}


async def test_performance_stats(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim, slow_operation_ms=1234) as g:
        await g.stub.Generate(prompt(), metadata=g.guest)

        async def committed() -> bool:  # in the background, after the reply
            return (await operation_counts(g)).get("quota.settle") == 1

        await eventually(committed)
        stats = await g.admin.GetPerformanceStats(
            gen.GetPerformanceStatsRequest(), metadata=g.admin_md
        )
    assert stats.slow_threshold_ms == 1234
    ops = {op.name: op for op in stats.operations}
    assert ops["openai.chat.completions"].count == 1
    assert ops["openai.chat.completions"].errors == 0
    assert ops["openai.chat.completions"].avg_ms > 0
    assert ops["quota.reserve"].count == 1
    assert ops["quota.settle"].count == 1
    assert {"redis.get", "redis.set"} <= set(ops)


async def test_a_cache_hit_is_one_quota_rpc_and_a_miss_commits_after_its_reply(
    make_generation: Any, sim: Sim, quota: Quota, redis_url: str, redis_prefix: str
) -> None:
    """Against the real quota service: a miss reserves, is answered, and its commit lands in
    the background (the reservation leaves pending, its unit still used: committed, neither
    refunded nor left to expire); each hit, unary or streamed, is one ReserveQuota call that
    consumes, with nothing pending afterwards."""
    client = Redis.from_url(redis_url)
    try:
        async with make_generation(sim) as g:
            # The guest's pending reservations in the quota service's Redis (see guest_store).
            day = QuotaClock("UTC").window().day
            tag = guest_tag(ClientNetworks().network_of(g.ip), day)
            state = f"{redis_prefix}quota:guest:{{{tag}}}"
            pending = f"{state}:pending"
            request = prompt()
            miss = await g.stub.Generate(request, metadata=g.guest)
            assert not miss.cached and miss.quota.used == 1
            assert await client.exists(state) == 1  # the right guest-day's keys

            async def miss_committed() -> bool:
                return (await operation_counts(g)).get("quota.settle") == 1 and (
                    await client.zcard(pending) == 0
                )

            await eventually(miss_committed)
            assert (await quota.of_guest(g.ip)).used == 1  # committed, not refunded

            before = await operation_counts(g)
            hit = await g.stub.Generate(request, metadata=g.guest)
            streamed = await stream_events(g, request)
            await asyncio.sleep(0.2)  # time for any background call to show
            after = await operation_counts(g)
            assert await client.zcard(pending) == 0  # nothing pending, nothing to expire
    finally:
        await client.aclose()

    assert hit.cached and streamed[-1].done.cached
    assert (hit.quota.used, streamed[-1].done.quota.used) == (2, 3)
    quota_calls = {
        name: after.get(name, 0) - before.get(name, 0)
        for name in ("quota.reserve", "quota.consume", "quota.settle")
    }
    assert quota_calls == {"quota.reserve": 0, "quota.consume": 2, "quota.settle": 0}
    assert (await quota.of_guest(g.ip)).used == 3
    assert await sim.requests() == 1


async def test_a_cache_hit_without_quota_left_is_429_quota_exhausted(
    make_generation: Any, sim: Sim, quota: Quota
) -> None:
    async with make_generation(sim) as g:
        request = prompt()
        for _ in range(GUEST_DAILY_LIMIT):
            assert (await g.stub.Generate(request, metadata=g.guest)).quota.used >= 1
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(request, metadata=g.guest)
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            await stream_events(g, request)
    for err in (caught.value, streamed.value):
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert service_error(err).reason == "QUOTA_EXHAUSTED"
        assert retry_after_header(err) >= 1
    assert (await quota.of_guest(g.ip)).used == GUEST_DAILY_LIMIT


# -- the replica's stats (genmesh.stats.v1.StatsService) -----------------------------------------


async def test_get_stats_reports_breakers_cache_and_operations(
    make_generation: Any, sim: Sim, redis_url: str
) -> None:
    client = Redis.from_url(redis_url)
    try:
        async with make_generation(sim) as g:
            request = prompt()
            await g.stub.Generate(request, metadata=g.guest)  # a miss, then cached
            assert (await g.stub.Generate(request, metadata=g.guest)).cached
            stats = await stats_pb2_grpc.StatsServiceStub(g.channel).GetStats(
                stats_pb2.GetStatsRequest(), timeout=5
            )
            # The stats go over gRPC only: nothing is written to Redis for them any more.
            prefix = g.settings.redis_key_prefix
            stats_keys = [key async for key in client.scan_iter(match=f"{prefix}stats:*")]
    finally:
        await client.aclose()

    assert stats_keys == []
    assert (stats.service, stats.replica) == ("generation", g.settings.gen_replica_id)
    assert stats.serving
    assert stats.ttl_seconds == 1  # three intervals of 0.2 s, rounded up
    assert abs(stats.reported_at.ToMicroseconds() / 1e6 - time.time()) < 60
    assert [b.name for b in stats.breakers] == ["openai", "redis"]
    openai = stats.breakers[0]
    assert openai.state == stats_pb2.BREAKER_STATE_CLOSED
    assert (openai.failures, openai.successes, openai.consecutive_failures) == (0, 1, 0)
    assert not openai.HasField("last_failure_time")
    assert stats.breakers[1].state == stats_pb2.BREAKER_STATE_CLOSED
    assert stats.cache == stats_pb2.CacheStats(hits=1, misses=1, entries=1, backend="redis")
    assert stats.inflight == 0
    assert [(f.name, f.engaged) for f in stats.fallbacks] == [("redis", False)]
    ops = {(op.name, op.window_seconds): op for op in stats.operations}
    for window in (60, 300):
        call = ops["openai.chat.completions", window]
        assert (call.count, call.errors, call.slow) == (1, 0, 0)
        assert 0 < call.avg_ms <= call.p95_ms <= call.max_ms
        # The miss reserved; the hit consumed, in one call.
        assert ops["quota.reserve", window].count == 1
        assert ops["quota.consume", window].count == 1


async def test_breaker_state_in_get_stats(make_generation: Any, sim: Sim) -> None:
    await sim.set_faults(status=500, rate=1.0)
    try:
        async with make_generation(sim, circuit_breaker_threshold=1) as g:
            with pytest.raises(grpc.aio.AioRpcError):
                await g.stub.Generate(prompt(), metadata=g.guest)
            stats = await stats_pb2_grpc.StatsServiceStub(g.channel).GetStats(
                stats_pb2.GetStatsRequest(), timeout=5
            )
    finally:
        await sim.clear_faults()
    breaker = next(b for b in stats.breakers if b.name == "openai")
    assert breaker.state == stats_pb2.BREAKER_STATE_OPEN
    assert (breaker.failures, breaker.consecutive_failures) == (1, 1)
    assert breaker.HasField("last_failure_time")
    assert abs(breaker.last_failure_time.ToMicroseconds() / 1e6 - time.time()) < 60
    assert 0 < breaker.retry_after_seconds <= 60
    assert breaker.probes_in_flight == 0
    # A failed call is an error in the operation's windows.
    ops = {(op.name, op.window_seconds): op for op in stats.operations}
    assert ops["openai.chat.completions", 60].errors == 1
