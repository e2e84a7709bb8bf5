"""The pipeline on its own, with a scripted upstream and an in-memory quota: the paths the
simulator cannot produce (failures mid-stream, cancellations, deadlines, settle failures)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.errors import ServiceError
from services.generation.cache_policy import CacheOptions
from services.generation.pipeline import Delta, Done, Failed
from tests.generation.pipeline_rig import (
    ScriptedUpstream,
    collect,
    request,
    rig,
    settled,
    unavailable,
)
from tests.images import tiny_png

# -- prompts -------------------------------------------------------------------------------------


async def test_prompt_carries_language_model_and_normalized_text() -> None:
    r = rig()
    await r.pipeline.generate(request("  Hello   world  ", lang="pt-BR"))
    await r.pipeline.generate(request("", image_data=tiny_png(), image_mime_type="image/png"))
    text, image = r.upstream.prompts
    assert (text.model, text.text, text.system) == (
        "text-model",
        "Hello world",
        "Be brief. Answer in pt-BR.",
    )
    assert text.image is None
    assert image.model == "vision-model"
    assert image.image is not None and image.image.mime_type == "image/png"
    assert image.system.endswith("Answer in en.")  # empty lang means English


async def test_a_prompt_without_the_placeholder_still_names_the_language() -> None:
    r = rig(system_prompt="You are terse.")
    await r.pipeline.generate(request(lang="de"))
    assert r.upstream.prompts[0].system == "You are terse. Answer in de."


async def test_the_system_prompt_is_part_of_the_cache_key() -> None:
    a = rig(system_prompt="One. Answer in {lang}.").pipeline.prepare(request())
    b = rig(system_prompt="Two. Answer in {lang}.").pipeline.prepare(request())
    assert a.cache_key != b.cache_key
    assert a.tags == ("model:text-model", "lang:en", "kind:text")


async def test_blank_text_is_rejected_before_anything_is_spent() -> None:
    r = rig()
    with pytest.raises(ServiceError) as caught:
        await r.pipeline.generate(request(" \n\t "))
    assert [v.field for v in caught.value.violations] == ["text"]
    assert r.quota.reserved == 0


async def test_an_unconfigured_upstream_fails_before_the_reservation() -> None:
    r = rig(configured=False)
    with pytest.raises(ServiceError) as caught:
        await r.pipeline.generate(request())
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert r.quota.reserved == 0


# -- settlement ----------------------------------------------------------------------------------


async def test_success_commits_and_failure_refunds() -> None:
    r = rig()
    result = await r.pipeline.generate(request())
    assert result.answer.text == "Hello there friend."
    assert result.quota.used == 1
    assert await settled(r) == [("r1", True)]

    r.upstream.error = unavailable()
    with pytest.raises(ServiceError):
        await r.pipeline.generate(request("another"))
    assert (await settled(r))[-1] == ("r2", False)
    assert r.quota.used == 1


async def test_a_failing_settlement_never_fails_a_good_answer() -> None:
    r = rig()
    r.quota.settle_error = RuntimeError("quota went away")
    result = await r.pipeline.generate(request())
    assert result.answer.text
    assert await settled(r) == [("r1", True)]


async def test_a_cancelled_generation_is_refunded() -> None:
    r = rig(ScriptedUpstream(delay=10))
    task = asyncio.create_task(r.pipeline.generate(request()))
    while not r.upstream.prompts:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await r.background.drain(5)
    assert r.quota.settlements == [("r1", False)]
    assert r.limiter.active == 0
    # A cancelled call says nothing about the upstream's health.
    assert r.breaker.snapshot().failures == 0


# -- quota calls: one per cache hit, settlements off the reply's path -----------------------------


async def test_a_cache_hit_is_one_quota_call_that_consumes() -> None:
    r = rig()
    first = await r.pipeline.generate(request())
    assert not first.cached
    assert await settled(r) == [("r1", True)]
    assert r.quota.calls == ["reserve", "settle"]  # a miss: reserve, then commit

    r.quota.calls.clear()
    hit = await r.pipeline.generate(request())
    assert hit.cached and hit.answer.text == first.answer.text
    assert hit.quota.used == 2  # the hit's unit is counted in its reply
    streamed = await collect(r, request())
    assert isinstance(streamed[-1], Done) and streamed[-1].result.cached
    assert streamed[-1].result.quota.used == 3
    await settled(r)
    # Exactly one quota call per hit, unary or streamed, and nothing left to settle.
    assert r.quota.calls == ["consume", "consume"]
    assert r.quota.settlements == [("r1", True)]
    assert len(r.upstream.prompts) == 1


async def test_the_breaker_gates_cached_answer_is_one_consuming_call_too() -> None:
    r = rig(ScriptedUpstream(), threshold=1)
    await r.pipeline.generate(request("cached"))
    r.upstream.error = unavailable()
    with pytest.raises(ServiceError):
        await r.pipeline.generate(request("opens the breaker"))
    assert r.breaker.snapshot().state == "open"
    await settled(r)
    r.quota.calls.clear()
    hit = await r.pipeline.generate(request("cached"))
    assert hit.cached
    assert r.quota.calls == ["consume"]


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_cache_hit_with_no_quota_left_is_still_quota_exhausted(streaming: bool) -> None:
    r = rig()
    await r.pipeline.generate(request())
    r.quota.limit = r.quota.used
    call = collect if streaming else (lambda r, req: r.pipeline.generate(req))
    with pytest.raises(ServiceError) as caught:
        await call(r, request())
    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "QUOTA_EXHAUSTED",
    )
    assert r.quota.calls[-1] == "consume"
    assert r.quota.used == r.quota.limit


async def test_no_cache_skips_the_hit_and_pays_as_a_miss() -> None:
    r = rig()
    await r.pipeline.generate(request())
    await settled(r)
    r.quota.calls.clear()
    fresh = await r.pipeline.generate(request(cache=CacheOptions(no_cache=True)))
    assert not fresh.cached
    assert len(r.upstream.prompts) == 2
    await settled(r)
    assert r.quota.calls == ["reserve", "settle"]


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_miss_is_answered_before_its_commit_lands(streaming: bool) -> None:
    r = rig()
    r.quota.hold = asyncio.Event()
    if streaming:
        events = await asyncio.wait_for(collect(r, request()), 5)
        assert isinstance(events[-1], Done) and not events[-1].result.cached
        quota = events[-1].result.quota
    else:
        quota = (await asyncio.wait_for(r.pipeline.generate(request()), 5)).quota
    # Answered while the commit still waits: the reserved unit already counts as used.
    assert quota.used == r.quota.used == 1
    assert r.quota.calls == ["reserve", "settle"]
    assert r.quota.settlements == []
    assert len(r.background) == 1
    # A shutdown drains it: the commit lands (it does not wait for the TTL to expire it).
    asyncio.get_running_loop().call_later(0.05, r.quota.hold.set)
    assert await settled(r) == [("r1", True)]
    assert r.quota.used == 1


async def test_an_error_reply_does_not_wait_for_its_refund() -> None:
    r = rig(ScriptedUpstream(error=unavailable()))
    r.quota.hold = asyncio.Event()
    with pytest.raises(ServiceError):
        await asyncio.wait_for(r.pipeline.generate(request()), 5)
    assert r.quota.settlements == []
    r.quota.hold.set()
    assert await settled(r) == [("r1", False)]
    assert r.quota.used == 0


async def test_no_info_line_per_generation_and_the_span_carries_the_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    r = rig()
    with caplog.at_level(logging.INFO, logger="services.generation.pipeline"):
        for _ in range(2):
            with provider.get_tracer("test").start_as_current_span("Generate"):
                await r.pipeline.generate(request())
    assert [rec for rec in caplog.records if rec.name == "services.generation.pipeline"] == []
    miss, hit = (span.attributes or {} for span in exporter.get_finished_spans())
    assert (miss["genmesh.cache.hit"], hit["genmesh.cache.hit"]) == (False, True)
    key = r.pipeline.prepare(request()).cache_key
    assert miss["genmesh.cache.key"] == hit["genmesh.cache.key"] == key
    assert hit["genmesh.quota.reservation_id"] == "c1"
    with caplog.at_level(logging.DEBUG, logger="services.generation.pipeline"):
        await r.pipeline.generate(request())
    assert [rec.message for rec in caplog.records] == ["generation complete"]


# -- streams -------------------------------------------------------------------------------------


async def test_stream_deltas_then_done() -> None:
    r = rig()
    events = await collect(r, request())
    assert [type(e) for e in events] == [Delta, Delta, Delta, Done]
    done = events[-1]
    assert isinstance(done, Done)
    assert done.result.answer.text == "Hello there friend."
    assert not done.result.cached
    assert await settled(r) == [("r1", True)]
    assert r.breaker.snapshot().successes == 1

    # A cached stream replays with its original chunking, and its usage.
    again = await collect(r, request())
    assert [e.text for e in again if isinstance(e, Delta)] == ["Hello ", "there ", "friend."]
    assert isinstance(again[-1], Done) and again[-1].result.cached
    assert again[-1].result.answer.usage == done.result.answer.usage


async def test_stream_failing_midway_ends_with_an_in_band_error_and_a_refund() -> None:
    r = rig(ScriptedUpstream(error=unavailable(), fail_after=2))
    events = await collect(r, request())
    assert [type(e) for e in events] == [Delta, Delta, Failed]
    failed = events[-1]
    assert isinstance(failed, Failed)
    assert failed.error.code is grpc.StatusCode.UNAVAILABLE
    assert failed.error.reason == "UPSTREAM_UNAVAILABLE"
    assert await settled(r) == [("r1", False)]
    assert r.quota.used == 0
    assert r.breaker.snapshot().failures == 1
    # The partial answer was not cached.
    r.upstream.error = None
    events = await collect(r, request())
    assert isinstance(events[-1], Done) and not events[-1].result.cached


async def test_stream_failing_after_the_last_delta_is_still_in_band() -> None:
    r = rig(ScriptedUpstream(error=unavailable(), fail_after=3))
    events = await collect(r, request())
    assert [type(e) for e in events] == [Delta, Delta, Delta, Failed]
    assert await settled(r) == [("r1", False)]


async def test_stream_failing_before_any_delta_raises() -> None:
    r = rig(ScriptedUpstream(error=unavailable(), fail_after=0))
    with pytest.raises(ServiceError) as caught:
        await collect(r, request())
    assert caught.value.reason == "UPSTREAM_UNAVAILABLE"
    assert await settled(r) == [("r1", False)]


async def test_an_unexpected_error_midway_is_an_internal_in_band_error() -> None:
    r = rig(ScriptedUpstream(error=KeyError("bug"), fail_after=1))
    events = await collect(r, request())
    assert [type(e) for e in events] == [Delta, Failed]
    failed = events[-1]
    assert isinstance(failed, Failed)
    assert (failed.error.code, failed.error.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert await settled(r) == [("r1", False)]


async def test_a_client_leaving_midstream_refunds() -> None:
    r = rig()
    stream = r.pipeline.stream(request())
    first = await anext(stream)
    assert isinstance(first, Delta)
    await stream.aclose()
    await r.background.drain(5)
    assert r.quota.settlements == [("r1", False)]
    assert r.limiter.active == 0


# -- the breaker and deadlines -------------------------------------------------------------------


async def test_breaker_opens_and_the_failure_that_opened_it_says_how_long() -> None:
    r = rig(ScriptedUpstream(error=unavailable()), threshold=2)
    with pytest.raises(ServiceError) as first:
        await r.pipeline.generate(request("a"))
    assert first.value.retry_after_seconds == 2.0
    with pytest.raises(ServiceError) as second:
        await r.pipeline.generate(request("b"))
    assert second.value.retry_after_seconds is not None
    assert 59 < second.value.retry_after_seconds <= 60
    calls = len(r.upstream.prompts)
    with pytest.raises(ServiceError) as third:
        await r.pipeline.generate(request("c"))
    assert third.value.reason == "UPSTREAM_UNAVAILABLE"
    assert len(r.upstream.prompts) == calls
    assert r.quota.reserved == 2  # the fast failure took no quota


async def test_a_tight_client_deadline_does_not_trip_the_breaker() -> None:
    r = rig(ScriptedUpstream(delay=5), timeout=30, threshold=1)
    loop = asyncio.get_running_loop()
    with pytest.raises(ServiceError) as caught:
        await r.pipeline.generate(request(deadline=loop.time() + 0.1))
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.reason == "UPSTREAM_TIMEOUT"
    assert r.breaker.snapshot().failures == 0
    assert await settled(r) == [("r1", False)]


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_deadline_past_the_upstream_timeout_counts(streaming: bool) -> None:
    r = rig(ScriptedUpstream(delay=5), timeout=0.05, threshold=1)
    loop = asyncio.get_running_loop()
    call = collect if streaming else (lambda r, req: r.pipeline.generate(req))
    with pytest.raises(ServiceError) as caught:
        await call(r, request(deadline=loop.time() + 0.1))
    assert caught.value.reason == "UPSTREAM_TIMEOUT"
    assert r.breaker.snapshot().state == "open"


async def test_inflight_limit_fails_fast_without_queueing() -> None:
    r = rig(ScriptedUpstream(delay=10), max_inflight=1)
    task = asyncio.create_task(r.pipeline.generate(request("first")))
    while not r.upstream.prompts:
        await asyncio.sleep(0.01)
    with pytest.raises(ServiceError) as caught:
        await r.pipeline.generate(request("second"))
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAVAILABLE, "OVERLOADED")
    assert caught.value.retry_after_seconds == 1
    assert await settled(r) == [("r2", False)]  # the refused call's unit went back
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_quota_errors_pass_through() -> None:
    r = rig()
    r.quota.limit = 0
    with pytest.raises(ServiceError) as caught:
        await r.pipeline.generate(request())
    assert caught.value.reason == "QUOTA_EXHAUSTED"
    assert r.upstream.prompts == []
