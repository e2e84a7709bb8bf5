"""The pipeline on its own, with a scripted upstream and an in-memory quota: the paths the
simulator cannot produce (failures mid-stream, cancellations, deadlines, settle failures)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from genmesh.quota.v1 import quota_pb2
from services.common.background import BackgroundTasks
from services.common.breaker import CircuitBreaker
from services.common.errors import Reason, ServiceError
from services.common.identity import Identity
from services.generation.answer import Answer, Usage
from services.generation.cache import MemoryResponseCache, ResilientResponseCache
from services.generation.inflight import InFlightLimiter
from services.generation.pipeline import (
    Delta,
    Done,
    Failed,
    GenerationPipeline,
    GenerationRequest,
    PipelineConfig,
    StreamEvent,
)
from services.generation.quota_client import Reservation
from services.generation.upstream import Prompt, UpstreamError, upstream_unavailable
from tests.images import tiny_png

GUEST = Identity("", "", "192.0.2.1")


def unavailable() -> UpstreamError:
    return UpstreamError(upstream_unavailable("down", 2.0), counts_as_failure=True)


@dataclass
class ScriptedUpstream:
    """Streams `pieces`; raises `fail_after` pieces in when `error` is set."""

    pieces: list[str] = field(default_factory=lambda: ["Hello ", "there ", "friend."])
    error: Exception | None = None
    fail_after: int = 0
    delay: float = 0.0
    prompts: list[Prompt] = field(default_factory=list)

    async def complete(self, prompt: Prompt) -> Answer:
        self.prompts.append(prompt)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return Answer("".join(self.pieces), prompt.model, Usage(5, len(self.pieces), 5 + 3))

    async def stream(self, prompt: Prompt) -> AsyncGenerator[str | Answer, None]:
        self.prompts.append(prompt)
        for i, piece in enumerate(self.pieces):
            if self.error is not None and i == self.fail_after:
                raise self.error
            if self.delay:
                await asyncio.sleep(self.delay)
            yield piece
        if self.error is not None and self.fail_after >= len(self.pieces):
            raise self.error
        yield Answer("".join(self.pieces), prompt.model, Usage(5, len(self.pieces), 8))


@dataclass
class MemoryQuota:
    limit: int = 10
    used: int = 0
    settlements: list[tuple[str, bool]] = field(default_factory=list)
    settle_error: Exception | None = None
    reserved: int = 0

    async def reserve(self, identity: Identity) -> Reservation:
        if self.used >= self.limit:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.QUOTA_EXHAUSTED, "no", 60)
        self.used += 1
        self.reserved += 1
        quota = quota_pb2.Quota(
            plan="guest", limit=self.limit, used=self.used, remaining=self.limit - self.used
        )
        return Reservation(f"r{self.reserved}", quota)

    async def settle(self, reservation_id: str, commit: bool) -> None:
        self.settlements.append((reservation_id, commit))
        if self.settle_error is not None:
            raise self.settle_error
        if not commit:
            self.used -= 1


@dataclass
class Rig:
    pipeline: GenerationPipeline
    upstream: ScriptedUpstream
    quota: MemoryQuota
    breaker: CircuitBreaker
    background: BackgroundTasks


def rig(
    upstream: ScriptedUpstream | None = None,
    *,
    timeout: float = 30.0,
    threshold: int = 5,
    system_prompt: str = "Be brief. Answer in {lang}.",
) -> Rig:
    upstream = upstream or ScriptedUpstream()
    quota = MemoryQuota()
    breaker = CircuitBreaker("openai", failure_threshold=threshold, reset_timeout=60)
    background = BackgroundTasks()
    config = PipelineConfig("text-model", "vision-model", system_prompt, 100, timeout)
    pipeline = GenerationPipeline(
        config,
        upstream,
        ResilientResponseCache(None, MemoryResponseCache(60, 100)),
        quota,
        breaker,
        InFlightLimiter(5),
        background,
    )
    return Rig(pipeline, upstream, quota, breaker, background)


def request(text: str = "Hi", **kwargs: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "text": text,
        "image_data": b"",
        "image_mime_type": "",
        "lang": "en",
        "identity": GUEST,
    }
    return GenerationRequest(**(values | kwargs))


async def collect(r: Rig, req: GenerationRequest) -> list[StreamEvent]:
    return [event async for event in r.pipeline.stream(req)]


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
    r = rig()
    r.pipeline.upstream = None
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
    assert r.quota.settlements == [("r1", True)]

    r.upstream.error = unavailable()
    with pytest.raises(ServiceError):
        await r.pipeline.generate(request("another"))
    assert r.quota.settlements[-1] == ("r2", False)
    assert r.quota.used == 1


async def test_a_failing_settlement_never_fails_a_good_answer() -> None:
    r = rig()
    r.quota.settle_error = RuntimeError("quota went away")
    result = await r.pipeline.generate(request())
    assert result.answer.text
    assert r.quota.settlements == [("r1", True)]


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
    assert r.pipeline.limiter.active == 0
    # A cancelled call says nothing about the upstream's health.
    assert r.breaker.snapshot().failures == 0


# -- streams -------------------------------------------------------------------------------------


async def test_stream_deltas_then_done() -> None:
    r = rig()
    events = await collect(r, request())
    assert [type(e) for e in events] == [Delta, Delta, Delta, Done]
    done = events[-1]
    assert isinstance(done, Done)
    assert done.result.answer.text == "Hello there friend."
    assert not done.result.cached
    assert r.quota.settlements == [("r1", True)]
    assert r.breaker.snapshot().successes == 1

    again = await collect(r, request())
    assert [type(e) for e in again] == [Delta, Done]
    assert isinstance(again[1], Done) and again[1].result.cached


async def test_stream_failing_midway_ends_with_an_in_band_error_and_a_refund() -> None:
    r = rig(ScriptedUpstream(error=unavailable(), fail_after=2))
    events = await collect(r, request())
    assert [type(e) for e in events] == [Delta, Delta, Failed]
    failed = events[-1]
    assert isinstance(failed, Failed)
    assert failed.error.code is grpc.StatusCode.UNAVAILABLE
    assert failed.error.reason == "UPSTREAM_UNAVAILABLE"
    assert r.quota.settlements == [("r1", False)]
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
    assert r.quota.settlements == [("r1", False)]


async def test_stream_failing_before_any_delta_raises() -> None:
    r = rig(ScriptedUpstream(error=unavailable(), fail_after=0))
    with pytest.raises(ServiceError) as caught:
        await collect(r, request())
    assert caught.value.reason == "UPSTREAM_UNAVAILABLE"
    assert r.quota.settlements == [("r1", False)]


async def test_an_unexpected_error_midway_is_an_internal_in_band_error() -> None:
    r = rig(ScriptedUpstream(error=KeyError("bug"), fail_after=1))
    events = await collect(r, request())
    assert [type(e) for e in events] == [Delta, Failed]
    failed = events[-1]
    assert isinstance(failed, Failed)
    assert (failed.error.code, failed.error.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert r.quota.settlements == [("r1", False)]


async def test_a_client_leaving_midstream_refunds() -> None:
    r = rig()
    stream = r.pipeline.stream(request())
    first = await anext(stream)
    assert isinstance(first, Delta)
    await stream.aclose()
    await r.background.drain(5)
    assert r.quota.settlements == [("r1", False)]
    assert r.pipeline.limiter.active == 0


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
    assert r.quota.settlements == [("r1", False)]


async def test_a_deadline_past_the_upstream_timeout_counts() -> None:
    r = rig(ScriptedUpstream(delay=5), timeout=0.05, threshold=1)
    loop = asyncio.get_running_loop()
    with pytest.raises(ServiceError) as caught:
        await collect(r, request(deadline=loop.time() + 0.1))
    assert caught.value.reason == "UPSTREAM_TIMEOUT"
    assert r.breaker.snapshot().state == "open"


async def test_inflight_limit_fails_fast_without_queueing() -> None:
    r = rig(ScriptedUpstream(delay=10))
    r.pipeline.limiter.limit = 1
    task = asyncio.create_task(r.pipeline.generate(request("first")))
    while not r.upstream.prompts:
        await asyncio.sleep(0.01)
    with pytest.raises(ServiceError) as caught:
        await r.pipeline.generate(request("second"))
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAVAILABLE, "OVERLOADED")
    assert caught.value.retry_after_seconds == 1
    assert r.quota.reserved == 1
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
