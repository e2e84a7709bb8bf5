"""A pipeline on its own for tests: a scripted upstream, an in-memory quota and cache, no
Redis (single-flight per replica)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import grpc

from genmesh.quota.v1 import quota_pb2
from services.common.background import BackgroundTasks
from services.common.breaker import CircuitBreaker
from services.common.errors import Reason, ServiceError
from services.common.identity import Identity
from services.generation.answer import Answer, Usage
from services.generation.cache import MemoryResponseCache, ResilientResponseCache
from services.generation.inflight import InFlightLimiter
from services.generation.pipeline import (
    GenerationPipeline,
    GenerationRequest,
    PipelineConfig,
    StreamEvent,
)
from services.generation.quota_client import Reservation
from services.generation.shared_calls import SharedCalls
from services.generation.upstream import Prompt
from services.generation.upstream_calls import RetryPolicy, UpstreamCaller
from services.generation.upstream_errors import UpstreamError, upstream_unavailable

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
    """The quota service's contract in memory. `calls` lists every quota call in order
    ("reserve", "consume", "settle"), as the real client would make RPCs. Settlements run in
    the pipeline's background tasks: `settlements` lists those that finished; set `hold` to
    keep them waiting (to see that a reply does not)."""

    limit: int = 10
    used: int = 0
    settlements: list[tuple[str, bool]] = field(default_factory=list)
    settle_error: Exception | None = None
    reserved: int = 0
    consumed: int = 0
    calls: list[str] = field(default_factory=list)
    hold: asyncio.Event | None = None

    def _take(self, kind: str) -> quota_pb2.Quota:
        self.calls.append(kind)
        if self.used >= self.limit:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.QUOTA_EXHAUSTED, "no", 60)
        self.used += 1
        return quota_pb2.Quota(
            plan="guest", limit=self.limit, used=self.used, remaining=self.limit - self.used
        )

    async def reserve(self, identity: Identity) -> Reservation:
        quota = self._take("reserve")
        self.reserved += 1
        return Reservation(f"r{self.reserved}", quota)

    async def consume(self, identity: Identity) -> Reservation:
        quota = self._take("consume")
        self.consumed += 1
        return Reservation(f"c{self.consumed}", quota)

    async def settle(self, reservation_id: str, commit: bool) -> None:
        self.calls.append("settle")
        if self.hold is not None:
            await self.hold.wait()
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
    limiter: InFlightLimiter


def rig(
    upstream: ScriptedUpstream | None = None,
    *,
    timeout: float = 30.0,
    threshold: int = 5,
    system_prompt: str = "Be brief. Answer in {lang}.",
    retries: int = 0,
    max_inflight: int = 5,
    configured: bool = True,
) -> Rig:
    upstream = upstream or ScriptedUpstream()
    quota = MemoryQuota()
    breaker = CircuitBreaker("openai", failure_threshold=threshold, reset_timeout=60)
    background = BackgroundTasks()
    config = PipelineConfig("text-model", "vision-model", system_prompt, 100)
    cache = ResilientResponseCache(None, MemoryResponseCache(60, 100))
    caller = UpstreamCaller(
        upstream,
        breaker,
        RetryPolicy(max_retries=retries, base_delay_seconds=0.01, max_delay_seconds=0.05),
        upstream_timeout_seconds=timeout,
    )
    limiter = InFlightLimiter(max_inflight)
    calls = SharedCalls(caller, cache, limiter, None) if configured else None
    pipeline = GenerationPipeline(config, calls, cache, quota, background)
    return Rig(pipeline, upstream, quota, breaker, background, limiter)


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


async def settled(r: Rig) -> list[tuple[str, bool]]:
    """The settlements, once every one the pipeline started in the background has finished
    (replies do not wait for them)."""
    await r.background.drain(5)
    return r.quota.settlements
